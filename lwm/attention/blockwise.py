"""Blockwise (flash-style) attention in plain JAX: the building blocks every fast path shares.

`block_forward` attends a query block to a key block given their global offsets and returns
(out, lse): the normalised output and the log-sum-exp of the scores, so partial results over different
key blocks merge exactly (`merge_partials`). It walks query chunks with `lax.map` and key chunks with a
`fori_loop` whose upper bound stops at the causal diagonal, so key chunks wholly in the future are never
computed (not just masked); which chunks to visit and which need a mask is the causal block rule of
`causal_blocks.py`, applied to chunks. `block_backward` is the flash-attention backward: it recomputes
scores chunk by chunk from (q, k, lse), so memory stays O(chunk^2) plus the O(T) inputs, never O(T^2):

    P  = exp(q k^T * scale - lse)        D  = rowsum(dO * O)
    dV = P^T dO      dP = dO V^T      dS = P * (dP - D)      dQ = dS K * scale      dK = dS^T Q * scale

The ring (`ring.py`) calls both with per-device offsets; `blockwise_attention` wraps them in a custom_vjp.

For speed on CPU: the scale is folded into q once; only chunk pairs that straddle the causal diagonal (or
carry segment ids or padded keys) build a mask, chunk pairs wholly in the past run unmasked; the G query
heads that share a kv head are stacked as rows of one matmul; and q, k, v, dO are laid out once, chunk
index first and in both orientations, so every per-tile matmul reads its operands without a copy (the
backward works on transposed tiles, keys by queries, so that no (kc, qc) tile is ever transposed).

Masking uses -inf and guards every exp, so a query row with no allowed key gives out = 0 and lse = -inf
(and zero gradients), never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lwm.attention import causal_blocks


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


def _q_chunks(x, qc: int, K: int, transpose: bool = False):
    """(B, Tp, N, ...) -> (nq, B, K, G * qc, ...): query chunks first, the G query heads of one kv head
    stacked along the rows (row g * qc + t is query t of head g). With transpose, (B, Tp, N, H) ->
    (nq, B, K, H, G * qc), the layout whose chunk is the right operand of a plain matmul."""
    B, Tp, N = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, Tp // qc, qc, K, N // K, *rest)
    x = jnp.moveaxis(x, (1, 3, 4), (0, 2, 3))  # (nq, B, K, G, qc, ...)
    x = x.reshape(Tp // qc, B, K, N // K * qc, *rest)
    return jnp.swapaxes(x, -1, -2) if transpose else x


def _q_unchunk(x, K: int, G: int):
    """Inverse of `_q_chunks` (without transpose): (nq, B, K, G * qc, ...) -> (B, nq * qc, K * G, ...)."""
    nq, B = x.shape[:2]
    rest = x.shape[4:]
    x = x.reshape(nq, B, K, G, x.shape[3] // G, *rest)
    x = jnp.moveaxis(x, (0, 2, 3), (1, 3, 4))  # (B, nq, qc, K, G, ...)
    return x.reshape(B, -1, K * G, *rest)


def _k_chunks(x, kc: int, transpose: bool = False):
    """(B, Sp, K, H) -> (nk, B, K, kc, H), or (nk, B, K, H, kc) with transpose."""
    B, Sp, K, H = x.shape
    x = x.reshape(B, Sp // kc, kc, K, H).transpose(1, 0, 3, 2, 4)
    return jnp.swapaxes(x, -1, -2) if transpose else x


def _mask(q_pos, k_pos, q_seg, k_seg, k_valid, causal, keys_first=False):
    """Allowed (query, key) pairs of one chunk pair, or None if all are allowed.

    q_pos (R,), q_seg (B, R) for the R = G * qc query rows; k_pos, k_valid (kc,), k_seg (B, kc).
    Returns (B|1, 1, R, kc) bool, or (B|1, 1, kc, R) with keys_first.
    """
    qa, ka = (0, 1) if keys_first else (1, 0)  # the axis each side is expanded along (of the 2-D tile)
    mask = None
    if causal:
        mask = (jnp.expand_dims(k_pos, ka) <= jnp.expand_dims(q_pos, qa))[None]  # (1, R, kc) or (1, kc, R)
    if q_seg is not None:
        seg = jnp.expand_dims(q_seg, qa + 1) == jnp.expand_dims(k_seg, ka + 1)  # (B, R, kc) or (B, kc, R)
        mask = seg if mask is None else mask & seg
    if k_valid is not None:
        valid = jnp.expand_dims(k_valid, ka)[None]
        mask = valid if mask is None else mask & valid
    return None if mask is None else mask[:, None]


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
    G = N // K
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("block_forward: pass both q_segment_ids and kv_segment_ids, or neither")
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    qc, kc = chunk_size(q_chunk, T), chunk_size(k_chunk, S)
    q, q_seg = pad_to(q, qc, 1), pad_to(q_segment_ids, qc, 1)
    k, v, k_seg = pad_to(k, kc, 1), pad_to(v, kc, 1), pad_to(kv_segment_ids, kc, 1)
    nq, nk = q.shape[1] // qc, k.shape[1] // kc
    k_valid_all = jnp.arange(k.shape[1]) < S if k.shape[1] != S else None

    q = q * jnp.asarray(H**-0.5, q.dtype)  # the softmax scale once, not on every score (rounded to q.dtype)
    q_all = _q_chunks(q, qc, K)  # (nq, B, K, R, H), R = G * qc rows per chunk
    kT_all, v_all = _k_chunks(k, kc, transpose=True), _k_chunks(v, kc)  # (nk, B, K, H, kc), (nk, B, K, kc, H)
    q_seg_all = None if q_seg is None else jnp.tile(q_seg.reshape(B, nq, qc), (1, 1, G))  # (B, nq, R)

    def one_q_chunk(i):
        q_i = lax.dynamic_index_in_dim(q_all, i, keepdims=False)  # (B, K, R, H)
        q_pos = jnp.tile(q_offset + i * qc + jnp.arange(qc), G)  # (R,)
        q_seg_i = None if q_seg is None else lax.dynamic_index_in_dim(q_seg_all, i, 1, False)

        def body(j, carry, masked):
            m, l, acc = carry  # running max, sum of exp, unnormalised output: (B, K, R), (B, K, R), (B, K, R, H)
            kT_j = lax.dynamic_index_in_dim(kT_all, j, keepdims=False)  # (B, K, H, kc)
            v_j = lax.dynamic_index_in_dim(v_all, j, keepdims=False)  # (B, K, kc, H)
            s = jnp.einsum("bkrh,bkhs->bkrs", q_i, kT_j, preferred_element_type=acc_dtype)
            if masked:
                k_seg_j = None if k_seg is None else lax.dynamic_slice_in_dim(k_seg, j * kc, kc, axis=1)
                k_valid = None if k_valid_all is None else lax.dynamic_slice_in_dim(k_valid_all, j * kc, kc)
                mask = _mask(q_pos, k_offset + j * kc + jnp.arange(kc), q_seg_i, k_seg_j, k_valid, causal)
                s = s if mask is None else jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))  # finite after any unmasked chunk
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new) if masked else m_new
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + p.sum(-1)
            pv = jnp.einsum("bkrs,bksh->bkrh", p.astype(v.dtype), v_j, preferred_element_type=acc_dtype)
            return m_new, l, acc * correction[..., None] + pv

        R = G * qc
        init = (
            jnp.full((B, K, R), -jnp.inf, acc_dtype),
            jnp.zeros((B, K, R), acc_dtype),
            jnp.zeros((B, K, R, H), acc_dtype),
        )
        init = match_vma(init, q_i, kT_all)
        # Key chunks [0, mid) lie wholly in the past of every query of this chunk: no mask to build. Chunks
        # [mid, hi) straddle the diagonal (or hold padding or segment ids) and are masked.
        hi = causal_blocks.num_visible_k_blocks(q_offset + (i + 1) * qc - 1, k_offset, kc, nk, causal)
        mid = 0
        if q_seg is None:
            mid = causal_blocks.num_whole_k_blocks(q_offset + i * qc, k_offset, kc, nk, causal)
        if k_valid_all is not None:
            mid = jnp.minimum(mid, nk - 1)  # the last key chunk holds the padding
        mid = jnp.minimum(mid, hi)
        carry = lax.fori_loop(0, mid, functools.partial(body, masked=False), init)
        m, l, acc = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return out, lse

    out, lse = lax.map(one_q_chunk, jnp.arange(nq))  # (nq, B, K, R, H), (nq, B, K, R)
    return _q_unchunk(out, K, G)[:, :T], _q_unchunk(lse, K, G)[:, :T]


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
    chunks at or after the causal diagonal are visited, and dq is accumulated into one buffer. Tiles are
    computed transposed, keys by queries (P^T = exp(k q^T - lse)), so that all five matmuls per tile take
    their operands in plain (rows, contraction) x (contraction, cols) form and no (kc, qc) tile is ever
    transposed: dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T.
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

    q = q * jnp.asarray(scale, q.dtype)  # scores k q^T come out scaled; then dK = dS^T q needs no scale
    q_all, qT_all = _q_chunks(q, qc, K), _q_chunks(q, qc, K, transpose=True)  # (nq, B, K, R, H), (.., H, R)
    do_all, doT_all = _q_chunks(do, qc, K), _q_chunks(do, qc, K, transpose=True)
    lse_all, delta_all = _q_chunks(lse, qc, K), _q_chunks(delta, qc, K)  # (nq, B, K, R)
    q_seg_all = None if q_seg is None else jnp.tile(q_seg.reshape(B, nq, qc), (1, 1, G))  # (B, nq, R)
    k_all, kT_all, v_all = _k_chunks(k, kc), _k_chunks(k, kc, transpose=True), _k_chunks(v, kc)

    def one_k_chunk(dqT, xs):
        j, k_j, kT_j, v_j = xs  # (B, K, kc, H), (B, K, H, kc), (B, K, kc, H)
        k_pos = k_offset + j * kc + jnp.arange(kc)
        k_seg_j = None if k_seg is None else lax.dynamic_slice_in_dim(k_seg, j * kc, kc, axis=1)
        k_valid = None if k_valid_all is None else lax.dynamic_slice_in_dim(k_valid_all, j * kc, kc)

        def body(i, carry, masked):
            dqT, dk_j, dv_j = carry  # dqT: (nq, B, K, H, R) without the softmax scale (applied at the end)
            q_i, qT_i, do_i, doT_i, lse_i, delta_i = (
                lax.dynamic_index_in_dim(x, i, keepdims=False)
                for x in (q_all, qT_all, do_all, doT_all, lse_all, delta_all)
            )
            sT = jnp.einsum("bksh,bkhr->bksr", k_j, qT_i, preferred_element_type=acc_dtype)  # (B, K, kc, R)
            if masked:
                q_pos = jnp.tile(q_offset + i * qc + jnp.arange(qc), G)
                q_seg_i = None if q_seg is None else lax.dynamic_index_in_dim(q_seg_all, i, 1, False)
                mask = _mask(q_pos, k_pos, q_seg_i, k_seg_j, k_valid, causal, keys_first=True)
                sT = sT if mask is None else jnp.where(mask, sT, -jnp.inf)
            pT = jnp.exp(sT - lse_i[:, :, None, :])
            dv_j = dv_j + jnp.einsum("bksr,bkrh->bksh", pT, do_i, preferred_element_type=acc_dtype)
            dpT = jnp.einsum("bksh,bkhr->bksr", v_j, doT_i, preferred_element_type=acc_dtype)
            dsT = pT * (dpT - delta_i[:, :, None, :])
            dk_j = dk_j + jnp.einsum("bksr,bkrh->bksh", dsT, q_i, preferred_element_type=acc_dtype)
            dqT_i = jnp.einsum("bkhs,bksr->bkhr", kT_j, dsT, preferred_element_type=acc_dtype)
            dqT = lax.dynamic_update_index_in_dim(dqT, lax.dynamic_index_in_dim(dqT, i, 0, False) + dqT_i, i, 0)
            return dqT, dk_j, dv_j

        zeros_kv = match_vma(jnp.zeros((B, K, kc, H), acc_dtype), k_j, q_all)
        # Query chunks [lo, mid) straddle the diagonal (or hold segment ids or see padded keys) and are
        # masked; from mid on, every query sees every key of this chunk.
        lo = causal_blocks.first_visible_q_block(q_offset, k_offset + j * kc, qc, nq, causal)
        mid = causal_blocks.first_whole_q_block(q_offset, k_offset + (j + 1) * kc - 1, qc, nq, causal)
        if q_seg is not None:
            mid = nq
        elif k_valid_all is not None:
            mid = jnp.where(j == nk - 1, nq, mid)
        mid = jnp.maximum(mid, lo)
        carry = lax.fori_loop(lo, mid, functools.partial(body, masked=True), (dqT, zeros_kv, zeros_kv))
        dqT, dk_j, dv_j = lax.fori_loop(mid, nq, functools.partial(body, masked=False), carry)
        return dqT, (dk_j, dv_j)

    dqT0 = match_vma(jnp.zeros((nq, B, K, H, G * qc), acc_dtype), q_all, k_all)
    dqT, (dk, dv) = lax.scan(one_k_chunk, dqT0, (jnp.arange(nk), k_all, kT_all, v_all))  # dk: (nk, B, K, kc, H)
    dq = _q_unchunk(jnp.swapaxes(dqT, -1, -2) * scale, K, G)[:, :T]
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, Sp, K, H)[:, :S]
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, Sp, K, H)[:, :S]
    return dq, dk, dv


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
