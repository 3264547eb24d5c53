"""Plain helpers the tests call (no fixtures, no tests: the fixtures are in tests/conftest.py and
tests/<package>/conftest.py). tests/ is on sys.path (pytest puts the folder of tests/conftest.py there), so a
test writes `from support import rel_err`.

Here: the attention tests' parity measure and value-and-gradients helper; a small word list, random sentences
from it and a 400-piece sentencepiece tokenizer trained on 400 of them (the `tok` fixture); the greedy prompts of
the tiny engine (the `sampler` fixture); a free loopback port and the environment of a CPU subprocess (the
multi-process tests). The server helpers are in support/serving.py, the `python -m lwm.train` subprocess
helpers in support/train_runs.py."""
import os
import random
import socket

import jax
import numpy as np

from lwm.text.tokenizer import train_sentencepiece

WORDS = ("the quick brown fox jumps over a lazy dog while world models read long videos and text "
         "in one million token context with ring attention packing").split()

# The tiny engine of tests/conftest.py (`sampler`, `greedy_batch`): its end and pad ids, three prompts of
# 5, 13 and 2 token ids (so a batch is left-padded), and how many tokens `greedy_batch` generates.
EOS, PAD = 2, 0
PROMPTS = [[1, 17, 250, 33, 9], [1, 300, 5, 77, 123, 99, 4, 8, 201, 6, 45, 11, 12], [1, 402]]
NEW = 10


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the parity measure of the attention and model tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def value_and_grads(fn, q, k, v, do):
    """fn(q, k, v) and the gradients of <fn(q, k, v), do> with respect to q, k, v: (out, dq, dk, dv)."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def sentence(rng, lo=2, hi=30):
    """lo..hi words of WORDS drawn with `rng` (a random.Random), joined by spaces."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def small_tokenizer(directory):
    """A tokenizer trained on 400 sentences (random.Random(0)), written to `directory`/tokenizer.model."""
    rng = random.Random(0)
    path = directory / "tokenizer.model"
    return train_sentencepiece([sentence(rng) for _ in range(400)], str(path), vocab_size=400)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a jax.distributed coordinator or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_subprocess_env(workdir, devices: int) -> dict:
    """Environment of a subprocess on `devices` simulated CPU devices, sharing a compilation cache in workdir."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                NPROC="32", JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_module(name, argv, capsys):
    """(exit status, stdout, stderr) of `python -m name argv...`, run in this process (runpy) with pytest's
    capsys capturing its output."""
    import runpy
    import sys

    old = sys.argv
    sys.argv = [name] + list(argv)
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=False)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err
