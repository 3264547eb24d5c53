"""Dense reference vs an independent float64 loop, blockwise (jnp flash) vs dense, and the dispatch.

Relative error is ||a - b|| / ||b||; parity means < 1e-5 in float32, for the output and for the gradients
with respect to q, k and v. Negative controls (shuffled or dropped segment ids) must fail the same check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import ATTENTION_IMPLS, attention, blockwise, dense_attention
from lwm.attention.blockwise import blockwise_attention
from support import rel_err, value_and_grads

RTOL = 1e-5
B, T, N, K, H = 2, 72, 4, 2, 16  # T = 72 is not a multiple of the chunks below: padding is exercised


@jax.jit(static_argnames="causal")
def dense_value_and_grads(q, k, v, do, seg, causal):
    return value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v, do)


def loop_reference(q, k, v, seg, causal):
    """Attention written as plain float64 loops, one query at a time: the outside check on `dense`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    Bq, Tq, Nq, Hq = q.shape
    G = Nq // k.shape[2]
    out = np.zeros_like(q)
    for b in range(Bq):
        for n in range(Nq):
            for t in range(Tq):
                keys = [
                    s
                    for s in range(k.shape[1])
                    if (not causal or s <= t) and (seg is None or seg[b, s] == seg[b, t])
                ]
                if not keys:
                    continue
                scores = np.array([q[b, t, n] @ k[b, s, n // G] / np.sqrt(Hq) for s in keys])
                p = np.exp(scores - scores.max())
                out[b, t, n] = (p / p.sum()) @ v[b, keys, n // G]
    return out


def test_dense_matches_float64_loops(data):
    sl = slice(0, 24)
    q, k, v, seg = data["q"][:, sl], data["k"][:, sl], data["v"][:, sl], np.asarray(data["seg"][:, sl])
    for causal, s in [(True, seg), (False, None)]:
        want = loop_reference(q, k, v, s, causal)
        got = dense_attention(q, k, v, None if s is None else jnp.asarray(s), causal=causal)
        assert rel_err(got, want) < 1e-6
    # worked example of the docstring: the third token starts a new segment and sees only itself
    x = jnp.arange(1.0, 4.0).reshape(1, 3, 1, 1)
    out = dense_attention(x, x, x, jnp.array([[1, 1, 2]]), causal=True)
    assert float(out[0, 2, 0, 0]) == 3.0 and float(out[0, 0, 0, 0]) == 1.0


def test_dense_float64_stays_float64():
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 2, 8), jnp.float64)
        assert dense_attention(x, x[:, :, :1], x[:, :, :1]).dtype == jnp.float64


@pytest.mark.parametrize(
    "causal,use_seg,q_chunk,k_chunk",
    [
        (True, False, 16, 32),
        (True, True, 32, 16),
        (False, True, 16, 16),
        (False, False, 128, 128),  # one chunk bigger than T
    ],
)
def test_blockwise_matches_dense(data, causal, use_seg, q_chunk, k_chunk):
    seg = data["seg"] if use_seg else None
    want = dense_value_and_grads(data["q"], data["k"], data["v"], data["do"], seg, causal)
    fn = lambda q, k, v: blockwise_attention(q, k, v, seg, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk)
    got = jax.jit(lambda q, k, v, do: value_and_grads(fn, q, k, v, do))(
        data["q"], data["k"], data["v"], data["do"]
    )
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(g, w) < RTOL, name


def test_blockwise_wrong_segments_fail_the_check(data):
    """Negative control: the parity check above must catch shuffled or dropped segment ids."""
    seg = data["seg"]
    fn = jax.jit(lambda q, k, v, s: blockwise_attention(q, k, v, s, causal=True, q_chunk=16, k_chunk=16))
    want = dense_attention(data["q"], data["k"], data["v"], seg, causal=True)
    rng = np.random.default_rng(1)
    shuffled = jnp.asarray(rng.permuted(np.asarray(seg), axis=1))
    dropped = jnp.ones_like(seg)  # every token in one segment == ignoring the ids
    assert rel_err(fn(data["q"], data["k"], data["v"], seg), want) < RTOL
    assert rel_err(fn(data["q"], data["k"], data["v"], shuffled), want) > 1e-2
    assert rel_err(fn(data["q"], data["k"], data["v"], dropped), want) > 1e-2


def test_block_forward_offsets_and_empty_rows(data):
    q, k, v = data["q"][:, :32], data["k"][:, :32], data["v"][:, :32]
    kw = dict(causal=True, q_chunk=16, k_chunk=16)
    fwd = jax.jit(
        lambda q, k, v, q_offset, k_offset: blockwise.block_forward(
            q, k, v, q_offset=q_offset, k_offset=k_offset, **kw
        )
    )
    # keys wholly in the past of the queries: plain non-causal attention
    out, lse = fwd(q, k, v, 32, 0)
    assert rel_err(out, dense_attention(q, k, v, causal=False)) < RTOL
    # keys wholly in the future: every row is empty -> out 0, lse -inf, gradients 0, no NaN
    out, lse = fwd(q, k, v, 0, 32)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    dq, dk, dv = jax.jit(lambda *a: blockwise.block_backward(*a, q_offset=0, k_offset=32, **kw))(
        q, k, v, out, lse, data["do"][:, :32]
    )
    for g in (dq, dk, dv):
        assert np.all(np.asarray(g) == 0)
    # partial results over two key halves merge to the full attention
    o1, l1 = fwd(q, k[:, :16], v[:, :16], 0, 0)
    o2, l2 = fwd(q, k[:, 16:], v[:, 16:], 0, 16)
    merged, _ = blockwise.merge_partials(o1, l1, o2, l2)
    assert rel_err(merged, dense_attention(q, k, v, causal=True)) < RTOL


def test_blockwise_skips_future_key_chunks(data):
    """Key chunks past the causal diagonal are never computed, not merely masked: NaNs placed there (which
    0 * NaN would spread if those chunks were multiplied) leave the output and the gradients finite."""
    q, k, v, do = data["q"][:, :16], data["k"][:, :64], data["v"][:, :64], data["do"][:, :16]
    k = k.at[:, 16:].set(jnp.nan)
    v = v.at[:, 16:].set(jnp.nan)
    kw = dict(q_offset=0, k_offset=0, causal=True, q_chunk=16, k_chunk=16)
    out, lse = jax.jit(lambda q, k, v: blockwise.block_forward(q, k, v, **kw))(q, k, v)
    want = dense_attention(q, k[:, :16], v[:, :16], causal=True)
    assert rel_err(out, want) < RTOL
    dq, dk, dv = jax.jit(lambda *a: blockwise.block_backward(*a, **kw))(q, k, v, out, lse, do)
    assert np.all(np.isfinite(np.asarray(dq))) and np.all(np.isfinite(np.asarray(dk[:, :16])))
    assert np.all(np.asarray(dv[:, 16:]) == 0)


def test_bfloat16_inputs_run_and_roughly_agree(data):
    q, k, v = (data[n].astype(jnp.bfloat16) for n in "qkv")
    out = jax.jit(lambda *a: blockwise_attention(*a, q_chunk=16, k_chunk=16))(q, k, v, data["seg"])
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, dense_attention(data["q"], data["k"], data["v"], data["seg"])) < 2e-2


def test_dispatch_routes_and_validates(data):
    q, k, v, seg = data["q"], data["k"], data["v"], data["seg"]
    want = dense_attention(q, k, v, seg)
    assert rel_err(attention(q, k, v, seg, impl="blockwise", q_chunk=16, k_chunk=16), want) < RTOL
    assert ATTENTION_IMPLS == ("dense", "blockwise", "pallas", "ring", "ring_pallas")
    with pytest.raises(ValueError, match=r"'flash'.*allowed values.*'dense'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="pallas_interpret=True"):
        attention(q, k, v, impl="pallas")  # CPU without interpret mode: no silent fallback
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q[:, :, :3], k, v, impl="dense")
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(2, 72\)"):
        attention(q, k, v, seg[:, :8], impl="dense")
    with pytest.raises(ValueError, match="mesh with an 'sp' axis"):
        attention(q, k, v, impl="ring")  # no mesh set
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("dp", "tp"))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"'sp' axis.*found axes \('dp', 'tp'\)"):
        attention(q, k, v, impl="ring")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 1, 4), ("dp", "fsdp", "tp", "sp"))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="T=70 is not divisible"):
        attention(q[:, :70], k[:, :70], v[:, :70], impl="ring")
