"""RingAttention over 2 and 4 simulated devices vs dense attention: output and gradients wrt q, k, v.

Meshes are built over ('dp', 'fsdp', 'tp', 'sp') and set with jax.set_mesh, as the entry points do.
Negative controls: the ring without global position offsets, and shuffled / dropped segment ids, must fail
the same parity check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lwm.attention import attention, ring_attention
from support import rel_err, value_and_grads

RTOL = 1e-5
B, T, N, K, H = 2, 128, 4, 2, 16
SEGMENTS = 5  # packed rows of `data` (tests/attention/conftest.py): ids 0 (padding) to 4
CHUNKS = dict(q_chunk=16, k_chunk=32)


def make_mesh(shape):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, ("dp", "fsdp", "tp", "sp"))


def ring_value_and_grads(mesh, data, seg, **kw):
    """Runs the ring (through the public dispatch) under `mesh`; returns out, dq, dk, dv."""

    def fn(q, k, v, do, seg):
        return value_and_grads(lambda q, k, v: attention(q, k, v, seg, **kw, **CHUNKS), q, k, v, do)

    with jax.set_mesh(mesh):
        return jax.jit(fn)(data["q"], data["k"], data["v"], data["do"], seg)


def assert_parity(got, want):
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(g, w) < RTOL, (name, rel_err(g, w))


@pytest.mark.parametrize(
    "mesh_shape,causal,use_seg",
    [
        ((1, 1, 1, 4), True, False),  # sp=4
        ((2, 1, 1, 4), True, True),  # batch over dp as well, packed segments
        ((1, 1, 2, 4), True, True),  # heads over tp=2: 2 query heads and 1 kv head per shard
        ((1, 1, 1, 2), False, True),  # sp=2, non-causal
    ],
)
def test_ring_matches_dense(data, dense_reference, mesh_shape, causal, use_seg):
    seg = data["seg"] if use_seg else None
    got = ring_value_and_grads(make_mesh(mesh_shape), data, seg, impl="ring", causal=causal)
    assert_parity(got, dense_reference(causal, use_seg))


def test_ring_without_global_offsets_fails(data, dense_reference):
    """Negative control: masking every visiting block as if it were the diagonal block is wrong."""
    mesh = make_mesh((1, 1, 1, 4))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: ring_attention(q, k, v, None, causal=True, global_offsets=False, **CHUNKS))
        out = fn(data["q"], data["k"], data["v"])
    assert rel_err(out, dense_reference(True, False)[0]) > 1e-2


def test_ring_wrong_segments_fail(data, dense_reference):
    """Negative control: with shuffled or dropped (all-equal) segment ids the ring must not match."""
    mesh = make_mesh((1, 1, 1, 4))
    want = dense_reference(True, True)[0]
    rng = np.random.default_rng(1)
    shuffled = jnp.asarray(rng.permuted(np.asarray(data["seg"]), axis=1))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v, s: attention(q, k, v, s, impl="ring", **CHUNKS))
        assert rel_err(fn(data["q"], data["k"], data["v"], data["seg"]), want) < RTOL
        assert rel_err(fn(data["q"], data["k"], data["v"], shuffled), want) > 1e-2
        assert rel_err(fn(data["q"], data["k"], data["v"], jnp.ones_like(data["seg"])), want) > 1e-2


def test_ring_pallas_interpret_matches_dense(data, dense_reference):
    """The same ring with the Pallas (Triton-style) block kernel in interpret mode inside."""
    got = ring_value_and_grads(
        make_mesh((1, 1, 1, 4)), data, data["seg"], impl="ring_pallas", causal=True, pallas_interpret=True
    )
    assert_parity(got, dense_reference(True, True))


def test_ring_output_is_sequence_sharded(data):
    mesh = make_mesh((1, 1, 1, 4))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, impl="ring", **CHUNKS))(data["q"], data["k"], data["v"])
    assert out.sharding.spec[1] == "sp" and out.shape == (B, T, N, H)
