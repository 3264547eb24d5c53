"""Test setup and the fixtures that tests of several packages share.

Setup: 8 simulated CPU devices, set before JAX is imported anywhere, and NPROC=32: XLA:CPU runs the simulated
devices' concurrent collectives on a pool of NPROC threads (default: the core count); on 2 cores a ring step can
then wait on itself. Must be set before JAX creates its CPU client.

Fixtures here: `tok` (the small sentencepiece tokenizer), `tiny_sharp_head`, `sampler` and `greedy_batch` (a tiny
text model and its engine), `golden_workdir` (the files every entry point reads, as tests/golden/cases.py makes
them). Package-local fixtures are in tests/<package>/conftest.py; plain helpers in tests/support/.
"""
import os

from golden.cases import setup_env   # imports no JAX: the 8 devices, NPROC and offline hubs, set once here

setup_env()
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, shared by both xdist workers and every subprocess a test starts (they
# inherit the environment): the suite compiles the same tiny programs in many tests and processes (a resumed
# lwm.train run compiles what the killed one did), and on 2 CPU cores compiling is most of its time. A hit
# returns the executable XLA would build again, so no result depends on it; in-process jit caches (the
# `_cache_size()` counts some tests read) are unaffected.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"lwm-tests-jax-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The small tokenizer (support.small_tokenizer): 400 pieces trained on 400 random sentences of
    support.WORDS. A test that needs other words in its vocabulary trains its own, under another name."""
    from support import small_tokenizer

    return small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_sharp_head():
    """(cfg, model, params): the tiny text preset (max_sequence_length 64), random init (PRNGKey(0)), the output
    head scaled by 8 so that greedy choices are far from ties (float noise cannot flip them)."""
    import jax
    import jax.numpy as jnp

    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    cfg = LLaMAConfig.load("tiny").replace(max_sequence_length=64)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    return cfg, model, params


@pytest.fixture(scope="module")
def sampler(tiny_sharp_head):
    """The engine of tiny_sharp_head, one device, ids support.EOS and support.PAD."""
    from lwm.inference.engine import Engine
    from support import EOS, PAD

    _, model, params = tiny_sharp_head
    return Engine(model, params, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def greedy_batch(sampler):
    """The sampler's greedy tokens for support.PROMPTS, support.NEW new tokens each (one batch)."""
    from support import NEW, PROMPTS

    return sampler.generate(PROMPTS, NEW).tokens


@pytest.fixture(scope="module")
def golden_workdir(tmp_path_factory):
    """A folder (str) as tests/golden/cases.py's make_workdir writes it: tokenizer.model, haystack.jsonl, a tiny
    text checkpoint (params), picture.png and clip.mp4; plus an empty jax_cache/ for subprocesses."""
    from golden import cases

    d = cases.make_workdir(str(tmp_path_factory.mktemp("golden")))
    os.makedirs(os.path.join(d, "jax_cache"), exist_ok=True)
    return d
