"""The Pallas dispatch: picks the kernel module for the backend. Both kernels expose the same three
functions as `blockwise.py`:
  block_forward(q, k, v, q_seg, kv_seg, *, q_offset, k_offset, causal, q_chunk, k_chunk, interpret)
      -> (out (B, T, N, H) float32, lse (B, T, N) float32)
  block_backward(q, k, v, o, lse, do, q_seg, kv_seg, *, ...same...) -> (dq, dk, dv) float32
  flash_attention(q, k, v, segment_ids, *, causal, q_chunk, k_chunk, interpret) -> (B, T, N, H), custom_vjp
so the ring (`ring.py`) can run either one at every step. What the kernels share is in pallas_shared.py;
this module imports the kernels and nothing imports it back.
"""

from __future__ import annotations

import jax

from lwm.attention import pallas_gpu, pallas_tpu


def kernel_module(interpret: bool):
    """The Pallas kernel module for the default backend.

    gpu -> `pallas_gpu` (Triton), tpu -> `pallas_tpu` (Mosaic). On CPU there is no compiled kernel: with
    interpret=True the GPU kernel runs in Pallas interpret mode (how the tests run it); otherwise this
    raises. The TPU kernel can be run on CPU explicitly with `pallas_tpu.flash_attention(...,
    interpret=True)`, which uses TPU interpret mode.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        return pallas_gpu
    if backend == "tpu":
        return pallas_tpu
    if interpret:
        return pallas_gpu
    raise ValueError(
        f"attention impl 'pallas'/'ring_pallas' needs a GPU or TPU backend, found {backend!r}; pass "
        "pallas_interpret=True to run the GPU kernel in Pallas interpret mode (slow, for tests), or use "
        "impl='blockwise'/'ring'"
    )
