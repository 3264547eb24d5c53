"""What the two Pallas kernels (pallas_gpu.py, pallas_tpu.py) share: input checks, block rounding and the
backward's per-row statistics. (The custom_vjp around their block functions is blockwise.attention_with_vjp.)

Imports flow one way: blockwise <- pallas_shared <- pallas_gpu, pallas_tpu <- pallas_common (the dispatch).
"""

from __future__ import annotations

import jax.numpy as jnp

from lwm.attention.blockwise import pad_to


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
