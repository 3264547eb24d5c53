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
from collections.abc import Iterable, Mapping
from typing import Any

import sentencepiece as spm

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "get_tokenizer_config", "load_tokenizer",
           "train_sentencepiece"]


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


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 512) -> SentencePieceTokenizer:
    """Train a small BPE model in the LLaMA layout (unk/bos/eos = 0/1/2, no pad, byte fallback, identity
    normalisation, whitespace kept) and write it to `model_path`. Takes well under a second on a few
    hundred KB of text; used by tests and the offline demo. `vocab_size` must exceed 259 (3 specials +
    256 byte pieces); a corpus too small for it gives a smaller vocabulary rather than an error."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size}: byte fallback needs at least 260 (3 specials + 256 bytes)")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty text to train on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)
    d = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(d, exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    return SentencePieceTokenizer(buf.getvalue(), source=model_path)
