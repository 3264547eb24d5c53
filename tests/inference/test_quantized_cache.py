"""The int8 / fp8 KV cache (--cache_dtype int8 | fp8; lwm.attention.decode.quantize): values plus a float32
scale per token and kv head, dequantized chunk by chunk inside the decode read.

- round trip: int8 error <= scale / 2 per element, fp8 within its 3-bit mantissa; a per-tensor int8 scale on an
  outlier-heavy input exceeds the per-token bound (why the scale is per token and kv head);
- a greedy generation on the tiny sharp-head model: each step's logits, teacher-forced on the fp32 cache's
  tokens, stay within LOGIT_BOUND of the fp32 cache's, and their argmax is the fp32 cache's tokens;
  negative control: the same cache with the scales dropped (values rounded at scale 1) exceeds the bound;
- with the cache's slot axis over sp = 2 (ring decode) the int8 cache gives the sp = 1 tokens;
- the memory planner's KV bytes equal the arrays' nbytes (values + scales);
- Engine.insert / move carry the scales with their rows;
- one-line errors for an unknown name and for a backend that cannot compute the dtype.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.attention import decode
from lwm.model.llama import CACHE_ROW_AXIS, CacheMode, LLaMAForCausalLM, init_cache
from lwm.parallel.sharding import make_mesh
from lwm.utils import dtypes

PROMPT_LEN, NEW, CACHE_LEN = 12, 12, 32
# Max |logit difference| to the fp32 cache over the teacher-forced generation, measured on this model (tiny
# preset, lm_head x 8, |logits| <= 5.1, smallest top-1 / top-2 gap 0.026): int8 9.3e-3, fp8 5.1e-2 (e4m3 keeps
# 3 mantissa bits, int8 about 7). Each bound is the measured value with a margin of ~3x; the dropped-scale
# control measured 3.0 (2-core CPU, this workplace's machine).
LOGIT_BOUND = {"int8": 0.03, "fp8": 0.15}


@pytest.fixture(scope="module")
def tiny(tiny_sharp_head):
    """(cfg with 8-slot decode chunks, so the read crosses several chunks, params, prompts (2, PROMPT_LEN))."""
    cfg, _, params = tiny_sharp_head
    cfg = cfg.replace(decode_chunk_size=8)
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, PROMPT_LEN), 3, cfg.vocab_size)
    return cfg, params, ids


def _generate(cfg, params, ids, dtype, forced=None):
    """Greedy generation through the cache: (tokens (B, NEW) int, logits (B, NEW, V) of each step). forced:
    tokens (B, NEW) fed instead of the argmax (teacher forcing, so every dtype sees the same inputs)."""
    model = LLaMAForCausalLM(cfg)
    prefill = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, cache_mode=CacheMode.PREFILL))
    step = jax.jit(lambda p, x, c, i: model.apply({"params": p}, x, cache=c, cache_index=i,
                                                  cache_mode=CacheMode.DECODE))
    logits, cache = prefill(params, ids, init_cache(cfg, ids.shape[0], CACHE_LEN, dtype))
    logits = logits[:, -1]
    toks, outs = [], []
    for t in range(NEW):
        outs.append(logits)
        tok = jnp.argmax(logits, -1) if forced is None else jnp.asarray(forced[:, t])
        toks.append(tok)
        logits, cache = step(params, tok[:, None].astype(jnp.int32), cache, jnp.int32(PROMPT_LEN + t))
        logits = logits[:, 0]
    return np.stack([np.asarray(t) for t in toks], 1), np.stack([np.asarray(o) for o in outs], 1)


@pytest.fixture(scope="module")
def fp32_run(tiny):
    cfg, params, ids = tiny
    return _generate(cfg, params, ids, jnp.float32)


def test_round_trip_within_half_a_step():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 64, 16)) * jnp.exp(jax.random.normal(
        jax.random.PRNGKey(1), (4, 3, 64, 1)))                            # rows of very different magnitudes
    x = x.at[0, 0, 5, 3].set(80.0).at[2, 1, 0].set(0.0)                   # an outlier and an all-zero row
    q, scale = decode.quantize(x, jnp.int8)
    assert q.dtype == jnp.int8 and scale.shape == x.shape[:-1] and float(scale[2, 1, 0]) == 0.0
    err = jnp.abs(decode.dequantize(q, scale) - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12))
    q8, s8 = decode.quantize(x, jnp.float8_e4m3fn)
    err8 = jnp.abs(decode.dequantize(q8, s8) - x)
    # e4m3: 3 mantissa bits, half a step is 2^-4 relative for normals; subnormals step 2^-9 (of 448 * scale)
    assert bool(jnp.all(err8 <= jnp.maximum(2.0**-4 * jnp.abs(x), 2.0**-10 * s8[..., None]) * (1 + 1e-5)))
    assert float(err8.max()) > 0                                          # fp8 is lossy: the check is live
    # negative control: one int8 scale for the whole tensor (set by the outlier) breaks the per-row bound
    scale_t = jnp.max(jnp.abs(x)) / 127
    err_t = jnp.abs(jnp.round(x / scale_t) * scale_t - x)
    assert not bool(jnp.all(err_t <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12))


@pytest.fixture(scope="module")
def forced_runs(tiny, fp32_run):
    """name -> logits (B, NEW, V) of the int8 / fp8 cache, teacher-forced on the fp32 cache's greedy tokens."""
    cfg, params, ids = tiny
    return {name: _generate(cfg, params, ids, dtypes.parse_cache_dtype(name), forced=fp32_run[0])[1]
            for name in LOGIT_BOUND}


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_logits_within_bound_and_greedy_tokens_equal(fp32_run, forced_runs, name):
    """Same inputs at every step, so argmax(forced) == the fp32 tokens at every step means a free-running
    greedy generation with this cache makes exactly the fp32 cache's tokens (by induction over the steps)."""
    tokens, logits = fp32_run
    diff = float(np.abs(forced_runs[name] - logits).max())
    assert 0 < diff <= LOGIT_BOUND[name], diff                            # > 0: the cache really is quantized
    np.testing.assert_array_equal(forced_runs[name].argmax(-1), tokens)


def test_dropped_scales_exceed_the_bound(tiny, fp32_run, monkeypatch):
    """Negative control: int8 values written as round(x) with scale 1 (a cache quantized without scales)."""
    cfg, params, ids = tiny
    tokens, logits = fp32_run

    def no_scale(x, dtype):
        return jnp.clip(jnp.round(x.astype(jnp.float32)), -127, 127).astype(dtype), jnp.ones(x.shape[:-1])

    monkeypatch.setattr(decode, "quantize", no_scale)
    _, forced = _generate(cfg, params, ids, jnp.int8, forced=tokens)
    assert float(np.abs(forced - logits).max()) > max(LOGIT_BOUND.values())


def test_int8_cache_over_sp2_gives_the_sp1_tokens(tiny, fp32_run, forced_runs):
    """Free-running greedy with the int8 cache's slots over sp = 2 (ring decode, scales sharded like their
    values): the sp = 1 int8 tokens (== the fp32 tokens, previous test) and logits."""
    cfg, params, ids = tiny
    with jax.set_mesh(make_mesh("1,1,1,2", jax.devices()[:2])):
        got, got_logits = _generate(cfg.replace(attention_impl="ring"), params, ids, jnp.int8)
    np.testing.assert_array_equal(got, fp32_run[0])
    np.testing.assert_allclose(got_logits, forced_runs["int8"], atol=1e-4)


def test_planner_counts_the_arrays_bytes():
    from lwm.model.llama import LLaMAConfig
    from lwm.tools.memory_planner import Plan, estimate

    cfg = LLaMAConfig.load("tiny")
    for name, element in (("int8", 1), ("fp8", 1), ("bf16", 2), ("fp32", 4)):
        cache = jax.eval_shape(lambda: init_cache(cfg, 1, 96, dtypes.parse_cache_dtype(name)))
        arrays = sum(x.size * x.dtype.itemsize for n, x in cache.items() if n != "segment_ids")
        assert set(cache) == ({"k", "v", "segment_ids"} | ({"k_scale", "v_scale"} if element == 1 else set()))
        assert set(cache) <= set(CACHE_ROW_AXIS)
        plan = Plan(cfg, 64, new_tokens=32, cache_bytes=element)
        assert estimate(plan)["inference"]["kv_cache"] == arrays, name
    assert arrays > 0


def test_one_line_errors(monkeypatch, tiny_sharp_head):
    from lwm.inference.engine import Engine, parse_cache_dtype

    with pytest.raises(ValueError) as e:
        parse_cache_dtype("int4")
    assert str(e.value) == ("--cache_dtype='int4' is not one of bf16, bfloat16, float16, float32, float64, fp16, "
                            "fp32, fp64, fp8, int8")
    assert parse_cache_dtype("fp8") == np.dtype(jnp.float8_e4m3fn) and parse_cache_dtype("int8") == np.int8
    dtypes.check_cache_dtype_backend(jnp.float8_e4m3fn)                  # this CPU backend computes fp8
    _, model, params = tiny_sharp_head
    monkeypatch.setitem(dtypes._BACKEND_OK, (jax.default_backend(), "float8_e4m3fn"), False)  # a backend without
    with pytest.raises(ValueError) as e:
        Engine(model, params, eos_id=2, pad_id=0, cache_dtype="fp8")
    assert "\n" not in str(e.value) and str(e.value).startswith("--cache_dtype=float8_e4m3fn: the cpu backend")


def test_engine_insert_and_move_carry_the_scales(tiny_sharp_head):
    """Engine.insert and Engine.move copy every cache entry by its row axis (CACHE_ROW_AXIS): an int8 prompt's
    values and scales land in the slot it is inserted into and move with it; the other slots keep zero scales
    (the control: a copy that left the scales out would leave them zero in the target slot too)."""
    from lwm.inference.engine import Engine

    _, model, params = tiny_sharp_head
    engine = Engine(model, params, eos_id=2, pad_id=0, cache_dtype="int8")
    prefix = engine.prefill([1, 17, 250, 33, 9])
    t = prefix.length
    state = engine.insert(prefix, engine.init_state(2, 32), 1, max_new_tokens=4)
    for name in ("k", "v", "k_scale", "v_scale"):
        np.testing.assert_array_equal(np.asarray(state.cache[name][:, 1, :, :t]),
                                      np.asarray(prefix.cache[name][:, 0]))
    assert float(jnp.abs(state.cache["k_scale"][:, 1, :, t - 1]).min()) > 0
    assert float(jnp.abs(state.cache["k_scale"][:, 0]).max()) == 0
    want = {name: np.asarray(state.cache[name][:, 1]) for name in ("k", "v", "k_scale", "v_scale")}
    _, dst = engine.move(state, 1, engine.init_state(2, 32), 0)
    for name, rows in want.items():
        np.testing.assert_array_equal(np.asarray(dst.cache[name][:, 0]), rows)
    assert float(jnp.abs(dst.cache["v_scale"][:, 1]).max()) == 0
