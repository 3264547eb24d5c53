"""The task protocol and the needle-in-a-haystack family (ideas from RULER's task definitions, Hsieh et al.
2024, arXiv:2404.06654; the code and wording are ours).

A task turns (seed, n_units, depth) into one sample: the user message (instruction, context, question), the
list of reference answers, and metadata. `n_units` is the context's size in filler units (sentences, needles,
list entries, rounds); `lwm.evals.suite.fit_sample` picks the largest n_units whose prompt fits a token
length. Every random draw comes from `random.Random(seed)`, so a sample is a function of its arguments.
Each task also reads its answer back from a prompt by rule (`oracle`, used by the tests as a positive
control) and draws a random answer of the right kind (`random_answer`, the negative control).

Needle message (the wording is ours), for a single number value:
    Some special magic numbers are hidden within the following text. Make sure to memorize them. I will
    quiz you about them afterwards.
    <haystack sentences ... One of the special magic numbers for meadow is: 5170231. ... more sentences>
    What is the special magic number for meadow mentioned in the provided text? Answer with it only.
"""
from __future__ import annotations

import dataclasses
import random
import re
import zlib
from typing import Optional

from lwm.evals import vocab
from lwm.evals.haystack import Haystack, noise_haystack
from lwm.evals.runner import EvalTask
from lwm.evals.scoring import match_all


def sub_seed(*parts) -> int:
    """A stable 32-bit seed from any printable parts (crc32 of their repr; Python's hash() is salted)."""
    return zlib.crc32(repr(parts).encode())


@dataclasses.dataclass(frozen=True)
class Task(EvalTask):
    """A text task of the suite (a task of the one runner, lwm.evals.runner.EvalTask): name, answer budget
    (new tokens), whether depth is a grid axis, whether an essay haystack is needed, and the smallest n_units
    that makes sense. Its samples come from lwm.evals.suite.build_samples (prompt fitted to a token length)."""
    uses_depth: bool = False
    needs_essay: bool = False
    min_units: int = 1

    def record(self, sample, response, new_tokens, prompt) -> dict:
        """The sample without its prompt and message, plus response, score (0-100, `score`) and new_tokens."""
        out = {k: v for k, v in sample.items() if k not in ("prompt", "message")}
        out.update(response=response, score=self.score(response, sample["answers"]), new_tokens=len(new_tokens))
        return out

    def make(self, seed: int, n_units: int, depth: Optional[float], haystack: Optional[Haystack]) -> dict:
        """-> dict(message=str, answers=list[str], meta=dict)."""
        raise NotImplementedError

    def score(self, response: str, answers) -> float:
        return match_all(response, answers)

    def oracle(self, message: str) -> str:
        raise NotImplementedError

    def random_answer(self, rng: random.Random) -> str:
        raise NotImplementedError


def insert_at_depths(units: list[str], items: list[tuple[str, float]]) -> list[str]:
    """Put each (sentence, depth %) between units at index round(len(units) * depth / 100); items at the same
    index keep their order. insert_at_depths(["a", "b", "c", "d"], [("N", 50)]) == ["a", "b", "N", "c", "d"]."""
    n = len(units)
    slots: dict[int, list[str]] = {}
    for text, depth in items:
        slots.setdefault(min(n, max(0, round(n * depth / 100))), []).append(text)
    out = []
    for i in range(n + 1):
        out.extend(slots.get(i, []))
        if i < n:
            out.append(units[i])
    return out


_NOUN = dict(number="numbers", word="words", uuid="uuids")
_KEY_KINDS = ("word", "wordpair", "uuid")


def _key(kind: str, rng: random.Random) -> str:
    if kind == "wordpair":
        return f"{vocab.random_word(rng)}-{vocab.random_word(rng)}"
    return vocab.draw_kind(kind, rng)


@dataclasses.dataclass(frozen=True)
class NeedleTask(Task):
    """Needles "One of the special magic {numbers|words|uuids} for {key} is: {value}." in a haystack: `noise`
    (RULER's repeated sentences), `essay` (sentences of a haystack file) or `needles` (the haystack is
    made of other needles, each with its own key). `n_keys` keys are placed (the first `n_queries` are asked
    for, the rest are distractors), the queried keys with `n_values` values each. The first queried needle
    goes at the requested depth, every other one at a random depth.

    Scoring: match_all over the queried values (every value of every queried key), 0-100.
    Worked example (multi-value, values 8848, 1234, 5555, 7070 for 'meadow'):
        response "The numbers are 8848, 1234 and 7070." -> 3 of 4 found -> 75.0
    """
    haystack: str = "noise"                  # noise | essay | needles
    key_kind: str = "word"                   # word | wordpair | uuid
    value_kind: str = "number"               # number | word | uuid
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1

    def __post_init__(self):
        if self.haystack not in ("noise", "essay", "needles") or self.key_kind not in _KEY_KINDS:
            raise ValueError(f"task {self.name}: haystack {self.haystack!r} / key kind {self.key_kind!r} unknown")
        if not 1 <= self.n_queries <= self.n_keys:
            raise ValueError(f"task {self.name}: need 1 <= n_queries={self.n_queries} <= n_keys={self.n_keys}")

    @property
    def noun(self) -> str:
        return _NOUN[self.value_kind]

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.noun} for {key} is: {value}."

    def question(self, keys: list[str]) -> str:
        many = self.n_values > 1 or len(keys) > 1
        who = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        if many:
            return (f"What are all the special magic {self.noun} for {who} mentioned in the provided text? "
                    "Answer with them only.")
        return (f"What is the special magic {self.noun[:-1]} for {who} mentioned in the provided text? "
                "Answer with it only.")

    def make(self, seed, n_units, depth, haystack):
        rng = random.Random(seed)
        keys = vocab.distinct(lambda r: _key(self.key_kind, r), rng, self.n_keys)
        queried = keys[:self.n_queries]
        values = {k: vocab.distinct(lambda r: vocab.draw_kind(self.value_kind, r), rng,
                                    self.n_values if k in queried else 1) for k in keys}
        items = []
        for i, k in enumerate(keys):
            for j, v in enumerate(values[k]):
                d = depth if (i == 0 and j == 0 and depth is not None) else rng.uniform(0, 100)
                items.append((self.needle(k, v), d))
        if self.haystack == "needles":
            units = []
            for u in range(n_units):          # unit u depends on (seed, u) only: stable as n_units grows
                r = random.Random(sub_seed(seed, "filler", u))
                k = _key(self.key_kind, r)
                while k in keys:
                    k = _key(self.key_kind, r)
                units.append(self.needle(k, vocab.draw_kind(self.value_kind, r)))
        else:
            source = haystack if self.haystack == "essay" else noise_haystack()
            if source is None:
                raise ValueError(f"task {self.name} needs an essay haystack (--haystack_file)")
            units = source.units(rng.randrange(len(source)), n_units)
        context = " ".join(insert_at_depths(units, items))
        message = (f"Some special magic {self.noun} are hidden within the following text. Make sure to memorize "
                   f"them. I will quiz you about them afterwards.\n{context}\n{self.question(queried)}")
        answers = [v for k in queried for v in values[k]]
        return dict(message=message, answers=answers, meta=dict(keys=queried, distractor_keys=keys[self.n_queries:]))

    def oracle(self, message: str) -> str:
        """Reads the keys from the question and every value the context gives each of them."""
        q = re.search(r"special magic \w+ for (.+) mentioned in the provided text\?", message.splitlines()[-1])
        keys = re.split(r", | and ", q.group(1))
        found = []
        for k in keys:
            found += re.findall(rf"special magic {self.noun} for {re.escape(k)} is: (\S+?)\.(?:\s|$)", message)
        return " ".join(found)

    def random_answer(self, rng):
        return " ".join(vocab.draw_kind(self.value_kind, rng) for _ in range(self.n_values * self.n_queries))
