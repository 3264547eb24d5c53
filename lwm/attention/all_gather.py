"""All-gather context parallelism: every device gathers the whole key/value sequence over `sp`.

Each device keeps its T/sp queries, gathers k, v (B, T, K, H), their segment ids and their positions (the
run starts of every shard, `ring.geometry`) with one `lax.all_gather`, and attends its queries to the sp
gathered blocks with the same per-block function as the ring (`ring.attend_block`: wholly masked run
pairs skipped, partly masked ones computing only their needed chunks). There is no step-by-step
exchange, so no lockstep: the work per device is its own causal share, balanced by the layout.

Backward: the local custom_vjp returns dK, dV for the whole gathered sequence; the transpose of the
all-gather (a reduce-scatter, `psum_scatter`, inserted by JAX's autodiff) sums every device's part and
hands each device the rows it owns.

Memory: every device holds the full K and V, 2 * B * T * K/tp * H elements (plus their dK, dV in the
backward), instead of the ring's two blocks of T/sp: it fits mid-length contexts, not the longest.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lwm.attention import blockwise
from lwm.attention.ring import RingConfig, attend_block, geometry, grad_block


def _gathered_forward(cfg: RingConfig, q, seg, q_starts, k_all, v_all, seg_all, starts_all):
    """q (b, t, n, h) against the gathered blocks k_all, v_all (sp, b, t, k, h) -> out f32, lse."""
    B, T, N, H = q.shape
    geo, _ = geometry(cfg, T)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    o0 = jnp.zeros((B, T, N, H), acc_dtype)
    lse0 = jnp.full((B, T, N), -jnp.inf, jnp.float32)
    o0, lse0 = blockwise.match_vma((o0, lse0), q, k_all)

    def step(carry, xs):
        o, lse = carry
        k_blk, v_blk, seg_blk, k_starts = xs
        return attend_block(cfg, geo, q, seg, q_starts, o, lse, k_blk, v_blk, seg_blk, k_starts), None

    (o, lse), _ = lax.scan(step, (o0, lse0), (k_all, v_all, seg_all, starts_all))
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(cfg, q, seg, q_starts, k_all, v_all, seg_all, starts_all):
    out, _ = _gathered_forward(cfg, q, seg, q_starts, k_all, v_all, seg_all, starts_all)
    return out.astype(q.dtype)


def _gathered_fwd(cfg, q, seg, q_starts, k_all, v_all, seg_all, starts_all):
    out, lse = _gathered_forward(cfg, q, seg, q_starts, k_all, v_all, seg_all, starts_all)
    out = out.astype(q.dtype)
    return out, (q, seg, q_starts, k_all, v_all, seg_all, starts_all, out, lse)


def _gathered_bwd(cfg, res, do):
    q, seg, q_starts, k_all, v_all, seg_all, starts_all, out, lse = res
    geo, _ = geometry(cfg, q.shape[1])
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)
    dq0 = blockwise.match_vma(jnp.zeros(q.shape, acc_dtype), q, k_all)

    def step(dq, xs):
        k_blk, v_blk, seg_blk, k_starts = xs
        dq, dk, dv = grad_block(cfg, geo, q, seg, q_starts, out, lse, do, dq, k_blk, v_blk, seg_blk, k_starts)
        return dq, (dk, dv)

    dq, (dk_all, dv_all) = lax.scan(step, dq0, (k_all, v_all, seg_all, starts_all))
    return (dq.astype(q.dtype), None, None, dk_all.astype(k_all.dtype), dv_all.astype(v_all.dtype), None, None)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def all_gather_local(cfg: RingConfig, q, k, v, seg):
    """This device's shard (inside shard_map over cfg.axis_name): q (b, t, n, h), k/v (b, t, k, h),
    seg (b, t) | None -> (b, t, n, h) in q.dtype."""
    geo, starts_of = geometry(cfg, q.shape[1])
    q_starts = blockwise.match_vma(starts_of(lax.axis_index(cfg.axis_name)), q)
    gather = functools.partial(lax.all_gather, axis_name=cfg.axis_name)  # (sp, ...) stacked by device
    k_all, v_all, starts_all = gather(k), gather(v), gather(q_starts)
    seg_all = None if seg is None else gather(seg)
    return _gathered(cfg, q, seg, q_starts, k_all, v_all, seg_all, starts_all)
