"""The chunked prefill (`Engine.prefill(..., chunk=)`: the prompt at slots [0, n), chunks of C tokens each
attending to the cache so far and causally to themselves through the decode pass) against the whole prefill
(one left-padded forward with the configured kernel and sp strategy), fp32: the next-token logits within 1e-5
(and the cache's keys and values), and the greedy tokens of `generate(..., prefill_chunk=C)` equal to
`generate`'s, for every attention_impl that runs on CPU (dense, blockwise, pallas in interpret mode, ring) and
every context-parallel strategy and load balance (ring / all_gather / ulysses / ulysses_ring; none / zigzag /
striped) under sp = 2 or 4 of the 8 simulated devices; the int8 cache (chunking does not change what is read:
chunk C equals chunk 1 within 1e-5; against the whole prefill, which attends in full precision, within
test_quantized_cache's int8 bound). Negative controls: the same chunk loop with the later chunks' positions
shifted by one, or each chunk given an empty cache (attending to itself only), misses the whole prefill's
logits by over 100x the tolerance.

Tiny preset (sharp head: greedy choices far from ties), a 53-token prompt (not a multiple of the chunk or of
sp: the last chunk is padded), chunk 16, decode chunks of 8 slots, 6 new tokens."""
import contextlib

import jax
import numpy as np
import pytest

from lwm.inference.engine import Engine
from lwm.model.llama import LLaMAForCausalLM
from lwm.parallel.sharding import make_mesh, match_partition_rules, named_shardings

EOS, PAD, NEW, CHUNK, TOL = 2, 0, 6, 16, 1e-5
INT8_BOUND = 0.03                       # tests/inference/test_quantized_cache.py LOGIT_BOUND['int8']
PROMPT = [1] + [int(x) for x in np.random.default_rng(11).integers(3, 500, 52)]      # 53 tokens

# (id, sp, config fields): every attention_impl that runs on CPU, every strategy and every layout once.
CASES = [
    ("dense", 1, dict(attention_impl="dense", scan_attention=False)),
    ("blockwise", 1, dict(attention_impl="blockwise")),
    ("pallas-interpret", 1, dict(attention_impl="pallas", pallas_interpret=True)),
    ("ring-zigzag-sp2", 2, dict(attention_impl="ring", context_parallel_load_balance="zigzag")),
    ("all_gather-striped-sp2", 2, dict(attention_impl="ring", context_parallel_strategy="all_gather",
                                       context_parallel_load_balance="striped")),
    ("ulysses-none-sp2", 2, dict(attention_impl="ring", context_parallel_strategy="ulysses")),
    ("ulysses_ring-zigzag-sp4", 4, dict(attention_impl="ring", context_parallel_strategy="ulysses_ring",
                                        context_parallel_ulysses_size=2, context_parallel_load_balance="zigzag")),
]


@pytest.fixture(scope="module")
def base(tiny_sharp_head):
    cfg, _, params = tiny_sharp_head
    return cfg.replace(max_sequence_length=128, decode_chunk_size=8), params


def _engine(cfg, params, mesh=None, cache_dtype=None):
    if mesh is not None:
        params = jax.device_put(params, named_shardings(match_partition_rules(params, cfg), mesh))
    return Engine(LLaMAForCausalLM(cfg), params, eos_id=EOS, pad_id=PAD, cache_dtype=cache_dtype)


def _logits(prefix) -> np.ndarray:
    return np.asarray(jax.device_get(prefix.logits))[0]


def _whole(engine, prompt):
    """The whole prefill as `generate` runs it (the same compile): (logits (V,), cache, padded length t)."""
    data, sp = engine.mesh_sizes()
    t = engine.padded_length(len(prompt))
    logits, cache = engine.prefill_batch([prompt] * data, t, t + sp * -(-NEW // sp))
    return np.asarray(jax.device_get(logits))[0], cache, t


@pytest.mark.parametrize("name,sp,fields", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_whole(base, name, sp, fields):
    """Logits within 1e-5; the cache's keys and values too (the whole prefill's prompt sits at slots
    [t - n, t), left-padded; the chunked one's at [0, n)); the greedy tokens equal."""
    cfg, params = base
    cfg = cfg.replace(**fields)
    mesh = make_mesh(f"1,1,1,{sp}", jax.devices()[:sp]) if sp > 1 else None
    n = len(PROMPT)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        engine = _engine(cfg, params, mesh)
        whole, whole_cache, t = _whole(engine, PROMPT)
        chunked = engine.prefill(PROMPT, chunk=CHUNK)
        want = engine.generate([PROMPT], NEW).tokens[0]
        got = engine.generate([PROMPT], NEW, prefill_chunk=CHUNK).tokens[0]
    assert chunked.length == n and chunked.position == n
    np.testing.assert_allclose(_logits(chunked), whole, rtol=0, atol=TOL)
    for key in ("k", "v"):
        a, b = (np.asarray(jax.device_get(c[key]))[:, :1] for c in (whole_cache, chunked.cache))
        np.testing.assert_allclose(b[:, :, :, :n], a[:, :, :, t - n:t], rtol=0, atol=TOL, err_msg=key)
    assert got == want and len(want) == NEW


def test_int8_cache(base):
    """int8 cache: the chunked prefill reads earlier chunks (and its own) back quantized, per token, so chunk C
    equals chunk 1 (the decode pass token by token) within 1e-5; the whole prefill attends in full precision,
    so against it the bound is the int8 cache's (stated in test_quantized_cache), and the greedy tokens agree."""
    cfg, params = base
    engine = _engine(cfg, params, cache_dtype="int8")
    whole, _, _ = _whole(engine, PROMPT)
    chunked = _logits(engine.prefill(PROMPT, chunk=CHUNK))
    np.testing.assert_allclose(chunked, _logits(engine.prefill(PROMPT, chunk=1)), rtol=0, atol=TOL)
    diff = float(np.abs(chunked - whole).max())
    assert TOL < diff < INT8_BOUND                    # quantized (not exact), within the int8 bound
    assert engine.generate([PROMPT], NEW, prefill_chunk=CHUNK).tokens == engine.generate([PROMPT], NEW).tokens


def _chunk_loop(engine, prompt, chunk, *, shift=0, fresh_cache=False) -> np.ndarray:
    """The chunked prefill's loop (lwm.inference.engine.ChunkedPrefill.step) written out, with one fault:
    the positions of every chunk after the first shifted by `shift` (a shift of all positions alike would
    change nothing: RoPE scores depend on position differences only), or each chunk given an empty cache (it
    attends to itself only)."""
    n = len(prompt)
    empty = lambda: engine._empty_jit(rows=1, length=engine.padded_length(n))
    cache, logits = empty(), None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        ids = np.full((1, chunk), PAD, np.int32)
        ids[0, :end - start] = prompt[start:end]
        seg = np.zeros((1, chunk), np.int32)
        seg[0, :end - start] = 1
        pos = np.arange(start, start + chunk, dtype=np.int32)[None] + (shift if start else 0)
        if fresh_cache:
            cache = empty()
        logits, cache = engine._chunk_jit(engine.params, cache, ids, None, seg, pos, np.int32(start),
                                          np.int32(end - 1 - start), head="text")
    return np.asarray(logits)[0]


def test_negative_controls_miss_the_whole_prefill(base):
    cfg, params = base
    engine = _engine(cfg, params)
    whole, _, _ = _whole(engine, PROMPT)
    # The loop as written equals the engine's chunked prefill, so each control differs by its fault alone.
    np.testing.assert_allclose(_chunk_loop(engine, PROMPT, CHUNK), _logits(engine.prefill(PROMPT, chunk=CHUNK)),
                               rtol=0, atol=1e-6)
    assert float(np.abs(_chunk_loop(engine, PROMPT, CHUNK) - whole).max()) < TOL
    for fault in (dict(shift=1), dict(fresh_cache=True)):
        assert float(np.abs(_chunk_loop(engine, PROMPT, CHUNK, **fault) - whole).max()) > 100 * TOL, fault
