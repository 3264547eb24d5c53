"""Fused flash-attention kernels for TPU in Mosaic Pallas (`jax.experimental.pallas.tpu`).

The TPU idiom differs from the Triton one (`pallas_gpu.py`): the grid runs in order on one core, so the
key-block loop is the last ("arbitrary") grid axis, with the running max, sum and output accumulator kept
in VMEM scratch across it. Global offsets (for the ring) come in by scalar prefetch (SMEM). Causal block
skipping (the rule of `causal_blocks.py`) is two-fold: `pl.when` skips the compute of key blocks past the
diagonal, and the index maps clamp those steps to the last visible block, so the pipeline issues no DMA
for them.
  _fwd_kernel  grid (B, N, T/bq, S/bk)         -> out (bq, H), lse (bq, 1)
  _dq_kernel   grid (B, N, T/bq, S/bk)         -> dq (bq, H)
  _dkv_kernel  grid (B, K, S/bk, G * T/bq)     -> dk, dv (bk, H), reduced over the G query heads of the
                                                  kv head and the query blocks at/after the diagonal.
Arrays are laid out heads-first, (B, N, T, H), so every block's last two dims are (rows, H) as Mosaic
wants; on a real TPU pick q_chunk a multiple of 8 and k_chunk a multiple of 128 (or the whole length).

Status: no TPU was available while this was written. The kernels are tested on CPU in TPU interpret mode
(`interpret=True` passes `pltpu.InterpretParams()`, which simulates VMEM/SMEM and the DMA pipeline)
against the dense reference, forward and gradients; they have not been compiled by Mosaic or timed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lwm.attention import causal_blocks
from lwm.attention.blockwise import attention_with_vjp, pad_to
from lwm.attention.pallas_shared import backward_rows, check_inputs


def _scores(q, k, q_pos0, k_pos0, k_local0, q_seg, k_seg, *, causal, kv_len, k_padded, scale):
    """Masked scaled scores (bq, bk) f32 of one block pair; masked entries are -inf."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    bq, bk = s.shape
    mask = None
    if causal:
        q_pos = q_pos0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos = k_pos0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = k_pos <= q_pos
    if q_seg is not None:
        seg = q_seg == k_seg  # (bq, 1) == (1, bk)
        mask = seg if mask is None else mask & seg
    if k_padded:
        valid = k_local0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < kv_len
        mask = valid if mask is None else mask & valid
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _fwd_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    k_seg_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    causal,
    bq,
    bk,
    kv_len,
    k_padded,
    scale,
):
    # q_ref (bq, H); k_ref, v_ref (bk, H); q_seg_ref (bq, 1); k_seg_ref (1, bk); o_ref (bq, H); lse (bq, 1)
    i, j = pl.program_id(2), pl.program_id(3)
    q_offset, k_offset = off_ref[0], off_ref[1]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    q_last = q_offset + (i + 1) * bq - 1
    visible = j < causal_blocks.num_visible_k_blocks(q_last, k_offset, bk, pl.num_programs(3)) if causal else True

    @pl.when(visible)
    def _compute():
        s = _scores(
            q_ref[...],
            k_ref[...],
            q_offset + i * bq,
            k_offset + j * bk,
            j * bk,
            None if q_seg_ref is None else q_seg_ref[...],
            None if k_seg_ref is None else k_seg_ref[...],
            causal=causal,
            kv_len=kv_len,
            k_padded=k_padded,
            scale=scale,
        )
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 1)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        correction = jnp.exp(m_prev - m_safe)
        l_scr[...] = l_scr[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = acc_scr[...] * correction + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        l = l_scr[...]
        empty = l == 0.0
        o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    k_seg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    dq_scr,
    *,
    causal,
    bq,
    bk,
    kv_len,
    k_padded,
    scale,
):
    i, j = pl.program_id(2), pl.program_id(3)
    q_offset, k_offset = off_ref[0], off_ref[1]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    q_last = q_offset + (i + 1) * bq - 1
    visible = j < causal_blocks.num_visible_k_blocks(q_last, k_offset, bk, pl.num_programs(3)) if causal else True

    @pl.when(visible)
    def _compute():
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        s = _scores(
            q_ref[...],
            k,
            q_offset + i * bq,
            k_offset + j * bk,
            j * bk,
            None if q_seg_ref is None else q_seg_ref[...],
            None if k_seg_ref is None else k_seg_ref[...],
            causal=causal,
            kv_len=kv_len,
            k_padded=k_padded,
            scale=scale,
        )
        p = jnp.exp(s - lse_ref[...])  # (bq, bk)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...]) * scale
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    k_seg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    causal,
    bq,
    bk,
    nq,
    kv_len,
    k_padded,
    scale,
):
    # grid step r walks (query head g of this kv head, query block i) = divmod(r, nq)
    j, r = pl.program_id(2), pl.program_id(3)
    i = r % nq
    q_offset, k_offset = off_ref[0], off_ref[1]

    @pl.when(r == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    visible = i >= causal_blocks.first_visible_q_block(q_offset, k_offset + j * bk, bq, nq) if causal else True

    @pl.when(visible)
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _scores(
            q,
            k,
            q_offset + i * bq,
            k_offset + j * bk,
            j * bk,
            None if q_seg_ref is None else q_seg_ref[...],
            None if k_seg_ref is None else k_seg_ref[...],
            causal=causal,
            kv_len=kv_len,
            k_padded=k_padded,
            scale=scale,
        )
        p = jnp.exp(s - lse_ref[...])  # (bq, bk)
        tn = (((0,), (0,)), ((), ()))  # contract the query rows: P^T dO, dS^T Q
        dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...]) * scale
        dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32)

    @pl.when(r == pl.num_programs(3) - 1)
    def _finalize():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk):
    """Heads-first, padded layout: q (B, N, Tp, H), k/v (B, K, Sp, H), q_seg (B, Tp, 1), k_seg (B, 1, Sp).

    Also returns the kernels' static keywords (causal, bq, bk, kv_len, k_padded, scale).
    """
    T, H = q.shape[1], q.shape[3]
    S = k.shape[1]
    check_inputs("pallas_tpu", q, k, q_segment_ids, kv_segment_ids)
    bq, bk = min(q_chunk, T), min(k_chunk, S)
    qh = pad_to(q.transpose(0, 2, 1, 3), bq, 2)
    kh = pad_to(k.transpose(0, 2, 1, 3), bk, 2)
    vh = pad_to(v.transpose(0, 2, 1, 3), bk, 2)
    q_seg = None if q_segment_ids is None else pad_to(q_segment_ids, bq, 1)[:, :, None]
    k_seg = None if kv_segment_ids is None else pad_to(kv_segment_ids, bk, 1)[:, None, :]
    kw = dict(causal=causal, bq=bq, bk=bk, kv_len=S, k_padded=kh.shape[2] != S, scale=H**-0.5)
    return qh, kh, vh, q_seg, k_seg, kw


def _heads_last(x, n: int):
    """(B, N, Tp, H) -> (B, n, N, H): drops the padding rows."""
    return x[:, :, :n].transpose(0, 2, 1, 3)


def _offsets(q_offset, k_offset):
    return jnp.stack([jnp.asarray(q_offset, jnp.int32), jnp.asarray(k_offset, jnp.int32)])


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, interpret, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )


_PAR3_ARB = ("parallel", "parallel", "parallel", "arbitrary")


def _q_row(b, n, i, j, off):
    """Index map of query block i of head n over the grid (B, N, Tp/bq, Sp/bk)."""
    return (b, n, i, 0)


def _q_major_specs(bq: int, bk: int, nk: int, H: int, G: int, causal: bool, has_seg: bool):
    """BlockSpecs over the grid (B, N, Tp/bq, Sp/bk) of the forward and dq kernels.

    Returns (inputs, rows, stats): inputs for (q, k, v, q_seg, k_seg), where query block i of head n
    meets key block j of its kv head n // G; rows (bq, H) and stats (bq, 1) of query block i of head n,
    for the other per-query arrays. Causal steps past the diagonal are clamped to the last visible key
    block, so the pipeline issues no new DMA for them.
    """

    def kv_block(i, j, off):
        if not causal:
            return j
        last = causal_blocks.num_visible_k_blocks(off[0] + (i + 1) * bq - 1, off[1], bk, nk) - 1
        return jnp.clip(last, 0, j)

    rows = pl.BlockSpec((None, None, bq, H), _q_row)
    stats = pl.BlockSpec((None, None, bq, 1), _q_row)
    kv = pl.BlockSpec((None, None, bk, H), lambda b, n, i, j, off: (b, n // G, kv_block(i, j, off), 0))
    inputs = [
        rows,
        kv,
        kv,
        pl.BlockSpec((None, bq, 1), lambda b, n, i, j, off: (b, i, 0)) if has_seg else None,
        pl.BlockSpec((None, 1, bk), lambda b, n, i, j, off: (b, 0, kv_block(i, j, off))) if has_seg else None,
    ]
    return inputs, rows, stats


def block_forward(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, q_offset=0, k_offset=0, causal: bool = True,
                  q_chunk: int = 128, k_chunk: int = 128, interpret: bool = False):
    """Mosaic version of `blockwise.block_forward`: (out (B, T, N, H) f32, lse (B, T, N) f32)."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    qh, kh, vh, q_seg, k_seg, kw = _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk)
    Tp, Sp, bq, bk = qh.shape[2], kh.shape[2], kw["bq"], kw["bk"]
    inputs, rows, stats = _q_major_specs(bq, bk, Sp // bk, H, G, causal, q_seg is not None)
    out_shape = [
        jax.ShapeDtypeStruct((B, N, Tp, H), jnp.float32),
        jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32),
    ]
    scratch = [
        pltpu.VMEM((bq, 1), jnp.float32),
        pltpu.VMEM((bq, 1), jnp.float32),
        pltpu.VMEM((bq, H), jnp.float32),
    ]
    out, lse = _call(
        functools.partial(_fwd_kernel, **kw),
        (B, N, Tp // bq, Sp // bk),
        inputs,
        [rows, stats],
        out_shape,
        scratch,
        _PAR3_ARB,
        interpret,
        "lwm_tpu_flash_fwd",
    )(_offsets(q_offset, k_offset), qh, kh, vh, q_seg, k_seg)
    return _heads_last(out, T), lse[:, :, :T, 0].transpose(0, 2, 1)


def block_backward(q, k, v, o, lse, do, q_segment_ids=None, kv_segment_ids=None, *, q_offset=0, k_offset=0,
                   causal: bool = True, q_chunk: int = 128, k_chunk: int = 128, interpret: bool = False):
    """Mosaic version of `blockwise.block_backward`: (dq, dk, dv) float32 from a dq and a dk/dv kernel."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qh, kh, vh, q_seg, k_seg, kw = _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk)
    Tp, Sp, bq, bk = qh.shape[2], kh.shape[2], kw["bq"], kw["bk"]
    nq, nk = Tp // bq, Sp // bk
    doh = pad_to(do.transpose(0, 2, 1, 3), bq, 2)  # (B, N, Tp, H)
    lse_t, delta_t = backward_rows(o, lse, do, bq)  # (B, N, Tp)
    lse_h, delta_h = lse_t[..., None], delta_t[..., None]  # (B, N, Tp, 1)
    offsets = _offsets(q_offset, k_offset)
    has_seg = q_seg is not None

    inputs, rows, stats = _q_major_specs(bq, bk, Sp // bk, H, G, causal, has_seg)
    dq = _call(
        functools.partial(_dq_kernel, **kw),
        (B, N, nq, nk),
        inputs + [rows, stats, stats],
        rows,
        jax.ShapeDtypeStruct((B, N, Tp, H), jnp.float32),
        [pltpu.VMEM((bq, H), jnp.float32)],
        _PAR3_ARB,
        interpret,
        "lwm_tpu_flash_dq",
    )(offsets, qh, kh, vh, q_seg, k_seg, doh, lse_h, delta_h)

    def q_block(b, h, j, r, off):  # skipped causal steps re-use the first visible query block: no DMA
        i = r % nq
        if not causal:
            return i
        return jnp.clip(causal_blocks.first_visible_q_block(off[0], off[1] + j * bk, bq, nq), i, nq - 1)

    q_head_row = lambda b, h, j, r, off: (b, h * G + r // nq, q_block(b, h, j, r, off), 0)
    head_rows = pl.BlockSpec((None, None, bq, H), q_head_row)
    head_stats = pl.BlockSpec((None, None, bq, 1), q_head_row)
    kv_rows = pl.BlockSpec((None, None, bk, H), lambda b, h, j, r, off: (b, h, j, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, nq=nq, **kw),
        (B, K, nk, G * nq),
        [
            head_rows,
            kv_rows,
            kv_rows,
            pl.BlockSpec((None, bq, 1), lambda b, h, j, r, off: (b, q_block(b, h, j, r, off), 0))
            if has_seg
            else None,
            pl.BlockSpec((None, 1, bk), lambda b, h, j, r, off: (b, 0, j)) if has_seg else None,
            head_rows,
            head_stats,
            head_stats,
        ],
        [kv_rows] * 2,
        [jax.ShapeDtypeStruct((B, K, Sp, H), jnp.float32)] * 2,
        [pltpu.VMEM((bk, H), jnp.float32)] * 2,
        _PAR3_ARB,
        interpret,
        "lwm_tpu_flash_dkv",
    )(offsets, qh, kh, vh, q_seg, k_seg, doh, lse_h, delta_h)
    return _heads_last(dq, T), _heads_last(dk, S), _heads_last(dv, S)


_flash = attention_with_vjp(block_forward, block_backward)


def flash_attention(q, k, v, segment_ids=None, *, causal: bool = True, q_chunk: int = 128, k_chunk: int = 128,
                    interpret: bool = False):
    """q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H): the Mosaic kernels under one custom_vjp.

    interpret=True runs them on CPU in TPU interpret mode (slow; for tests).
    """
    return _flash(q, k, v, segment_ids, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, interpret=interpret)
