"""RingAttention: exact attention over a sequence sharded across the mesh's `sp` axis.

Each of the sp devices holds T / sp positions of q, k, v and the segment ids, in the order of a layout
(`lwm.attention.layout`: contiguous 'none', 'zigzag' or 'striped'). Queries stay put; the key/value block
travels around the ring with `lax.ppermute`, one hop per step, together with its segment ids and its
*positions* (the start of each of its runs), so after sp steps every query block has met every key block
while only two kv blocks are ever held. Masks are computed from those carried positions, never from the
device index: each (query run, key run) pair becomes one call of the shared block kernel `block_forward`
(jnp or Pallas) with the relative key offset, and the per-pair (out, lse) partials merge exactly by
log-sum-exp. Under a causal mask, wholly masked run pairs are skipped with `lax.cond` (no FLOPs) and a
partly masked pair computes only the key chunks up to its diagonal (the kernel's own skipping).

The backward is a second ring pass (custom_vjp): k, v, segment ids, positions and the dk, dv accumulators
rotate together; each device adds its queries' contribution to the visiting block's dk, dv using the
*global* softmax statistics (lse) saved by the forward, and accumulates dq locally. After sp hops the dk,
dv accumulators are back on the device that owns the block.

`attend_block` / `grad_block` (one key/value block against the local queries) are shared with the
all-gather strategy (`all_gather.py`). The two-level strategy 'ulysses_ring' (`ulysses.ulysses_ring_local`)
runs this same ring over inner groups (`RingConfig.ulysses_size` = u > 1): ring member i is group i of
devices i*u .. i*u+u-1, a hop goes from device d to d + u, and a member's positions are its group's runs
(`layout.runs(..., group=u)`). See docs/context_parallel.md and docs/ring_attention.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lwm.parallel import sharding
from lwm.attention import blockwise, causal_blocks, layout

BATCH_AXES = sharding.BATCH_AXES
HEAD_AXIS = sharding.HEAD_AXIS
SEQ_AXIS = sharding.SEQ_AXIS


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Static settings of one context-parallel call (hashable: a nondiff argument of the custom_vjps)."""

    causal: bool = True
    q_chunk: int = 512
    k_chunk: int = 512
    block_impl: str = "blockwise"  # "blockwise" (jnp) or "pallas" (fused kernel for the backend)
    pallas_interpret: bool = False
    axis_name: str = SEQ_AXIS
    load_balance: str = "none"  # the layout q/k/v arrive in (lwm.attention.layout)
    # 'ulysses_ring': the ring runs over the sp/ulysses_size inner groups of consecutive devices (group g =
    # devices g*u .. g*u+u-1), each device holding its group's whole shard for 1/u of the heads (ulysses.py)
    ulysses_size: int = 1
    # Testing only (negative controls, wrong on purpose): the layout the masks assume, when it differs
    # from the data's (None: the same); and global_offsets=False masks every block as the diagonal one.
    mask_balance: str | None = None
    global_offsets: bool = True


def block_fns(cfg: RingConfig):
    """The (forward, backward) pair of block functions every strategy calls per block pair."""
    kw = dict(causal=cfg.causal, q_chunk=cfg.q_chunk, k_chunk=cfg.k_chunk)
    if cfg.block_impl == "blockwise":
        return (
            functools.partial(blockwise.block_forward, **kw),
            functools.partial(blockwise.block_backward, **kw),
        )
    if cfg.block_impl == "pallas":
        from lwm.attention import pallas_common

        kernels = pallas_common.kernel_module(cfg.pallas_interpret)
        kw["interpret"] = cfg.pallas_interpret
        return (functools.partial(kernels.block_forward, **kw), functools.partial(kernels.block_backward, **kw))
    raise ValueError(f"context parallelism: unknown block_impl {cfg.block_impl!r}; allowed: 'blockwise', 'pallas'")


# ------------------------------------------------------------------------------- shards as runs of positions

@dataclasses.dataclass(frozen=True)
class Geometry:
    """A device's shard as `num_runs` runs of `run_len` tokens, positions start + stride * j (layout.runs)."""

    num_runs: int
    stride: int
    run_len: int


def ring_size(cfg: RingConfig):
    """Hops of the ring: sp, or the number of inner groups sp / ulysses_size."""
    return lax.axis_size(cfg.axis_name) // cfg.ulysses_size


def ring_index(cfg: RingConfig):
    """This device's place on the ring (its inner group's index under 'ulysses_ring'): int32 scalar."""
    return lax.axis_index(cfg.axis_name) // cfg.ulysses_size


def geometry(cfg: RingConfig, local_len: int):
    """(Geometry, starts(i) -> (R,) int32 run starts of ring member i) of the layout the masks assume."""
    sp = lax.axis_size(cfg.axis_name)
    balance = cfg.load_balance if cfg.mask_balance is None else cfg.mask_balance
    R, stride, n, starts_of = layout.runs(balance, sp, local_len, group=cfg.ulysses_size)
    if not cfg.global_offsets:
        return Geometry(R, stride, n), lambda d: jnp.zeros((R,), jnp.int32)
    return Geometry(R, stride, n), lambda d: jnp.stack([jnp.asarray(x, jnp.int32) for x in starts_of(d)])


def _pair(cfg: RingConfig, geo: Geometry, a, b):
    """(k_offset, fully_masked) of query run start a vs key run start b (both global positions).

    The causal rule key_pos <= query_pos between runs of stride s is a local causal mask with the keys
    shifted by k_offset = ceil((b - a) / s) (`causal_blocks.strided_key_offset`); in that local frame the
    whole key run is one block of run_len keys, wholly masked when the last query (local run_len - 1)
    sees none of it (`causal_blocks.num_visible_k_blocks` = 0)."""
    if not cfg.causal:
        return 0, None
    k_offset = causal_blocks.strided_key_offset(a, b, geo.stride)
    return k_offset, causal_blocks.num_visible_k_blocks(geo.run_len - 1, k_offset, geo.run_len, 1) == 0


def _runs(x, geo: Geometry, r: int):
    """Run r of a (B, T_local, ...) shard (None passes through)."""
    if x is None or geo.num_runs == 1:
        return x
    return x[:, r * geo.run_len:(r + 1) * geo.run_len]


def _join(parts):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def attend_block(cfg, geo, q, seg, q_starts, o, lse, k_blk, v_blk, seg_blk, k_starts):
    """Merges the local queries' attention to one key/value block (with its run starts) into (o, lse).

    q (b, t, n, h), seg (b, t) | None, q_starts / k_starts (R,) int32; o (b, t, n, h) f32, lse (b, t, n).
    Wholly masked run pairs are skipped (lax.cond: no FLOPs); the others call the block kernel, which skips
    the key chunks past its causal diagonal."""
    fwd, _ = block_fns(cfg)
    outs, lses = [], []
    for qr in range(geo.num_runs):
        o_r, lse_r = _runs(o, geo, qr), _runs(lse, geo, qr)
        q_r, seg_r = _runs(q, geo, qr), _runs(seg, geo, qr)
        for kr in range(geo.num_runs):
            k_offset, masked = _pair(cfg, geo, q_starts[qr], k_starts[kr])
            k_r, v_r, kseg_r = _runs(k_blk, geo, kr), _runs(v_blk, geo, kr), _runs(seg_blk, geo, kr)

            def compute(o_r=o_r, lse_r=lse_r, q_r=q_r, seg_r=seg_r, k_r=k_r, v_r=v_r, kseg_r=kseg_r,
                        k_offset=k_offset):
                o_b, lse_b = fwd(q_r, k_r, v_r, seg_r, kseg_r, q_offset=0, k_offset=k_offset)
                return blockwise.merge_partials(o_r, lse_r, o_b.astype(o_r.dtype), lse_b)

            if masked is None:
                o_r, lse_r = compute()
            else:
                o_r, lse_r = lax.cond(masked, lambda o_r=o_r, lse_r=lse_r: (o_r, lse_r), compute)
        outs.append(o_r)
        lses.append(lse_r)
    return _join(outs), _join(lses)


def grad_block(cfg, geo, q, seg, q_starts, o, lse, do, dq, k_blk, v_blk, seg_blk, k_starts):
    """The local queries' gradient contributions for one key/value block, given the final (o, lse).

    Returns (dq + this block's part, dk_blk, dv_blk) in float32; wholly masked run pairs add nothing."""
    _, bwd = block_fns(cfg)
    acc = dq.dtype
    dqs = [_runs(dq, geo, qr) for qr in range(geo.num_runs)]
    dks, dvs = [], []
    for kr in range(geo.num_runs):
        k_r, v_r, kseg_r = _runs(k_blk, geo, kr), _runs(v_blk, geo, kr), _runs(seg_blk, geo, kr)
        dk_r = blockwise.match_vma(jnp.zeros(k_r.shape, acc), q, k_r)
        dv_r = dk_r
        for qr in range(geo.num_runs):
            k_offset, masked = _pair(cfg, geo, q_starts[qr], k_starts[kr])
            args = [_runs(x, geo, qr) for x in (q, o, lse, do, seg)]

            def compute(dq_r=dqs[qr], dk_r=dk_r, dv_r=dv_r, args=args, k_r=k_r, v_r=v_r, kseg_r=kseg_r,
                        k_offset=k_offset):
                q_r, o_r, lse_r, do_r, seg_r = args
                dq_i, dk_i, dv_i = bwd(q_r, k_r, v_r, o_r, lse_r, do_r, seg_r, kseg_r, q_offset=0,
                                       k_offset=k_offset)
                return dq_r + dq_i, dk_r + dk_i, dv_r + dv_i

            if masked is None:
                dqs[qr], dk_r, dv_r = compute()
            else:
                keep = lambda dq_r=dqs[qr], dk_r=dk_r, dv_r=dv_r: (dq_r, dk_r, dv_r)
                dqs[qr], dk_r, dv_r = lax.cond(masked, keep, compute)
        dks.append(dk_r)
        dvs.append(dv_r)
    return _join(dqs), _join(dks), _join(dvs)


# ------------------------------------------------------------------------------------------------ the ring

def _rotate(cfg: RingConfig, sp: int, *xs):
    """Sends each array to the next device on the ring (device d -> d + 1 mod sp); under 'ulysses_ring'
    (u = ulysses_size > 1) to the same member of the next inner group (d -> d + u mod sp)."""
    u = cfg.ulysses_size
    perm = [(j, (j + u) % sp) for j in range(sp)]
    return tuple(None if x is None else lax.ppermute(x, cfg.axis_name, perm) for x in xs)


def _ring_forward(cfg: RingConfig, q, k, v, seg):
    """Local shard: q (b, t, n, h), k/v (b, t, k, h), seg (b, t) | None -> out f32, lse (b, t, n).

    The key/value block travels with its segment ids and its run starts (its positions)."""
    B, T, N, H = q.shape
    sp = lax.axis_size(cfg.axis_name)
    geo, starts_of = geometry(cfg, T)
    q_starts = blockwise.match_vma(starts_of(ring_index(cfg)), q)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def step_and_rotate(carry, _):
        o, lse, k_blk, v_blk, seg_blk, k_starts = carry
        o, lse = attend_block(cfg, geo, q, seg, q_starts, o, lse, k_blk, v_blk, seg_blk, k_starts)
        k_blk, v_blk, seg_blk, k_starts = _rotate(cfg, sp, k_blk, v_blk, seg_blk, k_starts)
        return (o, lse, k_blk, v_blk, seg_blk, k_starts), None

    o0 = jnp.zeros((B, T, N, H), acc_dtype)
    lse0 = jnp.full((B, T, N), -jnp.inf, jnp.float32)
    o0, lse0 = blockwise.match_vma((o0, lse0), q, k)
    carry = (o0, lse0, k, v, seg, q_starts)
    carry, _ = lax.scan(step_and_rotate, carry, None, length=ring_size(cfg) - 1)
    o, lse, k_blk, v_blk, seg_blk, k_starts = carry
    return attend_block(cfg, geo, q, seg, q_starts, o, lse, k_blk, v_blk, seg_blk, k_starts)


def _ring_backward(cfg: RingConfig, q, k, v, seg, o, lse, do):
    """Second ring pass: returns dq (b, t, n, h) and this device's dk, dv (b, t, k, h), float32."""
    T = q.shape[1]
    sp = lax.axis_size(cfg.axis_name)
    geo, starts_of = geometry(cfg, T)
    q_starts = blockwise.match_vma(starts_of(ring_index(cfg)), q)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def step_and_rotate(carry, _):
        dq, k_blk, v_blk, seg_blk, k_starts, dk_blk, dv_blk = carry
        dq, dk_i, dv_i = grad_block(cfg, geo, q, seg, q_starts, o, lse, do, dq, k_blk, v_blk, seg_blk, k_starts)
        dk_blk, dv_blk = dk_blk + dk_i, dv_blk + dv_i
        k_blk, v_blk, seg_blk, k_starts, dk_blk, dv_blk = _rotate(
            cfg, sp, k_blk, v_blk, seg_blk, k_starts, dk_blk, dv_blk)
        return (dq, k_blk, v_blk, seg_blk, k_starts, dk_blk, dv_blk), None

    zeros = blockwise.match_vma(
        (jnp.zeros(q.shape, acc_dtype), jnp.zeros(k.shape, acc_dtype), jnp.zeros(v.shape, acc_dtype)), q, k
    )
    carry = (zeros[0], k, v, seg, q_starts, zeros[1], zeros[2])
    carry, _ = lax.scan(step_and_rotate, carry, None, length=ring_size(cfg) - 1)
    dq, k_blk, v_blk, seg_blk, k_starts, dk_blk, dv_blk = carry
    dq, dk_i, dv_i = grad_block(cfg, geo, q, seg, q_starts, o, lse, do, dq, k_blk, v_blk, seg_blk, k_starts)
    dk, dv = _rotate(cfg, sp, dk_blk + dk_i, dv_blk + dv_i)  # the last hop brings dk, dv home
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_local(cfg: RingConfig, q, k, v, seg):
    """The ring on this device's shard (call inside shard_map over cfg.axis_name)."""
    out, _ = _ring_forward(cfg, q, k, v, seg)
    return out.astype(q.dtype)


def _ring_local_fwd(cfg, q, k, v, seg):
    out, lse = _ring_forward(cfg, q, k, v, seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg, out, lse)


def _ring_local_bwd(cfg, res, do):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _ring_backward(cfg, q, k, v, seg, out, lse, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def ambient_sp_mesh(what: str):
    """The mesh set with `jax.set_mesh`; raises if there is none or it has no 'sp' axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or SEQ_AXIS not in mesh.axis_names:
        names = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
        raise ValueError(
            f"{what} needs an ambient device mesh with an {SEQ_AXIS!r} axis, set with "
            f"`with jax.set_mesh(mesh):` (e.g. axes ('dp', 'fsdp', 'tp', 'sp')); found axes {names}"
        )
    return mesh


def check_divisible(mesh, what: str, **dims):
    """Checks each named dimension divides by the product of its mesh axes; dims map name -> (size, axes)."""
    for name, (size, axes) in dims.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        n = math.prod(mesh.shape[a] for a in axes if a in mesh.axis_names)
        if size % n:
            raise ValueError(f"{what}: {name}={size} is not divisible by the mesh axes {axes} of size {n}")
