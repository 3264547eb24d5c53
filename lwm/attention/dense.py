"""Reference attention: materialises the full (B, N, T, S) score matrix.

This is the ground truth every fast path (blockwise, Pallas, ring, KV-cache decode) is tested against. It
is written independently of `blockwise.py` (its own mask code, no shared helpers), so a mistake in the
fast paths cannot cancel out against the same mistake here. Memory is O(B * N * T * S): use it for tests
and short sequences only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_attention(
    q, k, v, segment_ids=None, *, causal: bool = True, kv_segment_ids=None, q_offset=0, k_offset=0
):
    """Softmax attention with causal + segment masking and grouped-query heads.

    Args:
      q: (B, T, N, H) queries.
      k, v: (B, S, K, H) keys and values, N % K == 0; query head n reads kv head n // (N // K).
      segment_ids: (B, T) int segment ids of the queries, or None for no segment masking.
      causal: when True a query at global position q_offset + t sees keys at k_offset + s <= it.
      kv_segment_ids: (B, S) segment ids of the keys; defaults to `segment_ids` (needs T == S).
      q_offset, k_offset: global positions of q[:, 0] and k[:, 0] (ints or int scalars).

    Returns:
      (B, T, N, H) in q.dtype. Scores and softmax are computed in float32 (float64 for float64 inputs).
      A query row with no allowed key returns zeros.

    Example: q = k = v of shape (1, 3, 1, 1) holding [[1], [2], [3]] with segment_ids [[1, 1, 2]] and
    causal=True: row 0 sees key 0, row 1 sees keys 0-1, row 2 (segment 2) sees only key 2, so
    out[0, 2, 0, 0] == 3.
    """
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if N % K:
        raise ValueError(f"dense_attention: query heads N={N} must be a multiple of kv heads K={K}")
    G = N // K
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    qg = q.astype(dtype).reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(dtype), precision=hi) / jnp.sqrt(
        jnp.asarray(H, dtype)
    )  # (B, K, G, T, S)

    allowed = jnp.ones((1, T, S), bool)
    if causal:
        q_pos = q_offset + jnp.arange(T)
        k_pos = k_offset + jnp.arange(S)
        allowed = allowed & (k_pos[None, None, :] <= q_pos[None, :, None])
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        allowed = allowed & (segment_ids[:, :, None] == kv_seg[:, None, :])  # (B, T, S)
    allowed = allowed[:, None, None]  # (B|1, 1, 1, T, S)

    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked row: avoid inf - inf
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)  # fully masked row -> all-zero probabilities
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(dtype), precision=hi)
    return out.reshape(B, T, N, H).astype(q.dtype)
