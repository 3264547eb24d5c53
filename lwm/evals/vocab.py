"""Words, numbers, UUIDs and made-up words for the synthetic tasks; every draw goes through a caller's
`random.Random`, so a task's samples depend on its seed only (no download, no global state;
tests/test_one_home.py::test_vocab_draws_only_from_the_callers_rng).

    rng = random.Random(0)
    random_word(rng), random_number(rng), random_uuid(rng), pseudo_word(rng)
    # e.g. ('meadow', '5170231', '0f9c…-…', 'dakumo')
"""
from __future__ import annotations

import random
import uuid

# Common concrete English nouns and adjectives (written here; RULER draws keys from a word list the same way).
WORDS = tuple("""
able acid actor adult air album amber angle animal ankle apple april arch arm army arrow art aunt autumn
baby badge bag baker ball band bank barn basket bath beach bean bear bed bee bell belt bench berry bike bird
blade blanket boat body bone book boot bottle box brain branch bread brick bridge brush bucket button
cabin cable cake camel camera camp candle canvas cap car card carpet carrot castle cat cave chain chair chalk
cheese cherry chest chicken chin church circle city cliff clock cloud coast coat coffee coin comet copper corn
cotton cousin cow crane crayon cream crown cup curtain daisy dancer desert desk diamond dinner doctor dog
dolphin door dragon drawer dress drum duck eagle ear earth egg elbow engine eye fabric falcon farm feather
fence field finger fire fish flag flame flute fog forest fork fountain fox frame frog fruit garden gate ghost
giant glass glove goat gold grape grass guitar hammer hand harbor hat hawk heart helmet hill honey horse
hotel house ice island jacket jar jelly jewel kettle key king kitchen kite knee knife ladder lake lamp lemon
letter lion lizard lock lunch magnet maple marble meadow melon metal mirror monkey moon mountain mouse
nail needle nest night novel ocean office olive onion orange otter oven owl paint palace panda paper parrot
peach pearl pencil pepper piano pillow pilot planet plate plum pocket pond potato prince puzzle queen rabbit
radio rain ribbon rice ring river road robot rock roof rose ruler sail salt sand scarf school shadow sheep
shell ship shirt shoe silver singer sister sky snake snow soap sock sofa spider spoon star stone storm sugar
summer sun swan table tail teacher tent thunder tiger toast tomato tooth tower town train tree truck tulip
turtle umbrella valley vase violin wagon wall wallet water whale wheat wheel window wing winter wolf wood
yacht zebra
""".split())

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u")


def random_word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A `digits`-digit decimal number with no leading zero, as text."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4-shaped UUID drawn from `rng` (not from the OS), e.g. '6f1e0c2a-…'."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pseudo_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word of 2-3 syllables (e.g. 'dakumo'): an unlimited supply of distinct
    words that no model has a prior about (the coded words of the word-extraction tasks)."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables)))


def distinct(draw, rng: random.Random, n: int, avoid=()) -> list[str]:
    """n distinct values from draw(rng), none in `avoid`."""
    seen, out = set(avoid), []
    while len(out) < n:
        v = draw(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def draw_kind(kind: str, rng: random.Random) -> str:
    """One value of a kind: 'word', 'number' (7 digits) or 'uuid'."""
    if kind == "word":
        return random_word(rng)
    if kind == "number":
        return random_number(rng)
    if kind == "uuid":
        return random_uuid(rng)
    raise ValueError(f"unknown value kind {kind!r}; use word, number or uuid")
