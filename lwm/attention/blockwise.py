"""Blockwise (flash-style) attention in plain JAX: the building blocks every fast path shares.

`block_forward` attends a query block to a key block given their global offsets and returns
(out, lse): the normalised output and the log-sum-exp of the scores, so partial results over different
key blocks merge exactly (`merge_partials`). It walks query chunks with `lax.map` and key chunks with a
`fori_loop` whose upper bound stops at the causal diagonal, so key chunks wholly in the future are never
computed (not just masked). `block_backward` is the flash-attention backward: it recomputes scores chunk by
chunk from (q, k, lse), so memory stays O(chunk^2) plus the O(T) inputs, never O(T^2):

    P  = exp(q k^T * scale - lse)        D  = rowsum(dO * O)
    dV = P^T dO      dP = dO V^T      dS = P * (dP - D)      dQ = dS K * scale      dK = dS^T Q * scale

The ring (`ring.py`) calls both with per-device offsets; `blockwise_attention` wraps them in a custom_vjp.

Masking uses -inf and guards every exp, so a query row with no allowed key gives out = 0 and lse = -inf
(and zero gradients), never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def chunk_size(requested: int, length: int) -> int:
    """Chunk actually used for a sequence of `length`: the request, capped at the length."""
    if requested <= 0:
        raise ValueError(f"chunk size must be positive, got {requested}")
    return min(requested, length)


def pad_to(x, multiple: int, axis: int, value=0):
    """Pads `axis` of x with `value` up to a multiple of `multiple`; None and exact multiples pass through.

    Example: pad_to(jnp.arange(5)[None], 4, axis=1) -> [[0, 1, 2, 3, 4, 0, 0, 0]].
    """
    if x is None:
        return None
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis % x.ndim] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _heads_first(q, k, v):
    """(B, T, N, H), (B, S, K, H) -> (B, K, G, T, H), (B, K, S, H): one transpose so chunks slice one axis."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qh = q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _heads_last(x):
    """(B, K, G, T, ...) -> (B, T, N, ...)."""
    B, K, G, T = x.shape[:4]
    return jnp.moveaxis(x, 3, 1).reshape(B, T, K * G, *x.shape[4:])


def _mask(q_pos, k_pos, q_seg, k_seg, k_valid, causal):
    """Allowed (query, key) pairs of one chunk pair: (B|1, 1, 1, qc, kc) bool, or None if all allowed."""
    mask = None
    if causal:
        mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, qc, kc)
    if q_seg is not None:
        seg = q_seg[:, :, None] == k_seg[:, None, :]  # (B, qc, kc)
        mask = seg if mask is None else mask & seg
    if k_valid is not None:
        valid = jnp.broadcast_to(k_valid[None, None, :], (1, q_pos.shape[0], k_pos.shape[0]))
        mask = valid if mask is None else mask & valid
    return None if mask is None else mask[:, None, None]


def _first_visible_q_chunk(q_offset, k_start, qc, nq, causal):
    """Index of the first query chunk whose last query can see a key at global position k_start."""
    if not causal:
        return 0
    return jnp.clip((k_start - q_offset) // qc, 0, nq)


def _num_visible_k_chunks(q_end, k_offset, kc, nk, causal):
    """Number of leading key chunks holding at least one key at global position <= q_end (inclusive)."""
    if not causal:
        return nk
    return jnp.clip((q_end - k_offset) // kc + 1, 0, nk)


def block_forward(
    q,
    k,
    v,
    q_segment_ids=None,
    kv_segment_ids=None,
    *,
    q_offset=0,
    k_offset=0,
    causal: bool = True,
    q_chunk: int = 512,
    k_chunk: int = 512,
):
    """Attention of a query block to one key block, chunked, with the online softmax.

    Args:
      q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0.
      q_segment_ids: (B, T) and kv_segment_ids: (B, S), both or neither.
      q_offset, k_offset: global positions of q[:, 0] and k[:, 0]; int or traced int32 scalar.
      causal: keys at global positions after the query's are masked; whole key chunks past the
        diagonal are skipped.
      q_chunk, k_chunk: chunk sizes (capped at T and S; lengths that are not a multiple are padded).

    Returns:
      out: (B, T, N, H) float32 (float64 for float64 inputs), normalised over this key block.
      lse: (B, T, N), same dtype: log-sum-exp of the scaled scores over this key block; -inf for a row
        with no allowed key.

    Example: with T = S = 4, q_offset = 4, k_offset = 0 and causal=True every query sees all four keys
    (the key block lies wholly in the past); with q_offset = 0, k_offset = 4 no key is visible and the
    result is out = 0, lse = -inf, with no key chunk computed at all.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("block_forward: pass both q_segment_ids and kv_segment_ids, or neither")
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qc, kc = chunk_size(q_chunk, T), chunk_size(k_chunk, S)
    q, q_seg = pad_to(q, qc, 1), pad_to(q_segment_ids, qc, 1)
    k, v, k_seg = pad_to(k, kc, 1), pad_to(v, kc, 1), pad_to(kv_segment_ids, kc, 1)
    nq, nk = q.shape[1] // qc, k.shape[1] // kc
    k_valid_all = jnp.arange(k.shape[1]) < S if k.shape[1] != S else None

    qh, kh, vh = _heads_first(q, k, v)  # (B, K, G, Tp, H), (B, K, Sp, H)
    G = N // K
    scale = H**-0.5

    def one_q_chunk(i):
        q_i = lax.dynamic_slice_in_dim(qh, i * qc, qc, axis=3)  # (B, K, G, qc, H)
        q_pos = q_offset + i * qc + jnp.arange(qc)
        q_seg_i = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, i * qc, qc, axis=1)

        def body(j, carry):
            m, l, acc = carry
            k_j = lax.dynamic_slice_in_dim(kh, j * kc, kc, axis=2)  # (B, K, kc, H)
            v_j = lax.dynamic_slice_in_dim(vh, j * kc, kc, axis=2)
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc_dtype) * scale
            k_seg_j = None if k_seg is None else lax.dynamic_slice_in_dim(k_seg, j * kc, kc, axis=1)
            k_valid = None if k_valid_all is None else lax.dynamic_slice_in_dim(k_valid_all, j * kc, kc)
            mask = _mask(q_pos, k_offset + j * kc + jnp.arange(kc), q_seg_i, k_seg_j, k_valid, causal)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))  # (B, K, G, qc)
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + p.sum(-1)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_j, preferred_element_type=acc_dtype)
            return m_new, l, acc * correction[..., None] + pv

        init = (
            jnp.full((B, K, G, qc), -jnp.inf, acc_dtype),
            jnp.zeros((B, K, G, qc), acc_dtype),
            jnp.zeros((B, K, G, qc, H), acc_dtype),
        )
        init = match_vma(init, q_i, kh)
        hi = _num_visible_k_chunks(q_offset + (i + 1) * qc - 1, k_offset, kc, nk, causal)
        m, l, acc = lax.fori_loop(0, hi, body, init)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return out, lse

    out, lse = lax.map(one_q_chunk, jnp.arange(nq))  # (nq, B, K, G, qc, H), (nq, B, K, G, qc)
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, nq * qc, H)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, nq * qc)
    return _heads_last(out)[:, :T], _heads_last(lse)[:, :T]


def block_backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    q_segment_ids=None,
    kv_segment_ids=None,
    *,
    q_offset=0,
    k_offset=0,
    causal: bool = True,
    q_chunk: int = 512,
    k_chunk: int = 512,
):
    """Gradients of attention of a query block to one key block, given the *final* softmax statistics.

    Args:
      q, k, v, q_segment_ids, kv_segment_ids, offsets, causal, chunks: as in `block_forward`.
      o: (B, T, N, H) the final attention output for these queries (over all key blocks).
      lse: (B, T, N) float32 final log-sum-exp for these queries (over all key blocks).
      do: (B, T, N, H) cotangent of o.

    Returns:
      dq (B, T, N, H), dk (B, S, K, H), dv (B, S, K, H), all float32 (float64 for float64 inputs): the
      contribution of this key block. Summed over key blocks they are the exact gradients.

    Key chunks are the outer loop (a `lax.scan` that emits dk, dv per chunk); for each, only the query
    chunks at or after the causal diagonal are visited, and dq is accumulated into one (B, T, N, H) buffer.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qc, kc = chunk_size(q_chunk, T), chunk_size(k_chunk, S)
    scale = H**-0.5

    delta = jnp.sum(o.astype(acc_dtype) * do.astype(acc_dtype), axis=-1)  # (B, T, N)
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: every P is exp(-inf) = 0 anyway
    q, do, q_seg = pad_to(q, qc, 1), pad_to(do, qc, 1), pad_to(q_segment_ids, qc, 1)
    lse, delta = pad_to(lse, qc, 1), pad_to(delta, qc, 1)
    k, v, k_seg = pad_to(k, kc, 1), pad_to(v, kc, 1), pad_to(kv_segment_ids, kc, 1)
    Tp, Sp = q.shape[1], k.shape[1]
    nq, nk = Tp // qc, Sp // kc
    k_valid_all = jnp.arange(Sp) < S if Sp != S else None

    qh, kh, vh = _heads_first(q, k, v)  # (B, K, G, Tp, H), (B, K, Sp, H)
    doh = do.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, Tp, H)
    lse_h = lse.reshape(B, Tp, K, G).transpose(0, 2, 3, 1)  # (B, K, G, Tp)
    delta_h = delta.reshape(B, Tp, K, G).transpose(0, 2, 3, 1)

    def one_k_chunk(dq, j):
        k_j = lax.dynamic_slice_in_dim(kh, j * kc, kc, axis=2)  # (B, K, kc, H)
        v_j = lax.dynamic_slice_in_dim(vh, j * kc, kc, axis=2)
        k_pos = k_offset + j * kc + jnp.arange(kc)
        k_seg_j = None if k_seg is None else lax.dynamic_slice_in_dim(k_seg, j * kc, kc, axis=1)
        k_valid = None if k_valid_all is None else lax.dynamic_slice_in_dim(k_valid_all, j * kc, kc)

        def body(i, carry):
            dq, dk_j, dv_j = carry
            sl = functools.partial(lax.dynamic_slice_in_dim, start_index=i * qc, slice_size=qc, axis=3)
            q_i, do_i, lse_i, delta_i = sl(qh), sl(doh), sl(lse_h), sl(delta_h)
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc_dtype) * scale
            q_seg_i = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, i * qc, qc, axis=1)
            mask = _mask(q_offset + i * qc + jnp.arange(qc), k_pos, q_seg_i, k_seg_j, k_valid, causal)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            p = jnp.exp(s - lse_i[..., None])  # (B, K, G, qc, kc)
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqh->bksh", p, do_i, preferred_element_type=acc_dtype)
            dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=acc_dtype)
            ds = p * (dp - delta_i[..., None]) * scale
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=acc_dtype)
            dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=acc_dtype)
            dq = lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_i, i * qc, axis=3)
            return dq, dk_j, dv_j

        zeros_kv = match_vma(jnp.zeros((B, K, kc, H), acc_dtype), k_j, qh)
        lo = _first_visible_q_chunk(q_offset, k_offset + j * kc, qc, nq, causal)
        dq, dk_j, dv_j = lax.fori_loop(lo, nq, body, (dq, zeros_kv, zeros_kv))
        return dq, (dk_j, dv_j)

    dq0 = match_vma(jnp.zeros((B, K, G, Tp, H), acc_dtype), qh, kh)
    dq, (dk, dv) = lax.scan(one_k_chunk, dq0, jnp.arange(nk))  # dk, dv: (nk, B, K, kc, H)
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, Sp, H).transpose(0, 2, 1, 3)[:, :S]
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, Sp, H).transpose(0, 2, 1, 3)[:, :S]
    return _heads_last(dq)[:, :T], dk, dv


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combines two normalised partial attentions over disjoint key sets into one.

    out_*: (B, T, N, H); lse_*: (B, T, N). Returns (out, lse) as if both key sets were attended at once.
    An empty side (lse = -inf) contributes nothing; both empty gives out = 0, lse = -inf.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    w_a = jnp.exp(lse_a - lse_safe)[..., None]
    w_b = jnp.exp(lse_b - lse_safe)[..., None]
    return out_a * w_a + out_b * w_b, lse


def varying_axes(x) -> frozenset:
    """Manual mesh axes along which x varies inside shard_map (empty outside it)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def match_vma(init, *like):
    """Gives zero-initialised loop carries the manual-axis variance of `like` (needed under shard_map
    with check_vma=True: a loop carry must keep one type, and the loop body mixes in varying values).
    Outside shard_map this returns `init` unchanged.
    """
    axes = frozenset().union(*(varying_axes(x) for x in like))
    if not axes:
        return init

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, init)


def attention_with_vjp(block_forward, block_backward):
    """Self-attention under one custom_vjp, built from a (block_forward, block_backward) pair.

    Returns attend(q, k, v, segment_ids, **opts): q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H) in
    q.dtype. The forward keeps (q, k, v, segment_ids, out, lse) for the backward, which calls
    block_backward with the final lse (B, T, N), so no (T, T) scores are stored. opts (causal, the chunks,
    interpret, ...) are static, hashable keywords passed to both block functions. Serves
    `blockwise_attention` here and `flash_attention` of both Pallas kernels.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attend(q, k, v, segment_ids, opts):
        return attend_fwd(q, k, v, segment_ids, opts)[0]

    def attend_fwd(q, k, v, segment_ids, opts):
        out, lse = block_forward(q, k, v, segment_ids, segment_ids, **dict(opts))
        out = out.astype(q.dtype)
        return out, (q, k, v, segment_ids, out, lse)

    def attend_bwd(opts, res, do):
        q, k, v, segment_ids, out, lse = res
        dq, dk, dv = block_backward(q, k, v, out, lse, do, segment_ids, segment_ids, **dict(opts))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    attend.defvjp(attend_fwd, attend_bwd)

    def call(q, k, v, segment_ids, **opts):
        return attend(q, k, v, segment_ids, tuple(sorted(opts.items())))

    return call


_blockwise = attention_with_vjp(block_forward, block_backward)


def blockwise_attention(q, k, v, segment_ids=None, *, causal: bool = True, q_chunk: int = 512, k_chunk: int = 512):
    """Memory-efficient attention on one device: q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H).

    Same semantics as `dense.dense_attention`; forward and backward both run in O(chunk) working memory
    (plus the inputs and the (B, T, N) softmax statistics saved for the backward).
    """
    return _blockwise(q, k, v, segment_ids, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk)
