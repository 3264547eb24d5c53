"""Filler text for the synthetic tasks, as a list of sentences ("units") that the tasks cut to length.

  noise   RULER's repeated filler, one unit per repetition:
          "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
  essay   the sentences of a haystack file (JSONL with a "text" field, e.g. the Paul Graham essays that
          scripts/create_needle_data.py --source=essays writes, or any local text), read once up to
          --haystack_max_chars (64 M characters by default); a sample
          starts at a seeded offset and wraps around.

Sentences are split after a sentence end of any script ('.', '!', '?', '。', '！', '？', ...) followed by
whitespace (or directly, for the CJK marks), so a needle inserted between two units sits on a sentence
boundary of that text. Worked example: split_sentences("A b. C d? 你好。再见。") ->
["A b.", "C d?", "你好。", "再见。"].
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SPLIT = re.compile(r"(?<=[.!?…])\s+|(?<=[\u3002\uff01\uff1f\uff0e\uff61])\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (module docstring), stripped, empty ones dropped."""
    return [s.strip() for s in _SPLIT.split(text) if s and s.strip()]


class Haystack:
    """Filler units: `units(start, n)` -> n sentences from offset `start` (wrapping around)."""

    def __init__(self, sentences: Sequence[str], name: str):
        if not sentences:
            raise ValueError(f"haystack {name}: no sentences")
        self.sentences, self.name = list(sentences), name

    def units(self, start: int, n: int) -> list[str]:
        m = len(self.sentences)
        return [self.sentences[(start + i) % m] for i in range(n)]

    def __len__(self):
        return len(self.sentences)


def noise_haystack() -> Haystack:
    return Haystack([NOISE], "noise")


MAX_HAYSTACK_CHARS = 64_000_000   # --haystack_max_chars default: 64 M characters, about 16 M tokens


def essay_haystack(path: str, max_documents: Optional[int] = None,
                   max_chars: int = MAX_HAYSTACK_CHARS) -> Haystack:
    """Sentences of the documents of a haystack file (JSONL with "text", or a plain .txt file read in
    blocks), reading no more than the first max_documents documents and max_chars characters (the document
    that crosses it is the last one read; a file under the bound is read whole). Says once on stdout when the
    bound cut the file. Raises ValueError naming the file when it holds no text, or max_chars < 1."""
    from lwm.evals.needle import iter_haystack_texts

    if max_chars < 1:
        raise ValueError(f"--haystack_max_chars={max_chars} must be >= 1")
    sentences, chars = [], 0
    for i, text in enumerate(iter_haystack_texts(path)):
        if (max_documents is not None and i >= max_documents) or chars >= max_chars:
            if chars >= max_chars:
                print(f"haystack: read the first {chars:,} characters of {path} (--haystack_max_chars="
                      f"{max_chars:,})")
            break
        sentences.extend(split_sentences(text))
        chars += len(text)
    if not sentences:
        raise ValueError(f"--haystack_file={path}: no text in it")
    return Haystack(sentences, f"essay:{path}")
