"""Ulysses (all-to-all) context parallelism over `sp` (DeepSpeed-Ulysses, Jacobs et al. 2023).

Each device enters with T/sp tokens of every (tp-local) head. One all-to-all per tensor turns that into
the whole sequence for N/sp of the heads: q (b, T/sp, n, h) -> (b, T, n/sp, h), and the same for k, v.
Attention then runs locally with the chosen kernel (`blockwise` or `pallas`, each with its own causal
block skipping, so every device does exactly 1/sp of the work whatever the layout), and a second
all-to-all turns the output back to (b, T/sp, n, h). Segment ids are all-gathered (they have no head axis).

The gathered sequence arrives in layout order; it is put back in natural order with the layout's own
inverse (`layout.from_layout`, a local reshape) before the kernel and re-laid-out after, so the kernel's
index is the token's position.

Heads: the tp-local query heads n = N/tp must divide by sp, else `lwm.parallel.sharding.check_ulysses_heads` raises before compiling,
naming the numbers. The tp-local kv heads k = K/tp need not: when sp does not divide them, each kv head is
repeated r = sp / gcd(k, sp) times first. That is always exact once sp divides n = G * k (G = N/K query
heads per kv head): sp / gcd(k, sp) then divides G, query head j reads copy j // (G / r) of its own kv
head, and the repeat's transpose sums the copies' gradients. The cost: r times the kv all-to-all volume.
Communication per device per call: 4 all-to-alls of (b, T/sp, n or k, h) forward (q, k, v, out).

Two levels, `ulysses_ring_local` (context_parallel_strategy='ulysses_ring', USP / TransformerEngine's
a2a+p2p): sp = R * u devices form R inner groups of u consecutive devices (group g = devices g*u .. g*u+u-1,
the same node when the mesh puts a node's devices next to each other on 'sp'). Inside a group the same
all-to-all as above, over u devices, gives every member the group's R-th of the sequence for n/u heads
(kv heads repeated to divide by u as above, so u is capped by n, not by k); an outer ring across the groups
(`ring.ring_local` with `RingConfig.ulysses_size = u`: device d sends to d + u) then runs exactly as the
plain ring, with the group's tokens described as runs of positions (`layout.runs(..., group=u)`, after
the local reorder `layout.to_group_order`): the layout of the sp devices is unchanged, only seen by groups.
The sub-axis collectives are `lax.all_to_all` / `lax.all_gather` over 'sp' with `axis_index_groups` (the
groups above) and `lax.ppermute` over 'sp' with a permutation between groups; jax 0.10 supports both inside
`jax.shard_map` (a second mesh with 'sp' split in two names cannot be used there: shard_map requires the
mesh of the context). Per device per call, forward: the 4 group all-to-alls of (b, T/sp, n or k*r, h)
and R - 1 ring hops of the k, v block (b, T/R, k*r/u, h) with its segment ids.
"""
from __future__ import annotations


import jax.numpy as jnp
from jax import lax

from lwm.parallel import sharding
from lwm.attention import layout
from lwm.attention.ring import RingConfig, ring_local


def _groups(cfg: RingConfig, u: int):
    """axis_index_groups of the inner groups: [[0..u-1], [u..2u-1], ...] (None: the whole axis)."""
    sp = lax.axis_size(cfg.axis_name)
    return None if u == sp else [list(range(g * u, (g + 1) * u)) for g in range(sp // u)]


def _seq_to_heads(cfg, x, groups):
    """(b, t, n, h) -> (b, u*t, n/u, h): the group members' shards concatenated member by member."""
    return lax.all_to_all(x, cfg.axis_name, split_axis=2, concat_axis=1, tiled=True, axis_index_groups=groups)


def _heads_to_seq(cfg, x, groups):
    """The inverse of `_seq_to_heads`: (b, u*t, n/u, h) -> (b, t, n, h)."""
    return lax.all_to_all(x, cfg.axis_name, split_axis=1, concat_axis=2, tiled=True, axis_index_groups=groups)


def _repeat_kv(q, k, v, u: int):
    r = sharding.ulysses_kv_repeat(q.shape[2], k.shape[2], u)
    return (k, v) if r == 1 else (jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2))


def ulysses_local(cfg: RingConfig, q, k, v, seg, *, kernel):
    """This device's shard (inside shard_map over cfg.axis_name): q (b, t, n, h), k/v (b, t, k, h),
    seg (b, t) | None -> (b, t, n, h). kernel(q, k, v, seg) is the local full-sequence attention."""
    sp = lax.axis_size(cfg.axis_name)
    balance = cfg.load_balance if cfg.mask_balance is None else cfg.mask_balance
    k, v = _repeat_kv(q, k, v, sp)
    to_heads = lambda x: layout.from_layout(_seq_to_heads(cfg, x, None), sp, balance, axis=1)  # natural order
    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    segh = None
    if seg is not None:
        segh = layout.from_layout(lax.all_gather(seg, cfg.axis_name, axis=1, tiled=True), sp, balance, axis=1)
    out = kernel(qh, kh, vh, segh)
    return _heads_to_seq(cfg, layout.to_layout(out, sp, balance, axis=1), None)


def ulysses_ring_local(cfg: RingConfig, q, k, v, seg):
    """Two-level context parallelism on this device's shard (inside shard_map over cfg.axis_name, see the
    module docstring): q (b, t, n, h), k/v (b, t, k, h), seg (b, t) | None -> (b, t, n, h) in q.dtype.

    cfg.ulysses_size = u (divides sp; n % u == 0, checked by the caller). The data is in the layout
    cfg.load_balance of sp devices. Gradients: the ring's custom_vjp inside, autodiff of the all-to-alls
    (their transposes) and of the kv repeat (a sum over the copies) outside."""
    u = cfg.ulysses_size
    if u == 1:  # groups of one device: the plain ring
        return ring_local(cfg, q, k, v, seg)
    groups = _groups(cfg, u)
    k, v = _repeat_kv(q, k, v, u)
    balance = cfg.load_balance
    to_runs = lambda x: layout.to_group_order(x, u, balance, axis=1)
    qh, kh, vh = (to_runs(_seq_to_heads(cfg, x, groups)) for x in (q, k, v))
    segh = None
    if seg is not None:
        segh = to_runs(lax.all_gather(seg, cfg.axis_name, axis=1, tiled=True, axis_index_groups=groups))
    out = ring_local(cfg, qh, kh, vh, segh)
    return _heads_to_seq(cfg, layout.from_group_order(out, u, balance, axis=1), groups)
