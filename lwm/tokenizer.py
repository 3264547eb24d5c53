"""`python -m lwm.tokenizer train`: a LLaMA-style sentencepiece tokenizer from one's own corpus. CPU, one core;
about a second per few MB of text.

    python -m lwm.tokenizer train --input=my.jsonl --output=my/tokenizer.model --vocab_size=8000
    python -m lwm.tokenizer train --input='notes/*.txt,more.jsonl' --field=body --output=tok.model
    llama_tokenizer_path=my/tokenizer.model dataset_path=my.jsonl bash scripts/run_train_text.sh

--input: comma-separated files or glob patterns; `.jsonl`/`.json` files are JSON lines whose string --field
is the text, anything else is plain text (split into paragraphs at blank lines). The model is BPE with the
LLaMA layout (unk/bos/eos = 0/1/2, byte fallback, identity normalisation, digits split): ids 3-258 are the
256 bytes, so --vocab_size must leave room for the corpus's characters. --character_coverage=auto keeps every
character when it fits, else the most frequent ones (the rest are spelled in bytes) down to 99.95% of the
text; below that, or with a number given, a too-small --vocab_size is one line naming the smallest size that
works. --vocab_size is an upper bound: a small corpus may give fewer pieces (the summary says how many).
Bad flags or files: one line, exit status 2 (docs/data.md, "Your own tokenizer").
"""
from __future__ import annotations

import glob
import os
import sys
import time

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse, require, subcommand
from lwm.cli.values import FlagError


def get_default_config() -> dict[str, ConfigDict]:
    """The flags of `train` and their defaults."""
    t = ConfigDict()
    t.input = ""                               # comma-separated files or globs: .jsonl/.json (JSON lines) or text
    t.field = "text"                           # the JSON lines' text field
    t.output = ""                              # the tokenizer.model to write
    t.vocab_size = 32000                       # pieces, at most (LLaMA's: 32000); >= 260
    t.character_coverage = "auto"              # auto, or a number in (0, 1] (LLaMA's: 0.99995)
    t.lock()
    return {"train": t}


def input_files(text: str) -> list[str]:
    """The files of --input (comma-separated paths or glob patterns), in order; FlagError naming a pattern
    that matches nothing."""
    files = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FlagError(f"--input: {item} matches no file")
        files += matches
    if not files:
        raise FlagError("--input is empty: give the corpus files (JSON lines or text), comma-separated")
    return files


def main(argv=None) -> str:
    """Train and write the tokenizer; prints and returns the summary line. Raises FlagError / ValueError /
    OSError naming the flag or file."""
    from lwm.text.tokenizer import read_texts, train_sentencepiece

    _, rest = subcommand(sys.argv[1:] if argv is None else argv, ("train",), "lwm.tokenizer")
    config = parse(rest, get_default_config()["train"])
    require(config, "input", "output")
    coverage = config.character_coverage
    if coverage != "auto":
        try:
            coverage = float(coverage)
        except ValueError:
            raise FlagError(f"--character_coverage={coverage!r}: expected auto or a number in (0, 1]") from None
    files = input_files(config.input)
    start = time.perf_counter()
    texts = list(read_texts(files, config.field))
    if not any(t.strip() for t in texts):
        raise ValueError(f"--input: no text in {', '.join(files)} (field {config.field!r} for JSON lines)")
    tok = train_sentencepiece(texts, config.output, config.vocab_size, coverage)
    n_bytes = sum(len(t.encode()) for t in texts)
    line = (f"wrote {config.output}: {tok.vocab_size} pieces (asked {config.vocab_size}), character coverage "
            f"{tok.character_coverage:.6g}, from {len(texts)} paragraphs ({n_bytes / 1e6:.2f} MB) of {len(files)} "
            f"file(s) in {time.perf_counter() - start:.1f} s")
    print(line)
    return line


if __name__ == "__main__":
    sys.exit(cli("lwm.tokenizer", main, get_default_config, __doc__))
