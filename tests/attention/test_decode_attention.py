"""KV-cache attention: prefill + token-by-token decoding equals one dense causal pass over the sequence.

Checked on one device (impl 'blockwise' and 'dense') and with the cache sharded over sp=4 (impl 'ring'),
with left padding (segment 0) that real tokens must not see, a prefill chunk that straddles two cache
shards, a cache of two layers (the other layer untouched) and rows at different fill lengths (per-row
index). Negative controls: dropping the padding ids, or writing at the wrong index, fails the check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import cached_attention, dense_attention
from lwm.attention.decode import write_kv, write_segments
from support import rel_err

RTOL = 1e-5
B, T, N, K, H, S = 2, 14, 4, 2, 16, 16
L, LAYER = 2, 1  # a two-layer cache; the test writes and reads layer 1 only
PREFILL = 6  # slots 0..5: straddles the first two shards of a 16-slot cache over sp=4


@pytest.fixture(scope="module")
def decode_data():
    """Not the shared `data` (tests/attention/conftest.py): no segments drawn at random but row 0 left-padded by
    3 (as a batch of prompts is), and the dense causal output `want` to compare decoding with."""
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
    )
    seg = jnp.asarray([[0] * 3 + [1] * (T - 3), [1] * T], jnp.int32)  # row 0 is left-padded by 3
    want = dense_attention(q, k, v, seg, causal=True)
    return dict(q=q, k=k, v=v, seg=seg, want=want, real=np.asarray(seg)[..., None, None] > 0)


def decode_all(data, impl, seg=None, decode_shift=0, chunk=4):
    """Prefill PREFILL tokens, then feed the rest one at a time; returns (B, T, N, H) and the final cache
    (k, v (L, B, K, S, H), segment ids (B, S))."""
    seg = data["seg"] if seg is None else seg

    def one(q, k, v, ck, cv, cs, qs, index):
        cs = write_segments(cs, qs, index)
        out, ck, cv = cached_attention(q, k, v, ck, cv, cs, qs, index, LAYER, impl=impl, k_chunk=chunk)
        return out, ck, cv, cs

    step = jax.jit(one)
    cache = (jnp.zeros((L, B, K, S, H)), jnp.zeros((L, B, K, S, H)), jnp.zeros((B, S), jnp.int32))
    outs = []
    for lo, hi in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, T)]:
        index = lo if lo == 0 else lo + decode_shift
        out, *cache = step(
            data["q"][:, lo:hi], data["k"][:, lo:hi], data["v"][:, lo:hi], *cache, seg[:, lo:hi], index
        )
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


def assert_decode_matches(data, out, cache):
    real = data["real"]
    assert rel_err(out * real, data["want"] * real) < RTOL  # real tokens (padding rows are don't-care)
    assert rel_err(out, data["want"]) < RTOL  # padding attends only to padding, exactly as in dense
    np.testing.assert_array_equal(np.asarray(cache[2][:, :T]), np.asarray(data["seg"]))
    np.testing.assert_array_equal(np.asarray(cache[2][:, T:]), 0)  # slots past the end stay empty
    np.testing.assert_array_equal(np.asarray(cache[0][LAYER, :, :, :T]), np.asarray(data["k"]).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(np.asarray(cache[0][1 - LAYER]), 0)  # the other layer is untouched


@pytest.mark.parametrize("impl,chunk", [("blockwise", 4), ("dense", 16), ("blockwise", 5)])
def test_decode_one_device_matches_full_pass(decode_data, impl, chunk):
    """chunk 5 does not divide S = 16: the last chunk overlaps the one before, and must not count twice."""
    out, cache = decode_all(decode_data, impl, chunk=chunk)
    assert_decode_matches(decode_data, out, cache)


def test_decode_cache_sharded_over_sp(decode_data):
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 1, 4), ("dp", "fsdp", "tp", "sp"))
    with jax.set_mesh(mesh):
        out, cache = decode_all(decode_data, "ring", chunk=2)     # two chunks in each shard's 4 slots
    assert_decode_matches(decode_data, out, cache)
    assert cache[0].sharding.spec[3] == "sp"


def test_decode_cache_sharded_over_dp_tp_sp(decode_data):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 2, 2), ("dp", "fsdp", "tp", "sp"))
    with jax.set_mesh(mesh):
        out, cache = decode_all(decode_data, "ring_pallas")  # decode uses the jnp path for every impl
    assert_decode_matches(decode_data, out, cache)


def test_decode_negative_controls(decode_data):
    """Ignoring the left padding, or decoding each token one slot early (so it overwrites the previous
    token's keys), must fail the same check."""
    real = decode_data["real"]
    out, _ = decode_all(decode_data, "blockwise", seg=jnp.ones_like(decode_data["seg"]))
    assert rel_err(out * real, decode_data["want"] * real) > 1e-2
    out, _ = decode_all(decode_data, "blockwise", decode_shift=-1)
    assert rel_err(out * real, decode_data["want"] * real) > 1e-2


def test_rows_at_different_fill_lengths(decode_data):
    """Each row writes and reads at its own index: row 1 is decoded 5 slots later than row 0 (its first
    5 slots empty), one token at a time, and gets the same outputs as the dense pass over its tokens."""
    shift = np.array([0, 5])
    q, k, v = decode_data["q"], decode_data["k"], decode_data["v"]
    seg = jnp.ones((B, T), jnp.int32)
    want = dense_attention(q, k, v, seg, causal=True)

    def one(q, k, v, ck, cv, cs, qs, index):
        cs = write_segments(cs, qs, index)
        out, ck, cv = cached_attention(q, k, v, ck, cv, cs, qs, index, 0, impl="blockwise", k_chunk=4)
        return out, ck, cv, cs

    step = jax.jit(one)
    cache = (jnp.zeros((1, B, K, S + 5, H)), jnp.zeros((1, B, K, S + 5, H)), jnp.zeros((B, S + 5), jnp.int32))
    outs = []
    for t in range(T):
        out, *cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], *cache, seg[:, t:t + 1],
                           jnp.asarray(t + shift, jnp.int32))
        outs.append(out)
    assert rel_err(jnp.concatenate(outs, axis=1), want) < RTOL
    np.testing.assert_array_equal(np.asarray(cache[2])[1, :5], 0)
    # Negative control: the same shifted cache read with one shared index (row 1 five slots early) fails.
    out, *_ = step(q[:, :1], k[:, :1], v[:, :1], *cache, seg[:, :1], jnp.int32(T))
    assert rel_err(out[1], want[1, T - 1:T]) > 1e-2


def test_writes_drop_out_of_range_slots():
    cache = jnp.zeros((1, 4), jnp.int32)
    np.testing.assert_array_equal(write_segments(cache, jnp.array([[7, 8]]), 3), [[0, 0, 0, 7]])
    kv = jnp.zeros((1, 1, 1, 4, 1))
    new = jnp.array([[7.0, 8.0]]).reshape(1, 2, 1, 1)
    got = write_kv(kv, new, 0, jnp.array([[-1, 0]]))
    np.testing.assert_array_equal(got.reshape(-1), [8, 0, 0, 0])  # a negative slot must not wrap to the end


def test_cached_attention_validates(decode_data):
    q, k, v = decode_data["q"][:, :1], decode_data["k"][:, :1], decode_data["v"][:, :1]
    cache = (jnp.zeros((1, B, K, S, H)), jnp.zeros((1, B, K, S, H)), jnp.zeros((B, S), jnp.int32))
    with pytest.raises(ValueError, match=r"unknown attention impl 'paged'.*allowed values"):
        cached_attention(q, k, v, *cache, None, 0, impl="paged")
    with pytest.raises(ValueError, match="cache_segment_ids must have shape"):
        cached_attention(q, k, v, *cache[:2], cache[2][:, :8], None, 0, impl="dense")
    with pytest.raises(ValueError, match=r"must be \(L, B, K, S, H\)"):
        cached_attention(q, k, v, cache[0][0], cache[1][0], cache[2], None, 0, impl="blockwise")
    with pytest.raises(ValueError, match="mesh with an 'sp' axis"):
        cached_attention(q, k, v, *cache, None, 0, impl="ring")
