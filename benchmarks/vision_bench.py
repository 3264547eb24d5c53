"""Vision generation end to end (text -> PNG, text -> 4-frame MP4), generation tokens/s, and VQGAN frames/s.

Hardware: any; figures below are for a 2-core CPU. Each generation case runs `python -m lwm.vision_generation` in a
fresh process (imports, random init, compilation and VQGAN decoding included, as a user would run it) with a
random 21.6M-parameter vision model (the `debug` preset: D=256, 2 layers, 32000 + 8448 vocabularies) and the
released VQGAN architecture (146M, 256x256 <-> 16x16 codes) with random weights, CFG 5 on the image, 1 on video.
The original LWM on the same 2-core machine: 14 s for an image, 37 s for a 4-frame video, end to end.
VQGAN encode/decode frames/s come from benchmarks/vqgan_bench.py (run as a child process).
Run: python benchmarks/vision_bench.py [--llama_config debug] [--vqgan_config released] [--n_frames 1,4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer(directory: str) -> str:
    """A small sentencepiece model trained on the repository's docs (the vocabulary size does not matter here:
    the model's text vocabulary is the preset's 32000)."""
    import glob

    from lwm.text.tokenizer import train_sentencepiece

    texts = [p for f in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) for p in open(f).read().split("\n\n")
             if len(p) > 40]
    path = os.path.join(directory, "tokenizer.model")
    train_sentencepiece(texts, path, vocab_size=512)
    return path


def _generate(args, tokenizer: str, out_dir: str, n_frames: int) -> dict:
    out = os.path.join(out_dir, "bench.png" if n_frames == 1 else "bench.mp4")
    cmd = [sys.executable, "-m", "lwm.vision_generation", "--prompt=Fireworks over the city", f"--output_file={out}",
           f"--n_frames={n_frames}", f"--load_llama_config={args.llama_config}", f"--vqgan_config={args.vqgan_config}",
           f"--tokenizer={tokenizer}", "--cfg_scale_image=5.0", "--cfg_scale_video=1.0", "--top_k_video=1000",
           "--mesh_dim=1,-1,1,1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("vision_generation stats: "))
    return dict(json.loads(line.split(": ", 1)[1]), wall_s=wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama_config", default="debug", help="vision model preset (debug = 21.6M parameters)")
    parser.add_argument("--vqgan_config", default="released", help="VQGAN preset or json::path")
    parser.add_argument("--n_frames", default="1,4", help="comma-separated frame counts (1 = PNG, >1 = MP4)")
    parser.add_argument("--vqgan_batch_sizes", default="1", help="batch sizes for vqgan_bench.py; '' skips it")
    args = parser.parse_args()

    import jax

    print(f"# vision generation, fresh process per row: model={args.llama_config} vqgan={args.vqgan_config} "
          f"(random weights), device={jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores", flush=True)
    print("| frames | params | new tokens | first token s | generate s | tokens/s | VQGAN decode s* | end to end s |")
    print("|-------:|-------:|-----------:|--------------:|-----------:|---------:|----------------:|-------------:|")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(tmp)
        for n in (int(x) for x in args.n_frames.split(",")):
            s = _generate(args, tokenizer, tmp, n)
            print(f"| {n:6d} | {s['params_m']:5.1f}M | {s['new_tokens']:10d} | {s['first_token_s']:13.1f} | "
                  f"{s['generate_s']:10.2f} | {s['tokens_per_s']:8.1f} | {s['vqgan_decode_s']:15.1f} | "
                  f"{s['wall_s']:12.1f} |", flush=True)
    print("(* first call, compilation included; first token s is the time to the first new token, the language model's compilation included)")
    if args.vqgan_batch_sizes:
        print(flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vqgan_bench.py"), "--preset",
                        args.vqgan_config, "--batch_sizes", args.vqgan_batch_sizes, "--repeats", "2"], check=True)


if __name__ == "__main__":
    main()
