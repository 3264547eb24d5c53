"""What tests/test_data.py and tests/test_data_packing.py share: a small word list, random sentences from
it, and a 400-piece sentencepiece tokenizer trained on 400 of them (each module's `tok` fixture)."""
import random

from lwm.tokenizer import train_sentencepiece

WORDS = ("the quick brown fox jumps over a lazy dog while world models read long videos and text "
         "in one million token context with ring attention packing").split()


def sentence(rng, lo=2, hi=30):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def small_tokenizer(directory):
    """A tokenizer trained on 400 sentences (random.Random(0)), written to `directory`/tokenizer.model."""
    rng = random.Random(0)
    path = directory / "tokenizer.model"
    return train_sentencepiece([sentence(rng) for _ in range(400)], str(path), vocab_size=400)
