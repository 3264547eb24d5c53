"""RingAttention: exact attention over a sequence sharded across the mesh's `sp` axis.

Each of the sp devices holds T / sp consecutive positions of q, k, v and the segment ids. Queries stay
put; the key/value block (with its segment ids) travels around the ring with `lax.ppermute`, one hop per
step, so after sp steps every query block has met every key block while only two kv blocks are ever held.
Step i on device d attends to the block that started on device (d - i) mod sp, at global key offset
((d - i) mod sp) * T_local, with the shared `block_forward` (jnp or Pallas); the per-step (out, lse) pairs
merge exactly by log-sum-exp. Under causal masking, blocks that lie wholly in the future of the local
queries are skipped with `lax.cond` (no FLOPs), and the diagonal block skips its own future chunks.

The backward is a second ring pass (custom_vjp): k, v, segment ids and the dk, dv accumulators rotate
together; each device adds its queries' contribution to the visiting block's dk, dv using the *global*
softmax statistics (lse) saved by the forward, and accumulates dq locally. After sp hops the dk, dv
accumulators are back on the device that owns the block.

See docs/ring_attention.md for shapes, costs and chunk-size advice.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm.attention import blockwise

BATCH_AXES = ("dp", "fsdp")
HEAD_AXIS = "tp"
SEQ_AXIS = "sp"


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Static settings of one ring call (hashable: it is a nondiff argument of the custom_vjp)."""

    causal: bool = True
    q_chunk: int = 512
    k_chunk: int = 512
    block_impl: str = "blockwise"  # "blockwise" (jnp) or "pallas" (fused kernel for the backend)
    pallas_interpret: bool = False
    axis_name: str = SEQ_AXIS
    # Testing only: False drops the global position offsets, i.e. every block is masked as if it were
    # the diagonal block. This is wrong on purpose (the negative control of the ring tests).
    global_offsets: bool = True


def _block_fns(cfg: RingConfig):
    """The (forward, backward) pair of block functions the ring calls at every step."""
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
    raise ValueError(f"ring: unknown block_impl {cfg.block_impl!r}; allowed: 'blockwise', 'pallas'")


def _ring_positions(cfg: RingConfig, T: int, S: int):
    """(device index, sp, q_offset, k_offset_of(step)) for the local shard."""
    sp = lax.axis_size(cfg.axis_name)
    idx = lax.axis_index(cfg.axis_name)
    if not cfg.global_offsets:
        return idx, sp, 0, lambda step: 0
    return idx, sp, idx * T, lambda step: ((idx - step) % sp) * S


def _in_future(cfg: RingConfig, q_offset, k_offset, T: int):
    """True when every key of the visiting block is after every local query (the step can be skipped)."""
    if not cfg.causal:
        return jnp.bool_(False)
    return k_offset > q_offset + T - 1


def _rotate(cfg: RingConfig, sp: int, *xs):
    """Sends each array to the next device on the ring (device d -> d + 1 mod sp)."""
    perm = [(j, (j + 1) % sp) for j in range(sp)]
    return tuple(None if x is None else lax.ppermute(x, cfg.axis_name, perm) for x in xs)


def _ring_forward(cfg: RingConfig, q, k, v, seg):
    """Local shard: q (b, t, n, h), k/v (b, t, k, h), seg (b, t) | None -> out f32, lse (b, t, n)."""
    fwd, _ = _block_fns(cfg)
    B, T, N, H = q.shape
    S = k.shape[1]
    idx, sp, q_offset, k_offset_of = _ring_positions(cfg, T, S)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def attend(step, o, lse, k_blk, v_blk, seg_blk):
        k_offset = k_offset_of(step)

        def compute():
            o_blk, lse_blk = fwd(q, k_blk, v_blk, seg, seg_blk, q_offset=q_offset, k_offset=k_offset)
            return blockwise.merge_partials(o, lse, o_blk.astype(acc_dtype), lse_blk)

        return lax.cond(_in_future(cfg, q_offset, k_offset, T), lambda: (o, lse), compute)

    def step_and_rotate(carry, step):
        o, lse, k_blk, v_blk, seg_blk = carry
        o, lse = attend(step, o, lse, k_blk, v_blk, seg_blk)
        k_blk, v_blk, seg_blk = _rotate(cfg, sp, k_blk, v_blk, seg_blk)
        return (o, lse, k_blk, v_blk, seg_blk), None

    o0 = jnp.zeros((B, T, N, H), acc_dtype)
    lse0 = jnp.full((B, T, N), -jnp.inf, jnp.float32)
    o0, lse0 = blockwise.match_vma((o0, lse0), q, k)
    carry = (o0, lse0, k, v, seg)
    carry, _ = lax.scan(step_and_rotate, carry, jnp.arange(sp - 1))
    o, lse, k_blk, v_blk, seg_blk = carry
    return attend(sp - 1, o, lse, k_blk, v_blk, seg_blk)  # last block: no need to pass it on


def _ring_backward(cfg: RingConfig, q, k, v, seg, o, lse, do):
    """Second ring pass: returns dq (b, t, n, h) and this device's dk, dv (b, t, k, h), float32."""
    _, bwd = _block_fns(cfg)
    T, S = q.shape[1], k.shape[1]
    idx, sp, q_offset, k_offset_of = _ring_positions(cfg, T, S)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def accumulate(step, dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk):
        k_offset = k_offset_of(step)

        def compute():
            dq_i, dk_i, dv_i = bwd(q, k_blk, v_blk, o, lse, do, seg, seg_blk, q_offset=q_offset, k_offset=k_offset)
            return dq + dq_i, dk_blk + dk_i, dv_blk + dv_i

        return lax.cond(_in_future(cfg, q_offset, k_offset, T), lambda: (dq, dk_blk, dv_blk), compute)

    def step_and_rotate(carry, step):
        dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk = carry
        dq, dk_blk, dv_blk = accumulate(step, dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk)
        k_blk, v_blk, seg_blk, dk_blk, dv_blk = _rotate(cfg, sp, k_blk, v_blk, seg_blk, dk_blk, dv_blk)
        return (dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk), None

    zeros = blockwise.match_vma(
        (jnp.zeros(q.shape, acc_dtype), jnp.zeros(k.shape, acc_dtype), jnp.zeros(v.shape, acc_dtype)), q, k
    )
    carry = (zeros[0], k, v, seg, zeros[1], zeros[2])
    carry, _ = lax.scan(step_and_rotate, carry, jnp.arange(sp - 1))
    dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk = carry
    dq, dk_blk, dv_blk = accumulate(sp - 1, dq, k_blk, v_blk, seg_blk, dk_blk, dv_blk)
    dk, dv = _rotate(cfg, sp, dk_blk, dv_blk)  # the last hop brings dk, dv home
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_local(cfg: RingConfig, q, k, v, seg):
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


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def sharding_specs(mesh):
    """(q/k/v spec, segment-id spec) for `mesh`, using those of dp, fsdp, tp, sp that it has."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
    return P(batch, SEQ_AXIS, heads, None), P(batch, SEQ_AXIS)


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


def ring_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal: bool = True,
    q_chunk: int = 512,
    k_chunk: int = 512,
    block_impl: str = "blockwise",
    pallas_interpret: bool = False,
    global_offsets: bool = True,
):
    """Exact attention with the sequence sharded over the ambient mesh's 'sp' axis.

    Args:
      q: (B, T, N, H); k, v: (B, T, K, H); segment_ids: (B, T) int or None. Global shapes: the function
        shards them as P(('dp','fsdp'), 'sp', 'tp', None) and P(('dp','fsdp'), 'sp') itself.
      causal, q_chunk, k_chunk: as in `blockwise.block_forward` (chunks apply within each local block).
      block_impl: "blockwise" (jnp) or "pallas" (the fused kernel for this backend).
      pallas_interpret: run the Pallas kernel in interpret mode (CPU tests).
      global_offsets: keep True; False is a deliberately wrong variant used as a negative control in tests.

    Returns:
      (B, T, N, H) in q.dtype, sharded like q.
    """
    mesh = ambient_sp_mesh("ring attention")
    qkv_spec, seg_spec = sharding_specs(mesh)
    B, T, N, _ = q.shape
    K = k.shape[2]
    check_divisible(
        mesh, "ring attention", B=(B, qkv_spec[0]), T=(T, SEQ_AXIS), N=(N, qkv_spec[2]), K=(K, qkv_spec[2])
    )
    cfg = RingConfig(
        causal=causal,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        block_impl=block_impl,
        pallas_interpret=pallas_interpret,
        global_offsets=global_offsets,
    )
    _block_fns(cfg)  # validates block_impl / backend before tracing the shard_map
    local = functools.partial(_ring_local, cfg)
    # Pallas interpret mode (jax 0.10) fails shard_map's varying-axes check inside the kernel
    # interpreter, and pallas_call outputs would need explicit variance; the jnp path is fully checked.
    check_vma = block_impl != "pallas"
    if segment_ids is None:
        fn = jax.shard_map(
            lambda q, k, v: local(q, k, v, None),
            mesh=mesh,
            in_specs=(qkv_spec,) * 3,
            out_specs=qkv_spec,
            check_vma=check_vma,
        )
        return fn(q, k, v)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec, check_vma=check_vma
    )
    return fn(q, k, v, segment_ids)
