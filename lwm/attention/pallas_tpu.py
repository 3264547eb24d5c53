"""Fused flash-attention kernels for TPU in Mosaic Pallas (`jax.experimental.pallas.tpu`).

The TPU idiom differs from the Triton one (`pallas_gpu.py`): the grid runs in order on one core, so the
key-block loop is the last ("arbitrary") grid axis, with the running max, sum and output accumulator kept
in VMEM scratch across it. Global offsets (for the ring) come in by scalar prefetch (SMEM). Causal block
skipping is two-fold: `pl.when` skips the compute of key blocks past the diagonal, and the index maps clamp
those steps to the last visible block, so the pipeline issues no DMA for them.
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

from lwm.attention.pallas_common import pad_to


def _last_visible_k_block(q_last, k_offset, bk: int):
    """Index of the last key block with a key at global position <= q_last (-1 if none)."""
    d = q_last - k_offset
    return jnp.where(d < 0, -1, lax.div(d, bk))


def _first_visible_q_block(q_offset, k_first, bq: int):
    """Index of the first query block whose last query is at global position >= k_first."""
    d = k_first - q_offset
    return jnp.where(d < 0, 0, lax.div(d, bq))


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

    visible = j <= _last_visible_k_block(q_offset + (i + 1) * bq - 1, k_offset, bk) if causal else True

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

    visible = j <= _last_visible_k_block(q_offset + (i + 1) * bq - 1, k_offset, bk) if causal else True

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

    visible = i >= _first_visible_q_block(q_offset, k_offset + j * bk, bq) if causal else True

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


def _prepare(q, k, v, q_segment_ids, kv_segment_ids, q_chunk, k_chunk):
    """Heads-first, padded layout: q (B, N, Tp, H), k/v (B, K, Sp, H), q_seg (B, Tp, 1), k_seg (B, 1, Sp)."""
    T, N = q.shape[1], q.shape[2]
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"pallas_tpu: query heads N={N} must be a multiple of kv heads K={K}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pallas_tpu: pass both q_segment_ids and kv_segment_ids, or neither")
    bq, bk = min(q_chunk, T), min(k_chunk, S)
    qh = pad_to(q.transpose(0, 2, 1, 3), bq, 2)
    kh = pad_to(k.transpose(0, 2, 1, 3), bk, 2)
    vh = pad_to(v.transpose(0, 2, 1, 3), bk, 2)
    q_seg = None if q_segment_ids is None else pad_to(q_segment_ids, bq, 1)[:, :, None]
    k_seg = None if kv_segment_ids is None else pad_to(kv_segment_ids, bk, 1)[:, None, :]
    return qh, kh, vh, q_seg, k_seg, bq, bk


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
    q_chunk: int = 128,
    k_chunk: int = 128,
    interpret: bool = False,
):
    """Mosaic version of `blockwise.block_forward`: (out (B, T, N, H) f32, lse (B, T, N) f32)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qh, kh, vh, q_seg, k_seg, bq, bk = _prepare(q, k, v, q_segment_ids, kv_segment_ids, q_chunk, k_chunk)
    Tp, Sp = qh.shape[2], kh.shape[2]
    kw = dict(causal=causal, bq=bq, bk=bk, kv_len=S, k_padded=Sp != S, scale=H**-0.5)

    def kv_block(b, n, i, j, off):  # clamp skipped causal steps to the last visible block: no new DMA
        if not causal:
            return j
        return jnp.clip(_last_visible_k_block(off[0] + (i + 1) * bq - 1, off[1], bk), 0, j)

    has_seg = q_seg is not None
    in_specs = [
        pl.BlockSpec((None, None, bq, H), lambda b, n, i, j, off: (b, n, i, 0)),
        pl.BlockSpec((None, None, bk, H), lambda b, n, i, j, off: (b, n // G, kv_block(b, n, i, j, off), 0)),
        pl.BlockSpec((None, None, bk, H), lambda b, n, i, j, off: (b, n // G, kv_block(b, n, i, j, off), 0)),
        pl.BlockSpec((None, bq, 1), lambda b, n, i, j, off: (b, i, 0)) if has_seg else None,
        pl.BlockSpec((None, 1, bk), lambda b, n, i, j, off: (b, 0, kv_block(b, n, i, j, off)))
        if has_seg
        else None,
    ]
    out_specs = [
        pl.BlockSpec((None, None, bq, H), lambda b, n, i, j, off: (b, n, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j, off: (b, n, i, 0)),
    ]
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
        in_specs,
        out_specs,
        out_shape,
        scratch,
        _PAR3_ARB,
        interpret,
        "lwm_tpu_flash_fwd",
    )(_offsets(q_offset, k_offset), qh, kh, vh, q_seg, k_seg)
    return out[:, :, :T].transpose(0, 2, 1, 3), lse[:, :, :T, 0].transpose(0, 2, 1)


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
    q_chunk: int = 128,
    k_chunk: int = 128,
    interpret: bool = False,
):
    """Mosaic version of `blockwise.block_backward`: (dq, dk, dv) float32 from a dq and a dk/dv kernel."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qh, kh, vh, q_seg, k_seg, bq, bk = _prepare(q, k, v, q_segment_ids, kv_segment_ids, q_chunk, k_chunk)
    Tp, Sp = qh.shape[2], kh.shape[2]
    nq, nk = Tp // bq, Sp // bk
    doh = pad_to(do.transpose(0, 2, 1, 3), bq, 2)  # (B, N, Tp, H)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (B, T, N)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows with no allowed key: all P are 0 anyway
    lse_h = pad_to(lse.transpose(0, 2, 1), bq, 2)[..., None]  # (B, N, Tp, 1)
    delta_h = pad_to(delta.transpose(0, 2, 1), bq, 2)[..., None]
    kw = dict(causal=causal, bq=bq, bk=bk, kv_len=S, k_padded=Sp != S, scale=H**-0.5)
    offsets = _offsets(q_offset, k_offset)
    has_seg = q_seg is not None

    def kv_block(b, n, i, j, off):
        if not causal:
            return j
        return jnp.clip(_last_visible_k_block(off[0] + (i + 1) * bq - 1, off[1], bk), 0, j)

    q_row = lambda b, n, i, j, off: (b, n, i, 0)
    dq = _call(
        functools.partial(_dq_kernel, **kw),
        (B, N, nq, nk),
        [
            pl.BlockSpec((None, None, bq, H), q_row),
            pl.BlockSpec((None, None, bk, H), lambda b, n, i, j, off: (b, n // G, kv_block(b, n, i, j, off), 0)),
            pl.BlockSpec((None, None, bk, H), lambda b, n, i, j, off: (b, n // G, kv_block(b, n, i, j, off), 0)),
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j, off: (b, i, 0)) if has_seg else None,
            pl.BlockSpec((None, 1, bk), lambda b, n, i, j, off: (b, 0, kv_block(b, n, i, j, off)))
            if has_seg
            else None,
            pl.BlockSpec((None, None, bq, H), q_row),
            pl.BlockSpec((None, None, bq, 1), q_row),
            pl.BlockSpec((None, None, bq, 1), q_row),
        ],
        pl.BlockSpec((None, None, bq, H), q_row),
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
        return jnp.clip(_first_visible_q_block(off[0], off[1] + j * bk, bq), i, nq - 1)

    q_head_row = lambda b, h, j, r, off: (b, h * G + r // nq, q_block(b, h, j, r, off), 0)
    kv_row = lambda b, h, j, r, off: (b, h, j, 0)
    dk, dv = _call(
        functools.partial(_dkv_kernel, nq=nq, **kw),
        (B, K, nk, G * nq),
        [
            pl.BlockSpec((None, None, bq, H), q_head_row),
            pl.BlockSpec((None, None, bk, H), kv_row),
            pl.BlockSpec((None, None, bk, H), kv_row),
            pl.BlockSpec((None, bq, 1), lambda b, h, j, r, off: (b, q_block(b, h, j, r, off), 0))
            if has_seg
            else None,
            pl.BlockSpec((None, 1, bk), lambda b, h, j, r, off: (b, 0, j)) if has_seg else None,
            pl.BlockSpec((None, None, bq, H), q_head_row),
            pl.BlockSpec((None, None, bq, 1), q_head_row),
            pl.BlockSpec((None, None, bq, 1), q_head_row),
        ],
        [pl.BlockSpec((None, None, bk, H), kv_row)] * 2,
        [jax.ShapeDtypeStruct((B, K, Sp, H), jnp.float32)] * 2,
        [pltpu.VMEM((bk, H), jnp.float32)] * 2,
        _PAR3_ARB,
        interpret,
        "lwm_tpu_flash_dkv",
    )(offsets, qh, kh, vh, q_seg, k_seg, doh, lse_h, delta_h)
    heads_last = lambda x, n: x[:, :, :n].transpose(0, 2, 1, 3)
    return heads_last(dq, T), heads_last(dk, S), heads_last(dv, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, segment_ids, causal, q_chunk, k_chunk, interpret):
    out, _ = block_forward(
        q, k, v, segment_ids, segment_ids, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, interpret=interpret
    )
    return out.astype(q.dtype)


def _flash_fwd(q, k, v, segment_ids, causal, q_chunk, k_chunk, interpret):
    out, lse = block_forward(
        q, k, v, segment_ids, segment_ids, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, interpret=interpret
    )
    out = out.astype(q.dtype)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, q_chunk, k_chunk, interpret, res, do):
    q, k, v, segment_ids, out, lse = res
    dq, dk, dv = block_backward(
        q,
        k,
        v,
        out,
        lse,
        do,
        segment_ids,
        segment_ids,
        causal=causal,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        interpret=interpret,
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal: bool = True,
    q_chunk: int = 128,
    k_chunk: int = 128,
    interpret: bool = False,
):
    """q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H): the Mosaic kernels under one custom_vjp.

    interpret=True runs them on CPU in TPU interpret mode (slow; for tests).
    """
    return _flash(q, k, v, segment_ids, causal, q_chunk, k_chunk, interpret)
