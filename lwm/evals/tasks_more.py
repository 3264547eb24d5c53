"""Variable tracking, common- and frequent-word extraction, and multi-round co-reference (ideas from RULER's
task definitions and from multi-round co-reference resolution; code and wording ours). Protocol: `tasks.Task`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random
import re
import string

from lwm.evals import vocab
from lwm.evals.haystack import noise_haystack
from lwm.evals.tasks import Task, insert_at_depths

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


@dataclasses.dataclass(frozen=True)
class VariableTracking(Task):
    """Chains of assignments hidden in the noise haystack: "VAR QXZRT = 52817." then "VAR HBEWA = VAR QXZRT."
    and so on for `hops` hops, in text order at increasing random depths; `chains` chains, each with its
    own value, the first one asked for:
        Find all variables that are assigned the value 52817 in the text above.
    Scoring: match_all over the chain's variable names (hops + 1 of them), 0-100.
    Worked example (chain QXZRT -> HBEWA -> LMNOP): response "QXZRT, HBEWA" -> 2 of 3 -> 66.7
    """
    hops: int = 4
    chains: int = 2
    max_new_tokens: int = 48

    def make(self, seed, n_units, depth, haystack):
        rng = random.Random(seed)
        names = vocab.distinct(_var_name, rng, self.chains * (self.hops + 1))
        values = vocab.distinct(lambda r: vocab.random_number(r, 5), rng, self.chains)
        items = []
        for c in range(self.chains):
            chain = names[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            depths = sorted(rng.uniform(0, 100) for _ in chain)
            items.append((f"VAR {chain[0]} = {values[c]}.", depths[0]))
            items += [(f"VAR {chain[i]} = VAR {chain[i - 1]}.", depths[i]) for i in range(1, len(chain))]
        source = noise_haystack()
        context = " ".join(insert_at_depths(source.units(0, n_units), items))
        message = ("Memorize and track the chains of variable assignments hidden in the following text.\n"
                   f"{context}\nQuestion: Find all variables that are assigned the value {values[0]} in the text "
                   "above. Answer with the variable names only.")
        return dict(message=message, answers=names[:self.hops + 1], meta=dict(value=values[0]))

    def oracle(self, message):
        """Follows the assignments from the asked value (any order of statements)."""
        value = re.search(r"assigned the value (\d+) in the text", message).group(1)
        edges = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", message)
        found, frontier = [], {value}
        while frontier:
            new = [n for n, src in edges if src.replace("VAR ", "") in frontier and n not in found]
            found += new
            frontier = set(new)
        return " ".join(found)

    def random_answer(self, rng):
        return " ".join(_var_name(rng) for _ in range(self.hops + 1))


@dataclasses.dataclass(frozen=True)
class CommonWords(Task):
    """A numbered list of made-up words: `n_common` words appear `common_freq` times each, `n_units` other
    words `rare_freq` times each, shuffled:
        1. dakumo 2. sheli 3. dakumo ...
        What are the 10 most common words in the list above?
    Scoring: match_all over the n_common common words, 0-100.
    Worked example (common words dakumo, sheli, ... 10 in all): a response naming 7 of them -> 70.0
    """
    n_common: int = 10
    common_freq: int = 6
    rare_freq: int = 2
    max_new_tokens: int = 96

    def make(self, seed, n_units, depth, haystack):
        rng = random.Random(seed)
        words = vocab.distinct(vocab.pseudo_word, rng, self.n_common + n_units)
        common = words[:self.n_common]
        items = common * self.common_freq + words[self.n_common:] * self.rare_freq
        rng.shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        message = (f"Below is a numbered list of words. Some of them appear more often than others.\n{listing}\n"
                   f"Question: What are the {self.n_common} most common words in the list above? Answer with "
                   "the words only.")
        return dict(message=message, answers=common, meta={})

    def oracle(self, message):
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", message))
        return " ".join(w for w, _ in counts.most_common(self.n_common))

    def random_answer(self, rng):
        return " ".join(vocab.pseudo_word(rng) for _ in range(self.n_common))


@dataclasses.dataclass(frozen=True)
class FrequentWords(Task):
    """Coded text: `n_units` made-up words, the word of rank r appearing ceil(4 * n_units / r^2) times (a Zipf
    law with exponent 2, as RULER's), shuffled; the question asks for the `top` most frequent.
    Scoring: match_all over the top words, 0-100.
    Worked example (top words dakumo, sheli, trovi): response "dakumo trovi" -> 2 of 3 -> 66.7
    """
    top: int = 3
    min_units: int = 8                       # from 8 words up, counts of ranks 1..4 are strictly decreasing
    max_new_tokens: int = 32

    def make(self, seed, n_units, depth, haystack):
        rng = random.Random(seed)
        n_units = max(n_units, self.min_units)
        words = vocab.distinct(vocab.pseudo_word, rng, n_units)
        items = [w for r, w in enumerate(words, 1) for _ in range(math.ceil(4 * n_units / r ** 2))]
        rng.shuffle(items)
        message = ("Read the following coded text and keep track of how often each coded word appears.\n"
                   f"Text: {' '.join(items)}\nQuestion: What are the {self.top} most frequent coded words in the "
                   "text above? Answer with the words only.")
        return dict(message=message, answers=words[:self.top], meta={})

    def oracle(self, message):
        text = re.search(r"Text: (.*)\nQuestion:", message).group(1)
        return " ".join(w for w, _ in collections.Counter(text.split()).most_common(self.top))

    def random_answer(self, rng):
        return " ".join(vocab.pseudo_word(rng) for _ in range(self.top))


FORMS = ("poem", "riddle", "short story", "limerick", "haiku", "joke", "song", "letter")


@dataclasses.dataclass(frozen=True)
class CoReference(Task):
    """A transcript of `n_units` rounds "User: Write a {form} about {topic}.\\nAssistant: {reply}" where one
    request occurs `repeats` times (near-identical rounds, each with its own reply) among other requests;
    the question asks for the reply to the i-th of them (i random in 1..repeats):
        Return, exactly, the assistant's reply to the second request to write a poem about the meadow.
    Replies are codes "{word}-{word}-{4 digits}", unique in the transcript.
    Scoring: match_all over [that reply] (100 if the response contains it, else 0).
    Worked example (replies to the 'poem about meadow' requests: dakumo-sheli-4821, trovi-pala-1093; the
    second asked): "trovi-pala-1093" -> 100.0; "dakumo-sheli-4821" -> 0.0
    """
    repeats: int = 4
    min_units: int = 4
    max_new_tokens: int = 24

    def make(self, seed, n_units, depth, haystack):
        rng = random.Random(seed)
        n_units = max(n_units, self.repeats)
        form, topic = rng.choice(FORMS), vocab.random_word(rng)
        ordinal = rng.randrange(self.repeats)
        where = sorted(rng.sample(range(n_units), self.repeats))
        replies = vocab.distinct(lambda r: f"{vocab.pseudo_word(r)}-{vocab.pseudo_word(r)}-{r.randint(1000, 9999)}",
                                 rng, n_units)
        rounds = []
        for i in range(n_units):
            if i in where:
                f, t = form, topic
            else:
                f, t = rng.choice(FORMS), vocab.random_word(rng)
                while (f, t) == (form, topic):
                    f, t = rng.choice(FORMS), vocab.random_word(rng)
            rounds.append(f"User: Write a {f} about the {t}.\nAssistant: {replies[i]}")
        target = where[ordinal]
        message = ("Here is a transcript of earlier requests and replies.\n" + "\n".join(rounds) + "\n"
                   f"Question: Return, exactly, the assistant's reply to the {ORDINALS[ordinal]} request to write a "
                   f"{form} about the {topic}.")
        return dict(message=message, answers=[replies[target]], meta=dict(ordinal=ordinal + 1, round=target))

    def oracle(self, message):
        q = re.search(r"reply to the (\w+) request to write an? (.+) about the (\w+)\.$", message)
        ordinal, form, topic = ORDINALS.index(q.group(1)), q.group(2), q.group(3)
        replies = re.findall(rf"User: Write a {re.escape(form)} about the {re.escape(topic)}\.\nAssistant: (\S+)",
                             message)
        return replies[ordinal]

    def random_answer(self, rng):
        return f"{vocab.pseudo_word(rng)}-{vocab.pseudo_word(rng)}-{rng.randint(1000, 9999)}"
