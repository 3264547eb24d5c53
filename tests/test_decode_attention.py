"""KV-cache attention: prefill + token-by-token decoding equals one dense causal pass over the sequence.

Checked on one device (impl 'blockwise' and 'dense') and with the cache sharded over sp=4 (impl 'ring'),
with left padding (segment 0) that real tokens must not see, and a prefill chunk that straddles two cache
shards. Negative controls: dropping the padding ids, or writing at the wrong index, fails the check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import cached_attention, dense_attention
from lwm.attention.decode import write_rows
from _data_fixtures import rel_err

RTOL = 1e-5
B, T, N, K, H, S = 2, 14, 4, 2, 16, 16
PREFILL = 6  # slots 0..5: straddles the first two shards of a 16-slot cache over sp=4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
    )
    seg = jnp.asarray([[0] * 3 + [1] * (T - 3), [1] * T], jnp.int32)  # row 0 is left-padded by 3
    want = dense_attention(q, k, v, seg, causal=True)
    return dict(q=q, k=k, v=v, seg=seg, want=want, real=np.asarray(seg)[..., None, None] > 0)


def decode_all(data, impl, seg=None, decode_shift=0):
    """Prefill PREFILL tokens, then feed the rest one at a time; returns (B, T, N, H) and the final cache."""
    seg = data["seg"] if seg is None else seg
    step = jax.jit(lambda *a: cached_attention(*a, impl=impl, q_chunk=8, k_chunk=4))
    cache = (jnp.zeros((B, S, K, H)), jnp.zeros((B, S, K, H)), jnp.zeros((B, S), jnp.int32))
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
    np.testing.assert_array_equal(np.asarray(cache[0][:, :T]), np.asarray(data["k"]))


@pytest.mark.parametrize("impl", ["blockwise", "dense"])
def test_decode_one_device_matches_full_pass(data, impl):
    out, cache = decode_all(data, impl)
    assert_decode_matches(data, out, cache)


def test_decode_cache_sharded_over_sp(data):
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 1, 4), ("dp", "fsdp", "tp", "sp"))
    with jax.set_mesh(mesh):
        out, cache = decode_all(data, "ring")
    assert_decode_matches(data, out, cache)
    assert cache[0].sharding.spec[1] == "sp"


def test_decode_cache_sharded_over_dp_tp_sp(data):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 2, 2), ("dp", "fsdp", "tp", "sp"))
    with jax.set_mesh(mesh):
        out, cache = decode_all(data, "ring_pallas")  # decode uses the jnp path for every impl
    assert_decode_matches(data, out, cache)


def test_decode_negative_controls(data):
    """Ignoring the left padding, or decoding each token one slot early (so it overwrites the previous
    token's keys), must fail the same check."""
    real = data["real"]
    out, _ = decode_all(data, "blockwise", seg=jnp.ones_like(data["seg"]))
    assert rel_err(out * real, data["want"] * real) > 1e-2
    out, _ = decode_all(data, "blockwise", decode_shift=-1)
    assert rel_err(out * real, data["want"] * real) > 1e-2


def test_write_rows_drops_out_of_range_slots():
    cache = jnp.zeros((1, 4), jnp.int32)
    np.testing.assert_array_equal(write_rows(cache, jnp.array([[7, 8]]), jnp.array([3, 4])), [[0, 0, 0, 7]])
    np.testing.assert_array_equal(
        write_rows(cache, jnp.array([[7, 8]]), jnp.array([-1, 0])), [[8, 0, 0, 0]]
    )  # a negative slot must not wrap to the end


def test_cached_attention_validates(data):
    q, k, v = data["q"][:, :1], data["k"][:, :1], data["v"][:, :1]
    cache = (jnp.zeros((B, S, K, H)), jnp.zeros((B, S, K, H)), jnp.zeros((B, S), jnp.int32))
    with pytest.raises(ValueError, match=r"unknown attention impl 'paged'.*allowed values"):
        cached_attention(q, k, v, *cache, None, 0, impl="paged")
    with pytest.raises(ValueError, match="cache_segment_ids must have shape"):
        cached_attention(q, k, v, *cache[:2], cache[2][:, :8], None, 0, impl="dense")
    with pytest.raises(ValueError, match="mesh with an 'sp' axis"):
        cached_attention(q, k, v, *cache, None, 0, impl="ring")
