"""Pallas flash-attention kernels vs dense attention, run on CPU in interpret mode.

No GPU or TPU is available to these tests: the Triton-style kernels (`pallas_gpu`) run in Pallas
interpret mode, the Mosaic kernels (`pallas_tpu`) in TPU interpret mode (which simulates VMEM, SMEM and the
block pipeline). Both are checked for output and gradients wrt q, k, v, and for causal block skipping.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.attention import attention, dense_attention, pallas_gpu, pallas_tpu
from support import rel_err, value_and_grads

RTOL = 1e-5
B, N, K = 2, 4, 2


def make_data(T, H, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
    )
    seg = jnp.asarray(np.sort(rng.integers(0, 4, size=(B, T)), axis=1).astype(np.int32))
    return q, k, v, do, seg


def check_against_dense(flash, T, H, causal, use_seg, q_chunk, k_chunk):
    q, k, v, do, seg = make_data(T, H)
    seg = seg if use_seg else None
    want = jax.jit(lambda *a: value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), *a))(
        q, k, v, do
    )
    got = jax.jit(
        lambda *a: value_and_grads(
            lambda q, k, v: flash(q, k, v, seg, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, interpret=True),
            *a,
        )
    )(q, k, v, do)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(g, w) < RTOL, (name, rel_err(g, w))
    return q, k, v, seg, want[0]


@pytest.mark.parametrize(
    "T,H,causal,use_seg,q_chunk,k_chunk",
    [
        (64, 16, True, True, 16, 32),
        (72, 24, True, False, 16, 32),  # T and H padded (H to a power of two for Triton)
        (64, 16, False, True, 32, 16),
    ],
)
def test_gpu_kernel_interpret_matches_dense(T, H, causal, use_seg, q_chunk, k_chunk):
    check_against_dense(pallas_gpu.flash_attention, T, H, causal, use_seg, q_chunk, k_chunk)


def test_tpu_kernel_interpret_matches_dense():
    """One TPU-interpret case (slow: every grid step is simulated): causal, packed segments, GQA, padding."""
    check_against_dense(pallas_tpu.flash_attention, 40, 16, True, True, 16, 32)


@pytest.mark.parametrize("kernels", [pallas_gpu, pallas_tpu], ids=["gpu", "tpu"])
def test_kernel_wrong_segments_fail(kernels):
    """Negative control: the kernel given shuffled segment ids must fail the parity check."""
    q, k, v, _, seg = make_data(64, 16)
    want = dense_attention(q, k, v, seg, causal=True)
    shuffled = jnp.asarray(np.random.default_rng(1).permuted(np.asarray(seg), axis=1))
    fn = jax.jit(lambda s: kernels.flash_attention(q, k, v, s, q_chunk=16, k_chunk=16, interpret=True))
    assert rel_err(fn(seg), want) < RTOL
    assert rel_err(fn(shuffled), want) > 1e-2


@pytest.mark.parametrize("kernels", [pallas_gpu, pallas_tpu], ids=["gpu", "tpu"])
def test_kernels_skip_future_key_blocks(kernels):
    """Key blocks past the causal diagonal are never read into the math: NaNs placed there would turn the
    result into NaN (0 * NaN) if they were multiplied and then masked. Checked on out, dq, and dk, dv of the
    blocks read; negative control: without the causal mask the same NaNs reach out, dq, dk and dv."""
    q, k, v, do, _ = make_data(32, 16)                   # one key block to read, one past the diagonal
    q, do = q[:, :16], do[:, :16]
    k, v = k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan)
    finite = lambda x: bool(np.all(np.isfinite(np.asarray(x))))

    def run(causal, k, v):  # -> out, dq, dk, dv, in one program
        kw = dict(q_offset=0, k_offset=0, causal=causal, q_chunk=16, k_chunk=16, interpret=True)

        def both(q, k, v, do):
            out, lse = kernels.block_forward(q, k, v, **kw)
            return (out, *kernels.block_backward(q, k, v, out, lse, do, **kw))
        return jax.jit(both)(q, k, v, do)

    out, dq, dk, dv = run(True, k, v)
    assert rel_err(out, dense_attention(q, k[:, :16], v[:, :16])) < RTOL
    assert finite(out) and finite(dq) and finite(dk[:, :16]) and finite(dv[:, :16])
    out, dq, dk, dv = run(False, k, v)                   # reads both key blocks: the NaNs show
    assert not (finite(out) or finite(dq) or finite(dk[:, :16]) or finite(dv[:, :16]))


def test_gpu_kernel_offsets_and_empty_rows():
    q, k, v, do, _ = make_data(32, 16)
    kw = dict(causal=True, q_chunk=16, k_chunk=16, interpret=True)
    fwd = jax.jit(lambda q_off, k_off: pallas_gpu.block_forward(q, k, v, q_offset=q_off, k_offset=k_off, **kw))
    out, _ = fwd(32, 0)  # keys wholly in the past: non-causal attention
    assert rel_err(out, dense_attention(q, k, v, causal=False)) < RTOL
    out, lse = fwd(0, 32)  # keys wholly in the future: empty rows
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_dispatch_pallas_interpret_on_cpu():
    q, k, v, _, seg = make_data(32, 16)
    out = attention(q, k, v, seg, impl="pallas", pallas_interpret=True, q_chunk=16, k_chunk=16)
    assert rel_err(out, dense_attention(q, k, v, seg)) < RTOL


def test_chunk_above_the_triton_cap_is_reported_once(caplog):
    q, k, v, _, seg = make_data(32, 16)
    with caplog.at_level("WARNING", logger="lwm.attention.pallas_gpu"):
        for _ in range(2):
            pallas_gpu.block_forward(q, k, v, q_chunk=16, k_chunk=16, interpret=True)  # control: under the cap
            assert not caplog.records
        for _ in range(2):
            pallas_gpu.block_forward(q, k, v, q_chunk=512, k_chunk=16, interpret=True)  # fp32 forward cap: 64
    assert len(caplog.records) == 1 and "q_chunk=512 is above the Triton kernel's block cap 64" in caplog.text
