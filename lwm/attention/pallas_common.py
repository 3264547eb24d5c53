"""What the two Pallas kernels share: picking the kernel for the backend, and input padding.

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

from lwm.attention.blockwise import pad_to  # noqa: F401  (re-exported for the kernels)


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
