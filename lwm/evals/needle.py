"""The original LWM needle-in-a-haystack protocol as two tasks of the one runner (lwm.evals.runner):
`needle` (one needle) and `needle_multi` (several needles, some asked for). Haystacks, token-exact needle
placement, trials and scoring live here; batching, timing and the report (JSON, heatmap, summary) are the
runner's and lwm.evals.report's.

The protocol follows the original LWM evals (scripts/eval_needle.py, eval_needle_multi.py):
  needle    "\\nThe special magic {city} number is: {number}\\n"   (a random 7-digit number)
  question  "What is the special magic {city} number?"
  prompt    TEMPLATE (the chat template's first turn) with the haystack (needle inside) and the question; the answer is correct when the
            generated text contains the number.
The haystack for a context length L is the first L tokens of a document stream (consecutive lines of a
JSONL file with a "text" field), cut by `final_context_length_buffer` tokens (room for the template) and by
the needle's length. A needle at depth d% goes after the last sentence end (a token ending in '.') at or
before token int(n * d / 100) of the cut haystack (d = 100: at the end). Placement is done on the model's
own tokens (the original placed needles with tiktoken's GPT-4 tokens, not available offline).

    trials = single_needle_trials(haystacks, tokenizer, lengths=[1000, 2000], depths=[0, 50, 100], ...)
    results = runner.run(trials, backend, SINGLE, max_tokens_per_batch=20000)    # SINGLE: 32 new tokens
    report.plot_task(results, "needle", "needle.png")
Records (the JSON of lwm.eval_needle*): the trial without its prompt, plus response, correct (a bool; a list
of bools, one per retrieved needle, for needle_multi), prompt_tokens and seconds.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import random
import warnings
import weakref
from typing import Iterable, Optional, Sequence

import numpy as np

from lwm.evals.runner import EvalTask, register
from lwm.text.chat_template import user_turn_text

NEEDLE = "\nThe special magic {city} number is: {number}\n"
QUESTION = "What is the special magic {city} number?"
# The prompt is the first user turn of the one chat template (lwm.text.chat_template) asking these requests, then
# the original's trailing space: "You are a helpful assistant. USER: {context} {question} ... ASSISTANT: ".
REQUEST = ("{context} {question} Don't give information outside the document or repeat your findings. Keep "
           "your response short and direct.")
MULTI_REQUEST = "{context} {question} Don't give information outside the document."
TEMPLATE = user_turn_text(REQUEST, first=True) + " "
MULTI_TEMPLATE = user_turn_text(MULTI_REQUEST, first=True) + " "
MULTI_QUESTION = "What are the special magic numbers for {cities}?"
MULTI_QUESTION_ONE = "What is the special magic number for {city}?"
NUMBER_DIGITS = 7
FINAL_CONTEXT_LENGTH_BUFFER = 200

CITIES = (
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle", "Lagos",
    "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia", "Victoria",
    "Tashkent", "Mumbai", "Barcelona", "Amman", "Toronto", "Bratislava", "Johannesburg", "Thimphu", "Bangkok",
    "Santiago", "San Francisco", "Paris", "Rabat", "Copenhagen", "Madrid", "Ho Chi Minh City", "Sarajevo",
    "Delhi", "Istanbul", "Khartoum", "Helsinki", "Doha", "Kuala Lumpur", "Budapest", "Shanghai", "Moscow",
    "Los Angeles", "Oslo", "Berlin", "Bangalore", "Tokyo", "Melbourne", "Port Louis", "Lisbon", "Nairobi",
    "Kampala", "Lima", "Maputo", "Vancouver", "Dubai", "Jakarta", "Yerevan", "Beirut", "Athens", "Bucharest",
    "Brussels", "Tunis", "Astana", "Seoul", "Buenos Aires", "Vienna",
)


# ------------------------------------------------------------------------------------------ the grid

def context_lengths(lo: int, hi: int, n: int) -> list[int]:
    """n lengths evenly spaced from lo to hi, rounded (the original's np.linspace grid)."""
    if n < 1 or lo < 1 or hi < lo:
        raise ValueError(f"context lengths: need 1 <= context_lengths_min={lo} <= context_lengths_max={hi} "
                         f"and n_context_length_intervals={n} >= 1")
    return sorted(set(int(x) for x in np.round(np.linspace(lo, hi, num=n))))


def depth_percents(n: int) -> list[int]:
    """n depths evenly spaced over [0, 100], rounded."""
    if n < 1:
        raise ValueError(f"n_document_depth_intervals={n}: must be >= 1")
    return sorted(set(int(x) for x in np.round(np.linspace(0, 100, num=n))))


def random_number(rng: random.Random, digits: int = NUMBER_DIGITS) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


# ------------------------------------------------------------------------------------------ haystacks

TXT_BLOCK_BYTES = 1 << 20      # a .txt haystack is read (and yielded) in blocks of about this many bytes


def iter_haystack_texts(path: str) -> Iterable[str]:
    """The "text" field of every line of a JSONL file (a bad line raises naming the file and line); a `.txt`
    file as consecutive blocks of about TXT_BLOCK_BYTES (1 MiB) each, so a reader takes only the text it needs
    of a large file: a block ends after its last newline byte, or, in a line longer than a block, before the
    first byte of its last character (either way never inside a UTF-8 character). Raises ValueError naming
    the file (and line) for text that is not UTF-8 or JSON."""
    import fsspec

    if str(path).endswith(".txt"):
        with fsspec.open(path, "rb") as f:
            rest = b""
            while True:
                block = f.read(TXT_BLOCK_BYTES)
                data = rest + block
                cut = len(data) if not block else data.rfind(b"\n") + 1
                if cut == 0:                            # a line longer than a block: cut before its last
                    cut = len(data) - 1                 # character's first byte (never inside a character)
                    while cut > 0 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                piece, rest = data[:cut], data[cut:]
                if piece:
                    try:
                        yield piece.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}: not UTF-8 text ({e}); a haystack is .txt or JSONL") from None
                if not block:
                    return
    with fsspec.open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{n}: expected an object with a string field "text"')
            yield record["text"]


def read_haystacks(path: str, n_rounds: int, min_tokens: int, tokenizer) -> list[list[int]]:
    """n_rounds token streams of at least min_tokens each, from consecutive documents of `path` (round i
    takes the documents after those of round i - 1, as the original does)."""
    texts = iter_haystack_texts(path)
    out = []
    for r in range(n_rounds):
        tokens: list[int] = []
        for text in texts:
            tokens.extend(tokenizer.encode(text))
            if len(tokens) >= min_tokens:
                break
        if len(tokens) < min_tokens:
            raise ValueError(f"haystack_file={path}: ran out of text in round {r} ({len(tokens)} tokens, need "
                             f"{min_tokens} per round for {n_rounds} rounds); give a longer file or fewer rounds")
        out.append(tokens)
    return out


_PERIOD_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
REPLACEMENT = "\ufffd"          # what a decoder gives for the bytes of a cut multi-byte character
# Sentence ends of other scripts than the original's '.': CJK full stops and marks (。．｡！？), '!', '?',
# the ellipsis, the Arabic question mark and the Devanagari danda.
OTHER_TERMINATORS = ("\u3002", "\uff0e", "\uff61", "\uff01", "\uff1f", "!", "?", "\u2026", "\u061f", "\u0964")
BOUNDARY_KINDS = ("period", "other", "newline", "token")
_WARNED: set = set()
SENTENCE_DENSITY = 400   # a kind of sentence end is used when it ends >= 1 sentence per 400 tokens


class SentenceEnds(frozenset):
    """The ids of tokens whose text ends with '.' (the original's rule; membership tests are unchanged), plus
    the ids ending with another script's sentence end (`other`), with a newline (`newline`), the ids that
    decode alone to part of a character (`partial`: byte pieces; whether they end a sentence depends on their
    neighbours) and the tokenizer (to check character boundaries)."""

    def __new__(cls, periods=(), other=(), newline=(), partial=(), tokenizer=None):
        self = super().__new__(cls, periods)
        self.other, self.newline, self.partial = frozenset(other), frozenset(newline), frozenset(partial)
        self.tokenizer = tokenizer
        return self


def period_token_ids(tokenizer) -> SentenceEnds:
    """Sentence-end token ids of `tokenizer` (a `SentenceEnds`, a frozenset of the ids whose text ends with
    '.'), computed once per tokenizer by decoding each id alone."""
    if tokenizer not in _PERIOD_CACHE:
        periods, other, newline, partial = [], [], [], []
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            if REPLACEMENT in text:
                partial.append(i)
            stripped = text.rstrip()
            if stripped.endswith("."):
                periods.append(i)
            elif stripped.endswith(OTHER_TERMINATORS):
                other.append(i)
            if text.endswith("\n"):
                newline.append(i)
        _PERIOD_CACHE[tokenizer] = SentenceEnds(periods, other, newline, partial, tokenizer)
    return _PERIOD_CACHE[tokenizer]


def is_char_boundary(tokens: Sequence[int], k: int, tokenizer, window: int = 6) -> bool:
    """True when cutting `tokens` before index k splits no character: the `window` tokens before k do not
    decode to a trailing U+FFFD and those from k do not decode to a leading one (UTF-8 characters take at
    most 4 bytes, so 6 byte-sized tokens see a whole one). 0 and len(tokens) are always boundaries."""
    if k <= 0 or k >= len(tokens) or tokenizer is None:
        return True
    left = tokenizer.decode(list(tokens[max(0, k - window):k]))
    right = tokenizer.decode(list(tokens[k:k + window]))
    return not left.endswith(REPLACEMENT) and not right.startswith(REPLACEMENT)


def _period_ends_sentence(tokens: Sequence[int], k: int, tokenizer) -> bool:
    """Whether the '.' ending tokens[k - 1] ends a sentence: whitespace or the end of the text follows
    (so '3.5' and 'os.path' do not count)."""
    if k >= len(tokens) or tokenizer is None:
        return True
    first = tokenizer.decode([tokens[k - 1]])
    if first != first.rstrip():
        return True
    after = tokenizer.decode([tokens[k - 1], tokens[k]])[len(first):]
    return not after or after[0].isspace()


def sentence_boundaries(tokens: Sequence[int], ends, density: int = SENTENCE_DENSITY
                        ) -> tuple[str, Optional[list[int]]]:
    """(kind, positions): the indices k (1 <= k <= len) such that a sentence ends with tokens[k - 1].

    `ends` is a set of ids (the original's rule: those ids end sentences; kind 'period') or a `SentenceEnds`
    (from `period_token_ids`), where the kind is chosen per haystack, in this order: 'period' (the
    original's rule, every token ending in '.') when '.' followed by whitespace ends on average at least one
    sentence per `density` tokens; else 'other' (other scripts' ends such as '。', '！', '？', '!', '?'; a
    byte piece counts when the text of its last few tokens ends with one), else 'newline', at the same
    density; else the kind with the most boundaries. So '.'-separated English is placed exactly as by the
    original, Chinese at '。' even with a stray '3.5' in it, and code at line ends. With no boundary of any
    kind: ('token', None) -- any token boundary that splits no character -- said once (a warning).
    Worked example (ids: 8 = '。', 7 = a word, no '.'): [7, 8, 7, 8, 7] -> ('other', [2, 4])."""
    if not isinstance(ends, SentenceEnds):
        return "period", [k for k in range(1, len(tokens) + 1) if tokens[k - 1] in ends]
    found = {kind: [] for kind in BOUNDARY_KINDS[:3]}
    tok, sentence_periods = ends.tokenizer, 0
    for k in range(1, len(tokens) + 1):
        t = tokens[k - 1]
        if t in ends:
            found["period"].append(k)
            sentence_periods += _period_ends_sentence(tokens, k, tok)
        elif t in ends.other:
            found["other"].append(k)
        elif t in ends.partial and tok is not None:
            tail = tok.decode(list(tokens[max(0, k - 4):k])).rstrip()
            if tail.endswith(OTHER_TERMINATORS) and is_char_boundary(tokens, k, tok):
                found["other"].append(k)
        if t in ends.newline:
            found["newline"].append(k)
    counts = dict(period=sentence_periods, other=len(found["other"]), newline=len(found["newline"]))
    dense = [kind for kind in counts if counts[kind] and counts[kind] * density >= len(tokens)]
    kind = dense[0] if dense else max(counts, key=lambda name: (counts[name], -BOUNDARY_KINDS.index(name)))
    if not counts[kind]:
        if "token" not in _WARNED:
            _WARNED.add("token")
            warnings.warn("needle: the haystack has no sentence ends ('.', '\u3002', '!', '?', ... or newlines); "
                          "needles go at the token boundary at or before their depth (whole characters kept)",
                          stacklevel=3)
        return "token", None
    return kind, found[kind]


def insertion_point(haystack: Sequence[int], depth_percent: float, period_ids,
                    boundaries: Optional[tuple[str, Optional[list[int]]]] = None) -> int:
    """Index where a needle at depth_percent goes: just after the last sentence end at or before
    int(len * depth / 100) (sentence ends as `sentence_boundaries(haystack, period_ids)`, or `boundaries`
    when given); 0 if none; len for depth 100. With no sentence ends at all: that token index, moved back to
    a whole character.

    >>> insertion_point([5, 9, 5, 5, 9, 5, 5], 80, {9})    # int(7 * 0.8) = 5 -> back to after the 9 at 4
    5
    """
    n = len(haystack)
    if depth_percent >= 100:
        return n
    point = int(n * depth_percent / 100)
    kind, positions = boundaries or sentence_boundaries(haystack, period_ids)
    if kind == "token":
        tok = getattr(period_ids, "tokenizer", None)
        while point > 0 and not is_char_boundary(haystack, point, tok):
            point -= 1
        return point
    i = bisect.bisect_right(positions, point)
    return positions[i - 1] if i else 0


def insert_needles(haystack: Sequence[int], needles: Sequence[tuple[Sequence[int], float]], context_length: int,
                   period_ids, buffer: int = FINAL_CONTEXT_LENGTH_BUFFER) -> tuple[list[int], list[int]]:
    """Cut the haystack to context_length - buffer - (needle tokens) and put each (needle tokens, depth %)
    at its depth of the cut haystack (`insertion_point`). Returns (tokens, start index of each needle in
    `tokens`). With a `SentenceEnds` (which knows the tokenizer), the cut never splits a character: the end
    moves back, and tokens that continue a character begun before the haystack's start are dropped, so the
    decoded prompt holds no U+FFFD.

    >>> insert_needles([5, 9, 5, 9, 5, 5], [([7, 7], 50)], context_length=6, period_ids={9}, buffer=0)
    ([5, 9, 7, 7, 5, 9], [2])
    """
    budget = context_length - buffer - sum(len(t) for t, _ in needles)
    if budget < 0:
        raise ValueError(f"context length {context_length} leaves no room for the haystack after the "
                         f"{buffer}-token buffer and {sum(len(t) for t, _ in needles)} needle tokens")
    base = list(haystack[:budget])
    tok = getattr(period_ids, "tokenizer", None)
    if tok is not None:
        first = 0            # a character begun before the haystack's start: drop its last bytes (<= 3)
        while first < min(3, len(base)) and tok.decode(base[first:first + 6]).startswith(REPLACEMENT):
            first += 1
        end = len(base)
        while end > first and end < len(haystack) and not is_char_boundary(haystack, end, tok):
            end -= 1
        base = base[first:end]
    bounds = sentence_boundaries(base, period_ids)
    points = [insertion_point(base, depth, period_ids, bounds) for _, depth in needles]
    order = sorted(range(len(needles)), key=lambda i: (points[i], i))
    tokens, starts, prev = [], [0] * len(needles), 0
    for i in order:
        tokens.extend(base[prev:points[i]])
        starts[i] = len(tokens)
        tokens.extend(needles[i][0])
        prev = points[i]
    tokens.extend(base[prev:])
    return tokens, starts


def encode_needle(tokenizer, city: str, number: str) -> list[int]:
    return tokenizer.encode(NEEDLE.format(city=city, number=number))


def build_prompt(tokenizer, context_tokens: Sequence[int], question: str, template: str = TEMPLATE) -> list[int]:
    """BOS + the template holding the context (decoded from tokens) and the question."""
    text = template.format(context=tokenizer.decode(context_tokens), question=question)
    return [tokenizer.bos_id] + tokenizer.encode(text)


def score(response: str, answer: str) -> bool:
    """The original's criterion: the response contains the number."""
    return answer in response


# ------------------------------------------------------------------------------------------ trials

def single_needle_trials(haystacks: Sequence[Sequence[int]], tokenizer, lengths: Sequence[int],
                         depths: Sequence[float], rng: random.Random,
                         buffer: int = FINAL_CONTEXT_LENGTH_BUFFER, done: frozenset = frozenset()) -> list[dict]:
    """One trial per (length, depth, round): a fresh random city and number, the needle at that depth of
    round's haystack. Trials whose (context_length, depth_percent, seed) is in `done` are skipped."""
    periods = period_token_ids(tokenizer)
    trials = []
    for length in lengths:
        for depth in depths:
            for seed, haystack in enumerate(haystacks):
                city, number = rng.choice(CITIES), random_number(rng)
                if (int(length), float(depth), seed) in done:
                    continue
                needle = encode_needle(tokenizer, city, number)
                context, starts = insert_needles(haystack, [(needle, depth)], length, periods, buffer)
                prompt = build_prompt(tokenizer, context, QUESTION.format(city=city))
                trials.append(dict(context_length=int(length), depth_percent=float(depth), seed=seed, city=city,
                                   answer=number, needle_token_index=starts[0], context_tokens=len(context),
                                   prompt=prompt))
    return trials


def multi_needle_trials(haystacks: Sequence[Sequence[int]], tokenizer, lengths: Sequence[int],
                        depths: Sequence[float], rng: random.Random, n_needles_total: int, n_needles_retrieve: int,
                        buffer: int = FINAL_CONTEXT_LENGTH_BUFFER, done: frozenset = frozenset()) -> list[dict]:
    """One trial per (length, round): n_needles_total needles for distinct cities at distinct random depths
    (drawn from `depths`), and a question asking for n_needles_retrieve of them."""
    if not 1 <= n_needles_retrieve <= n_needles_total:
        raise ValueError(f"need 1 <= n_needles_retrieve={n_needles_retrieve} <= n_needles_total={n_needles_total}")
    if n_needles_total > len(depths):
        raise ValueError(f"n_needles_total={n_needles_total} needles need as many distinct depths; "
                         f"n_document_depth_intervals gives {len(depths)}")
    periods = period_token_ids(tokenizer)
    trials = []
    for length in lengths:
        for seed, haystack in enumerate(haystacks):
            cities = rng.sample(CITIES, n_needles_total)
            needle_depths = rng.sample(list(depths), n_needles_total)
            numbers = [random_number(rng) for _ in cities]
            asked = rng.sample(cities, n_needles_retrieve)
            if (int(length), seed) in done:
                continue
            needles = [(encode_needle(tokenizer, c, n), d) for c, n, d in zip(cities, numbers, needle_depths)]
            context, starts = insert_needles(haystack, needles, length, periods, buffer)
            if len(asked) == 1:
                question = MULTI_QUESTION_ONE.format(city=asked[0])
            else:
                question = MULTI_QUESTION.format(cities=", ".join(asked[:-1]) + ", and " + asked[-1])
            info = {c: [n, float(d)] for c, n, d in zip(cities, numbers, needle_depths)}
            trials.append(dict(context_length=int(length), seed=seed, needles_info=info, question=question,
                               cities_to_retrieve=asked, answer=[info[c][0] for c in asked],
                               depth_percent=[info[c][1] for c in asked], context_tokens=len(context),
                               prompt=build_prompt(tokenizer, context, question, MULTI_TEMPLATE)))
    return trials


@dataclasses.dataclass(frozen=True)
class OriginalNeedle(EvalTask):
    """A task of the runner over the trials of `single_needle_trials` / `multi_needle_trials` (grid length:
    context_length). Scoring: the original's criterion, `score`, per asked number."""

    def length(self, sample: dict) -> int:
        return sample["context_length"]

    def record(self, sample, response, new_tokens, prompt) -> dict:
        answer = sample["answer"]
        correct = [score(response, a) for a in answer] if isinstance(answer, list) else score(response, answer)
        out = {k: v for k, v in sample.items() if k != "prompt"}
        out.update(response=response, correct=correct, prompt_tokens=len(prompt))
        return out


SINGLE = register(OriginalNeedle("needle", max_new_tokens=32))
MULTI = register(OriginalNeedle("needle_multi", max_new_tokens=128))
