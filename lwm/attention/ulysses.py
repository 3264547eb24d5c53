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
"""
from __future__ import annotations


import jax.numpy as jnp
from jax import lax

from lwm.parallel import sharding
from lwm.attention import layout
from lwm.attention.ring import RingConfig


def ulysses_local(cfg: RingConfig, q, k, v, seg, *, kernel):
    """This device's shard (inside shard_map over cfg.axis_name): q (b, t, n, h), k/v (b, t, k, h),
    seg (b, t) | None -> (b, t, n, h). kernel(q, k, v, seg) is the local full-sequence attention."""
    sp = lax.axis_size(cfg.axis_name)
    balance = cfg.load_balance if cfg.mask_balance is None else cfg.mask_balance
    r = sharding.ulysses_kv_repeat(q.shape[2], k.shape[2], sp)
    if r > 1:
        k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)

    def to_heads(x):  # (b, t, n, h) -> (b, T, n/sp, h), natural order
        x = lax.all_to_all(x, cfg.axis_name, split_axis=2, concat_axis=1, tiled=True)
        return layout.from_layout(x, sp, balance, axis=1)

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    segh = None
    if seg is not None:
        segh = layout.from_layout(lax.all_gather(seg, cfg.axis_name, axis=1, tiled=True), sp, balance, axis=1)
    out = kernel(qh, kh, vh, segh)
    out = layout.to_layout(out, sp, balance, axis=1)
    return lax.all_to_all(out, cfg.axis_name, split_axis=1, concat_axis=2, tiled=True)
