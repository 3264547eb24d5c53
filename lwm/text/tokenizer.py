"""Tokenizers: one small wrapper over sentencepiece (exact LLaMA ids) or a Hugging Face tokenizer (offline).

`load_tokenizer(spec)` accepts
  - a sentencepiece model file (`tokenizer.model`): the ids LLaMA and LWM were trained with;
  - a directory holding `tokenizer.model` (sentencepiece) or a Hugging Face tokenizer (`tokenizer.json`, ...);
  - a Hugging Face hub id, resolved from the local cache only (nothing is downloaded); when the cached repo
    has a `tokenizer.model`, sentencepiece reads it, otherwise `transformers.AutoTokenizer` does;
  - the original's flag style, a mapping with `vocab_file` (`--tokenizer.vocab_file=/path/tokenizer.model`).

`encode` never adds BOS/EOS: the data pipeline places special tokens itself (see docs/data.md).

    tok = load_tokenizer("/data/tokenizer.model")
    ids = tok.encode("Hello world")        # e.g. [15043, 3186]
    tok.decode(ids)                        # 'Hello world'
    tok.bos_id, tok.eos_id, tok.vocab_size # 1, 2, 32000 for LLaMA
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import sentencepiece as spm

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "get_tokenizer_config", "load_tokenizer",
           "train_sentencepiece", "read_texts", "character_counts", "smallest_vocab_size", "choose_coverage"]


class Tokenizer:
    """What the rest of LWM uses of a tokenizer. `pad_id` falls back to `bos_id` when the model has none
    (the original padded with BOS); padded positions never carry loss."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    # Names the Hugging Face tokenizers use, for code written against them.
    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def eos_token_id(self) -> int:
        return self.eos_id


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece model; picklable (worker processes get the serialized model, not a file path)."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self.source = source
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{source}: sentencepiece model has no BOS or EOS id (bos={self.bos_id}, "
                             f"eos={self.eos_id}); LWM needs both")
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.bos_id
        self.vocab_size = int(self._sp.get_piece_size())

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        import fsspec

        with fsspec.open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, source=path)
        except RuntimeError as e:  # sentencepiece's parse error does not name the file
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_proto": self._proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self):
        return f"SentencePieceTokenizer({self.source!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A transformers tokenizer; `encode` adds no special tokens (unlike `AutoTokenizer.encode`)."""

    def __init__(self, tokenizer: Any, source: str):
        self.source = source
        self._tok = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{source}: tokenizer has no BOS or EOS token; LWM needs both")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.bos_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self):
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def get_tokenizer_config(updates: Mapping | None = None):
    """The original's `--tokenizer.*` flag group: `vocab_file` (a `tokenizer.model`, directory or hub id)."""
    from ml_collections import ConfigDict

    config = ConfigDict()
    config.vocab_file = ""
    config.lock()
    if updates is not None:
        config.update(dict(updates))
    return config


def _hf_auto(spec: str, local_files_only: bool) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"tokenizer {spec!r}: not a local tokenizer.model, not a local tokenizer directory, and not in "
            f"the Hugging Face cache (nothing is downloaded at run time). Pass a local tokenizer.model or a "
            f"directory saved with save_pretrained. ({type(e).__name__}: {e})") from None
    return HFTokenizer(tok, source=spec)


def load_tokenizer(spec: str | Mapping) -> Tokenizer:
    """Load a tokenizer from a file, a directory, a cached hub id, or `{'vocab_file': ...}` (see module doc)."""
    if isinstance(spec, Mapping) or hasattr(spec, "vocab_file"):
        vocab_file = spec["vocab_file"] if isinstance(spec, Mapping) else spec.vocab_file
        if not vocab_file:
            raise ValueError("tokenizer.vocab_file is empty; give a tokenizer.model, a directory or a hub id")
        spec = vocab_file
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be a non-empty path or hub id, got {spec!r}")
    if "://" in spec:  # remote sentencepiece file (gs://..., s3://...) through fsspec
        return SentencePieceTokenizer.from_file(spec)
    if os.path.isfile(spec):
        return SentencePieceTokenizer.from_file(spec)
    if os.path.isdir(spec):
        model = os.path.join(spec, "tokenizer.model")
        if os.path.isfile(model):
            return SentencePieceTokenizer.from_file(model)
        return _hf_auto(spec, local_files_only=True)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".model"):
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file or directory")
    # A hub id: only the local cache is consulted.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "tokenizer.model")
    except Exception:  # malformed repo id and the like: let AutoTokenizer give its error below
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        return SentencePieceTokenizer.from_file(cached)
    return _hf_auto(spec, local_files_only=True)


# The LLaMA sentencepiece layout: unk, bos, eos and 256 byte pieces (byte fallback) before any learned piece.
META_PIECES = 3 + 256
# Sentences longer than this (bytes) are skipped by sentencepiece's trainer; read_texts splits longer text.
MAX_SENTENCE_BYTES = 1 << 16
# character_coverage='auto' lowers the coverage (rare characters then fall back to bytes, as in LLaMA's own
# 0.99995) to fit the vocabulary, but not below this.
AUTO_COVERAGE_FLOOR = 0.9995


def _chunks(text: str, limit: int = MAX_SENTENCE_BYTES - 1024):
    """`text` as paragraphs (split on blank lines), each under `limit` UTF-8 bytes (long ones split at
    line ends, then anywhere)."""
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if len(para.encode()) <= limit:
            yield para
            continue
        piece = ""
        for line in para.splitlines(keepends=True):
            while len(line.encode()) > limit:          # one very long line: cut by characters
                cut = limit // 4
                yield line[:cut]
                line = line[cut:]
            if len((piece + line).encode()) > limit:
                yield piece
                piece = ""
            piece += line
        if piece.strip():
            yield piece


def read_texts(paths: Iterable[str], field: str = "text") -> Iterator[str]:
    """The training text of `paths`: JSON lines (`.jsonl`, `.json`; the string `field` of each object) or
    plain text files (anything else), as paragraphs under MAX_SENTENCE_BYTES. Raises ValueError naming the
    file and line for a line that is not a JSON object with a string `field`, FileNotFoundError for a
    missing file."""
    import json

    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        with open(path, encoding="utf-8", errors="replace") as f:
            if not path.endswith((".jsonl", ".json")):
                yield from _chunks(f.read())
                continue
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}:{i}: not a JSON object (JSON lines: one object per line)") from None
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{i}: no string field {field!r} (--field names it)")
                yield from _chunks(value)


def character_counts(texts: Iterable[str]) -> "collections.Counter":
    """Characters as sentencepiece's trainer counts them (identity normalisation, spaces as U+2581, and one
    U+2581 more per text: the dummy prefix it puts in front of each).
    Example: character_counts(["a b"]) == Counter({'\u2581': 2, 'a': 1, 'b': 1})."""
    import collections

    counts = collections.Counter()
    for t in texts:
        counts.update(t.replace(" ", "\u2581"))
        counts["\u2581"] += 1
    return counts


def _cumulative(counts) -> "np.ndarray":
    import numpy as np

    freq = np.array(sorted(counts.values(), reverse=True), np.float64)
    return np.concatenate([[0.0], np.cumsum(freq)]) / max(freq.sum(), 1.0)


def required_characters(counts, coverage: float) -> int:
    """How many characters sentencepiece makes pieces of at `coverage`: the most frequent ones, added while
    the share covered so far (a float32 in sentencepiece's trainer_interface.cc) is below `coverage`."""
    import numpy as np

    cum = _cumulative(counts).astype(np.float32)
    below = np.nonzero(cum[:-1] >= np.float32(coverage))[0]
    return int(below[0]) if below.size else len(counts)


def smallest_vocab_size(counts, coverage: float = 1.0) -> int:
    """The smallest vocab_size sentencepiece accepts for a corpus with these character counts at `coverage`:
    META_PIECES + required_characters (its check "Vocabulary size is smaller than required_chars")."""
    return META_PIECES + required_characters(counts, coverage)


def choose_coverage(counts, vocab_size: int, coverage: float | str = "auto") -> float:
    """The character_coverage to train with: `coverage` itself when a number, else ('auto') 1.0 when every
    character fits beside META_PIECES, else the coverage that keeps the vocab_size - META_PIECES most frequent
    characters, if that is >= AUTO_COVERAGE_FLOOR. Raises ValueError (one line, naming --vocab_size and the
    smallest size that works) otherwise.
    Example: 274 distinct characters, vocab_size=512: 253 kept, coverage just above their share."""
    import numpy as np

    if coverage != "auto":
        coverage = float(coverage)
        if not 0 < coverage <= 1:
            raise ValueError(f"--character_coverage={coverage}: expected a number in (0, 1] or auto")
        need = smallest_vocab_size(counts, coverage)
        if vocab_size < need:
            raise ValueError(f"--vocab_size={vocab_size} is too small for this corpus at --character_coverage="
                             f"{coverage}: the smallest that works is {need} ({META_PIECES} special and byte pieces "
                             f"+ {need - META_PIECES} characters); raise --vocab_size or lower --character_coverage")
        return coverage
    full = smallest_vocab_size(counts, 1.0)
    if vocab_size >= full:
        return 1.0
    keep = vocab_size - META_PIECES
    cum = _cumulative(counts).astype(np.float32)
    if keep >= 1 and cum[keep] >= np.float32(AUTO_COVERAGE_FLOOR):
        target = float((np.float64(cum[keep - 1]) + np.float64(cum[keep])) / 2)   # keeps exactly `keep`
        if required_characters(counts, target) == keep:
            return target
        return float(cum[keep])
    floor = smallest_vocab_size(counts, AUTO_COVERAGE_FLOOR)
    raise ValueError(f"--vocab_size={vocab_size} is too small for this corpus: the smallest that works is {floor} "
                     f"({META_PIECES} special and byte pieces + {floor - META_PIECES} characters covering "
                     f"{AUTO_COVERAGE_FLOOR:.2%} of the text; all {len(counts)} characters: {full})")


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 512,
                        character_coverage: float | str = "auto") -> SentencePieceTokenizer:
    """Train a BPE model in the LLaMA layout (unk/bos/eos = 0/1/2, no pad, byte fallback, identity
    normalisation, whitespace kept, digits split) and write it to `model_path`. Well under a second on a few
    hundred KB of text. `character_coverage`: see choose_coverage ('auto': every character when the vocabulary
    has room, else the most frequent that fit, the rest as bytes). `vocab_size` is an upper bound: a corpus
    with fewer merges gives a smaller vocabulary. Raises ValueError (one line) when `vocab_size` cannot hold
    the corpus's characters, naming the smallest size that can (computed before sentencepiece runs)."""
    if vocab_size < META_PIECES + 1:
        raise ValueError(f"--vocab_size={vocab_size}: byte fallback needs at least {META_PIECES + 1} "
                         f"(3 specials + 256 bytes + 1 character)")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    coverage = choose_coverage(character_counts(texts), vocab_size, character_coverage)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, hard_vocab_limit=False, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:        # sentencepiece's own check, should ours have missed a case
        raise ValueError(f"sentencepiece: {str(e).split('] ', 1)[-1]}".splitlines()[0]) from None
    d = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(d, exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    tok = SentencePieceTokenizer(buf.getvalue(), source=model_path)
    tok.character_coverage = coverage
    return tok
