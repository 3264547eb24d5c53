"""Fixtures of the training tests: `corpus`, the folder that `python -m lwm.train` runs read
(tests/support/train_runs.py has the helpers that run it)."""
import json
import random

import pytest

from support import WORDS
from support.train_runs import FAULT_WRAPPER


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with tokenizer.model (300 pieces, trained on 400 random sentences of 5-40 words), text.jsonl (300
    such sentences), vision.jsonl (200 captions with 2 frames of 4 codes, fields order alternating),
    fault_wrapper.py (support.train_runs.FAULT_WRAPPER) and an empty jax_cache/ (the runs' compilation cache)."""
    from lwm.text.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
    train_sentencepiece([sentence() for _ in range(400)], str(d / "tokenizer.model"), vocab_size=300)
    with open(d / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": sentence()}) + "\n" for _ in range(300))
    with open(d / "vision.jsonl", "w") as f:
        for i in range(200):
            start = rng.randrange(16)
            f.write(json.dumps({"caption": " ".join(rng.choice(WORDS) for _ in range(6)),
                                "vision": [(start + j) % 16 for j in range(8)],     # 2 frames of 4 codes
                                "fields": "[caption],vision" if i % 2 else "vision,caption"}) + "\n")
    (d / "fault_wrapper.py").write_text(FAULT_WRAPPER)
    (d / "jax_cache").mkdir()
    return d
