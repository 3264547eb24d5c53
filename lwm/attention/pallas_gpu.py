"""Fused flash-attention kernels in Triton-style Pallas (`jax.experimental.pallas`, GPU backend).

Three kernels, all with causal block skipping (the rule of `causal_blocks.py`), segment ids,
grouped-query heads and global position offsets (so the ring can run them at every step):
  _fwd_kernel  grid (B, N, T/bq): one query block; loops over key blocks up to the causal diagonal with
               the online softmax; writes out (bq, H) and lse (bq,).
  _dq_kernel   grid (B, N, T/bq): recomputes P for one query block against the visible key blocks and
               accumulates dQ = dS K.
  _dkv_kernel  grid (B, K, S/bk): one key block; loops over the G query heads that share it and over the
               query blocks at or after the diagonal, accumulating dK = dS^T Q and dV = P^T dO.

Status: the CPU tests run them in Pallas interpret mode against the dense reference (forward and
gradients). On a GPU they were compiled by Triton and checked on an H100 (fp32 and bf16, GQA, segment ids,
padding, ring offsets, the model with 'pallas' and 'ring_pallas') and timed against cuDNN's fused attention
with `benchmarks/pallas_gpu_bench.py`; see docs/ring_attention.md for the figures.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lwm.attention import causal_blocks
from lwm.attention.blockwise import attention_with_vjp, pad_to
from lwm.attention.pallas_shared import as_offset, backward_rows, check_inputs, next_power_of_2

# Block caps and Triton launch settings of the forward and of the two backward kernels, for 2-byte inputs
# (bf16/fp16); 4-byte inputs halve the block caps to stay inside shared memory. The backward kernels hold
# more tiles live (dk and dv accumulators, or dq with p and dp), so they get smaller blocks. Tuned on an
# H100 at H = 128 with `benchmarks/pallas_gpu_bench.py --parts tune` (docs/ring_attention.md).
FWD = dict(block=128, num_warps=8, num_stages=3)
BWD = dict(block=64, num_warps=4, num_stages=2)


def _block_cap(launch: dict, dtype) -> int:
    return launch["block"] if jnp.dtype(dtype).itemsize <= 2 else launch["block"] // 2


_REPORTED: set = set()


def _blocks(q_chunk: int, k_chunk: int, T: int, S: int, cap: int):
    """Power-of-two block sizes (Triton needs them), capped by `cap` and the padded lengths. A chunk above
    the cap is reported once per (chunk, cap) by a logging warning, since the kernel then uses another size."""
    for name, chunk in (("q_chunk", q_chunk), ("k_chunk", k_chunk)):
        if chunk > cap and (name, chunk, cap) not in _REPORTED:
            _REPORTED.add((name, chunk, cap))
            logging.getLogger(__name__).warning(
                "%s=%d is above the Triton kernel's block cap %d for these inputs (pallas_gpu.FWD / BWD, "
                "halved for 4-byte dtypes): blocks of %d are used", name, chunk, cap, cap)
    bq = min(next_power_of_2(min(q_chunk, cap)), next_power_of_2(T))
    bk = min(next_power_of_2(min(k_chunk, cap)), next_power_of_2(S))
    return bq, bk


def _compiler_params(H: int, launch: dict):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if H <= 64 else launch["num_warps"], num_stages=launch["num_stages"])


def _scores(q, k, q_pos, k_pos, k_local, q_seg, k_seg, causal: bool, kv_len: int, k_padded: bool, scale: float):
    """Scaled scores (bq, bk) f32 of one block pair; pairs that are not allowed are -inf."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = None
    if causal:
        mask = k_pos[None, :] <= q_pos[:, None]
    if q_seg is not None:
        seg = q_seg[:, None] == k_seg[None, :]
        mask = seg if mask is None else mask & seg
    if k_padded:
        valid = jnp.broadcast_to((k_local < kv_len)[None, :], (q_pos.shape[0], k_pos.shape[0]))
        mask = valid if mask is None else mask & valid
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _fwd_kernel(
    q_off_ref,
    k_off_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    k_seg_ref,
    o_ref,
    lse_ref,
    *,
    causal: bool,
    bq: int,
    bk: int,
    kv_len: int,
    k_padded: bool,
    scale: float,
):
    # q_ref (bq, H); k_ref, v_ref (Sp, H); q_seg_ref (bq,); k_seg_ref (Sp,); o_ref (bq, H); lse_ref (bq,)
    i = pl.program_id(2)
    q_offset, k_offset = q_off_ref[()], k_off_ref[()]
    nk = k_ref.shape[0] // bk
    q = q_ref[...]
    q_pos = q_offset + i * bq + jnp.arange(bq)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(j, carry):
        m, l, acc = carry
        k_local = j * bk + jnp.arange(bk)
        k = k_ref[pl.ds(j * bk, bk), :]
        k_seg = None if k_seg_ref is None else k_seg_ref[pl.ds(j * bk, bk)]
        s = _scores(q, k, q_pos, k_offset + k_local, k_local, q_seg, k_seg, causal, kv_len, k_padded, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        correction = jnp.exp(m - m_safe)
        v = v_ref[pl.ds(j * bk, bk), :]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=1), acc * correction[:, None] + pv

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
    )
    hi = causal_blocks.num_visible_k_blocks(q_offset + (i + 1) * bq - 1, k_offset, bk, nk, causal)
    m, l, acc = lax.fori_loop(0, hi, body, init)
    empty = l == 0.0  # no allowed key in this whole key block
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(
    q_off_ref,
    k_off_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    k_seg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    causal: bool,
    bq: int,
    bk: int,
    kv_len: int,
    k_padded: bool,
    scale: float,
):
    # q_ref, do_ref, dq_ref (bq, H); k_ref, v_ref (Sp, H); lse_ref, delta_ref (bq,)
    i = pl.program_id(2)
    q_offset, k_offset = q_off_ref[()], k_off_ref[()]
    nk = k_ref.shape[0] // bk
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = q_offset + i * bq + jnp.arange(bq)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def body(j, dq):
        k_local = j * bk + jnp.arange(bk)
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        k_seg = None if k_seg_ref is None else k_seg_ref[pl.ds(j * bk, bk)]
        s = _scores(q, k, q_pos, k_offset + k_local, k_local, q_seg, k_seg, causal, kv_len, k_padded, scale)
        p = jnp.exp(s - lse[:, None])  # (bq, bk)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    hi = causal_blocks.num_visible_k_blocks(q_offset + (i + 1) * bq - 1, k_offset, bk, nk, causal)
    dq = lax.fori_loop(0, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_off_ref,
    k_off_ref,
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
    *,
    causal: bool,
    bq: int,
    bk: int,
    kv_len: int,
    k_padded: bool,
    scale: float,
):
    # q_ref, do_ref (Tp, G, H): the G query heads sharing this kv head; lse_ref, delta_ref (G, Tp);
    # k_ref, v_ref, dk_ref, dv_ref (bk, H); q_seg_ref (Tp,); k_seg_ref (bk,)
    j = pl.program_id(2)
    q_offset, k_offset = q_off_ref[()], k_off_ref[()]
    G = q_ref.shape[1]
    nq = q_ref.shape[0] // bq
    k, v = k_ref[...], v_ref[...]
    k_local = j * bk + jnp.arange(bk)
    k_pos = k_offset + k_local
    k_seg = None if k_seg_ref is None else k_seg_ref[...]

    def q_block(i, carry, g):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), g, :]
        do = do_ref[pl.ds(i * bq, bq), g, :]
        lse = lse_ref[g, pl.ds(i * bq, bq)]
        delta = delta_ref[g, pl.ds(i * bq, bq)]
        q_pos = q_offset + i * bq + jnp.arange(bq)
        q_seg = None if q_seg_ref is None else q_seg_ref[pl.ds(i * bq, bq)]
        s = _scores(q, k, q_pos, k_pos, k_local, q_seg, k_seg, causal, kv_len, k_padded, scale)  # (bq, bk)
        p = jnp.exp(s - lse[:, None])
        dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    lo = causal_blocks.first_visible_q_block(q_offset, k_offset + j * bk, bq, nq, causal)

    def head(g, carry):
        return lax.fori_loop(lo, nq, functools.partial(q_block, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk, cap):
    """Pads T, S to the block sizes and H to a power of two (Triton's rule); zeros change no dot product.

    Returns q (B, Tp, N, Hp), k/v (B, Sp, K, Hp), q_seg (B, Tp), k_seg (B, Sp) (or None) and the kernels'
    static keywords (causal, bq, bk, kv_len, k_padded, scale).
    """
    T, H = q.shape[1], q.shape[3]
    S = k.shape[1]
    check_inputs("pallas_gpu", q, k, q_segment_ids, kv_segment_ids)
    bq, bk = _blocks(q_chunk, k_chunk, T, S, cap)
    Hp = next_power_of_2(H)
    q = pad_to(pad_to(q, bq, 1), Hp, 3)
    k = pad_to(pad_to(k, bk, 1), Hp, 3)
    v = pad_to(pad_to(v, bk, 1), Hp, 3)
    q_seg = pad_to(q_segment_ids, bq, 1)
    k_seg = pad_to(kv_segment_ids, bk, 1)
    kw = dict(causal=causal, bq=bq, bk=bk, kv_len=S, k_padded=k.shape[1] != S, scale=H**-0.5)
    return q, k, v, q_seg, k_seg, kw


def _scalar_spec():
    return pl.BlockSpec((), lambda *_: ())


def _q_block_specs(bq: int, Sp: int, Hp: int, G: int, has_seg: bool):
    """BlockSpecs over the grid (B, N, Tp/bq) of the forward and dq kernels.

    Returns (inputs, rows, stats): inputs for (q_offset, k_offset, q, k, v, q_seg, k_seg), with query
    block i of head n and all Sp keys/values of its kv head n // G; rows (bq, Hp) and stats (bq,) of
    query block i of head n, for the other per-query arrays.
    """
    rows = pl.BlockSpec((None, bq, None, Hp), lambda b, n, i: (b, i, n, 0))
    stats = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    kv = pl.BlockSpec((None, Sp, None, Hp), lambda b, n, i: (b, 0, n // G, 0))
    inputs = [
        _scalar_spec(),
        _scalar_spec(),
        rows,
        kv,
        kv,
        pl.BlockSpec((None, bq), lambda b, n, i: (b, i)) if has_seg else None,
        pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)) if has_seg else None,
    ]
    return inputs, rows, stats


def block_forward(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, q_offset=0, k_offset=0, causal: bool = True,
                  q_chunk: int = 128, k_chunk: int = 128, interpret: bool = False):
    """Fused-kernel version of `blockwise.block_forward`: (out (B, T, N, H) f32, lse (B, T, N) f32)."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    qp, kp, vp, q_seg, k_seg, kw = _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk,
                                            _block_cap(FWD, q.dtype))
    Tp, Sp, Hp, bq = qp.shape[1], kp.shape[1], qp.shape[3], kw["bq"]
    inputs, rows, stats = _q_block_specs(bq, Sp, Hp, G, q_seg is not None)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, N, Hp), jnp.float32), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, **kw),
        grid=(B, N, Tp // bq),
        in_specs=inputs,
        out_specs=[rows, stats],
        out_shape=out_shape,
        compiler_params=None if interpret else _compiler_params(Hp, FWD),
        interpret=interpret,
        name="lwm_flash_fwd",
    )(as_offset(q_offset), as_offset(k_offset), qp, kp, vp, q_seg, k_seg)
    return out[:, :T, :, :H], lse[:, :, :T].transpose(0, 2, 1)


def block_backward(q, k, v, o, lse, do, q_segment_ids=None, kv_segment_ids=None, *, q_offset=0, k_offset=0,
                   causal: bool = True, q_chunk: int = 128, k_chunk: int = 128, interpret: bool = False):
    """Fused-kernel version of `blockwise.block_backward`: (dq, dk, dv) float32, two kernels."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qp, kp, vp, q_seg, k_seg, kw = _prepare(q, k, v, q_segment_ids, kv_segment_ids, causal, q_chunk, k_chunk,
                                            _block_cap(BWD, q.dtype))
    Tp, Sp, Hp, bq, bk = qp.shape[1], kp.shape[1], qp.shape[3], kw["bq"], kw["bk"]
    dop = pad_to(pad_to(do, bq, 1), Hp, 3)
    lse_t, delta_t = backward_rows(o, lse, do, bq)  # (B, N, Tp)
    has_seg = q_seg is not None
    args = (as_offset(q_offset), as_offset(k_offset), qp, kp, vp, q_seg, k_seg, dop, lse_t, delta_t)
    params = None if interpret else _compiler_params(Hp, BWD)

    inputs, rows, stats = _q_block_specs(bq, Sp, Hp, G, has_seg)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(B, N, Tp // bq),
        in_specs=inputs + [rows, stats, stats],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct((B, Tp, N, Hp), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="lwm_flash_dq",
    )(*args)

    # grid (B, K, Sp/bk): key block j of kv head h, with all Tp rows of its G query heads
    group_rows = pl.BlockSpec((None, Tp, G, Hp), lambda b, h, j: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0))
    kv_rows = pl.BlockSpec((None, bk, None, Hp), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(B, K, Sp // bk),
        in_specs=[
            _scalar_spec(),
            _scalar_spec(),
            group_rows,
            kv_rows,
            kv_rows,
            pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)) if has_seg else None,
            pl.BlockSpec((None, bk), lambda b, h, j: (b, j)) if has_seg else None,
            group_rows,
            group_stats,
            group_stats,
        ],
        out_specs=[kv_rows] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, Sp, K, Hp), jnp.float32)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="lwm_flash_dkv",
    )(*args)
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H]


_flash = attention_with_vjp(block_forward, block_backward)


def flash_attention(q, k, v, segment_ids=None, *, causal: bool = True, q_chunk: int = 128, k_chunk: int = 128,
                    interpret: bool = False):
    """q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H): the Pallas GPU kernels under one custom_vjp."""
    return _flash(q, k, v, segment_ids, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, interpret=interpret)
