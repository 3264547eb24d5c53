"""What the two Pallas kernels share: picking the kernel for the backend, input checks and padding, the
backward's per-row statistics, and the custom_vjp around their block functions.

Both kernels expose the same three functions as `blockwise.py`:
  block_forward(q, k, v, q_seg, kv_seg, *, q_offset, k_offset, causal, q_chunk, k_chunk, interpret)
      -> (out (B, T, N, H) float32, lse (B, T, N) float32)
  block_backward(q, k, v, o, lse, do, q_seg, kv_seg, *, ...same...) -> (dq, dk, dv) float32
  flash_attention(q, k, v, segment_ids, *, causal, q_chunk, k_chunk, interpret) -> (B, T, N, H), custom_vjp
so the ring (`ring.py`) can run either one at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lwm.attention.blockwise import attention_with_vjp, pad_to  # noqa: F401  (re-exported for the kernels)


def kernel_module(interpret: bool):
    """The Pallas kernel module for the default backend.

    gpu -> `pallas_gpu` (Triton), tpu -> `pallas_tpu` (Mosaic). On CPU there is no compiled kernel: with
    interpret=True the GPU kernel runs in Pallas interpret mode (how the tests run it); otherwise this
    raises. The TPU kernel can be run on CPU explicitly with `pallas_tpu.flash_attention(...,
    interpret=True)`, which uses TPU interpret mode.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        from lwm.attention import pallas_gpu

        return pallas_gpu
    if backend == "tpu":
        from lwm.attention import pallas_tpu

        return pallas_tpu
    if interpret:
        from lwm.attention import pallas_gpu

        return pallas_gpu
    raise ValueError(
        f"attention impl 'pallas'/'ring_pallas' needs a GPU or TPU backend, found {backend!r}; pass "
        "pallas_interpret=True to run the GPU kernel in Pallas interpret mode (slow, for tests), or use "
        "impl='blockwise'/'ring'"
    )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def as_offset(x):
    """A global position offset (python int or traced scalar) as an int32 scalar array."""
    return jnp.asarray(x, jnp.int32).reshape(())


def check_inputs(name: str, q, k, q_segment_ids, kv_segment_ids):
    """Raises ValueError (prefixed `name`) unless N % K == 0 and both or neither segment ids are given."""
    N, K = q.shape[2], k.shape[2]
    if N % K:
        raise ValueError(f"{name}: query heads N={N} must be a multiple of kv heads K={K}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"{name}: pass both q_segment_ids and kv_segment_ids, or neither")


def backward_rows(o, lse, do, bq: int):
    """Per-query-row statistics of the backward kernels, heads-first and padded to a multiple of bq.

    o, do: (B, T, N, H); lse: (B, T, N) final log-sum-exp. Returns lse (B, N, Tp), with -inf (a row with
    no allowed key, where every P is 0 anyway) replaced by 0, and delta = rowsum(dO * O) (B, N, Tp) f32.
    """
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (B, T, N)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    return pad_to(lse.transpose(0, 2, 1), bq, 2), pad_to(delta.transpose(0, 2, 1), bq, 2)
