"""Context parallelism over the mesh's `sp` axis: one entry point, four strategies, three layouts.

    out = context_parallel_attention(q, k, v, seg, strategy="ring", load_balance="zigzag")   # under jax.set_mesh

| strategy       | what moves                                     | per-device K/V memory       | module        |
|----------------|------------------------------------------------|-----------------------------|---------------|
| "ring"         | K/V blocks hop around the ring (sp-1 steps)    | 2 blocks of T/sp            | ring.py       |
| "all_gather"   | K/V all-gathered once; dK/dV reduce-scattered  | the whole T                 | all_gather.py |
| "ulysses"      | q/k/v/out all-to-all: sequence <-> heads       | T for N/sp heads            | ulysses.py    |
| "ulysses_ring" | all-to-all inside groups of u = ulysses_size   | 2 blocks of T/(sp/u) tokens | ulysses.py,   |
|                | devices, the ring across the sp/u groups       | for N/u heads               | ring.py       |

`load_balance` ('none', 'zigzag', 'striped') names the layout the global arrays are in
(`lwm.attention.layout`; the model applies it once where a batch enters, `lwm.model.llama`). The kernel inside
every strategy is `block_impl` ('blockwise' jnp or 'pallas'). See docs/context_parallel.md for costs and
for which strategy suits which topology.
"""
from __future__ import annotations

import functools

import jax

from lwm.parallel import sharding
from lwm.attention import blockwise, layout
from lwm.attention.all_gather import all_gather_local
from lwm.attention.ring import RingConfig, block_fns, ambient_sp_mesh, check_divisible, ring_local
from lwm.attention.ulysses import ulysses_local, ulysses_ring_local

STRATEGIES = ("ring", "all_gather", "ulysses", "ulysses_ring")


def _ulysses_kernel(cfg: RingConfig):
    """Full-sequence local attention (q, k, v, seg) -> out for the Ulysses strategy, with its own vjp."""
    kw = dict(causal=cfg.causal, q_chunk=cfg.q_chunk, k_chunk=cfg.k_chunk)
    if cfg.block_impl == "pallas":
        from lwm.attention import pallas_common

        kernels = pallas_common.kernel_module(cfg.pallas_interpret)
        return lambda q, k, v, seg: kernels.flash_attention(q, k, v, seg, interpret=cfg.pallas_interpret, **kw)
    return lambda q, k, v, seg: blockwise.blockwise_attention(q, k, v, seg, **kw)


def context_parallel_attention(q, k, v, segment_ids=None, *, strategy: str = "ring", load_balance: str = "none",
                               causal: bool = True, q_chunk: int = 512, k_chunk: int = 512,
                               block_impl: str = "blockwise", pallas_interpret: bool = False,
                               ulysses_size: int = 0, mask_balance: str | None = None,
                               global_offsets: bool = True):
    """Exact attention with the sequence sharded over the ambient mesh's 'sp' axis.

    Args:
      q: (B, T, N, H); k, v: (B, T, K, H); segment_ids: (B, T) int or None. Global arrays in the layout
        order of `load_balance`; sharded here as lwm.parallel.sharding.activation_spec / batch_spec
        (P(('dp','fsdp'), 'sp', 'tp', None) and P(('dp','fsdp'), 'sp')).
      strategy: 'ring', 'all_gather', 'ulysses' or 'ulysses_ring' (module docstring).
      ulysses_size: 'ulysses_ring' only: u, the devices of one inner (all-to-all) group; sp % u == 0 and
        the tp-local query heads % u == 0. u = 1 is the plain ring, u = sp plain Ulysses (with the ring's
        run-pair kernel calls). Must be 0 (unused) for the other strategies.
      load_balance: 'none', 'zigzag' or 'striped'.
      causal, q_chunk, k_chunk: as in `blockwise.block_forward` (chunks apply within each block pair).
      block_impl: the kernel, 'blockwise' (jnp) or 'pallas'; pallas_interpret: Pallas in interpret mode.
      mask_balance, global_offsets: testing only, deliberately wrong masks (negative controls).

    Returns:
      (B, T, N, H) in q.dtype, in the same layout and sharding as q.

    Raises:
      ValueError before compiling: no ambient mesh with 'sp', an unknown strategy or balance, B, T or the
      heads not divisible by their mesh axes, T not divisible by the layout's parts (2*sp for zigzag),
      (ulysses) heads that cannot be split over sp, (ulysses_ring) a ulysses_size that does not divide sp
      or the heads, or a ulysses_size given to another strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context_parallel_strategy={strategy!r}; choose one of {STRATEGIES}")
    what = f"context parallelism ({strategy})"
    mesh = ambient_sp_mesh(what)
    qkv_spec, seg_spec = sharding.activation_spec(mesh), sharding.batch_spec(mesh)
    B, T, N, _ = q.shape
    K = k.shape[2]
    check_divisible(mesh, what, B=(B, qkv_spec[0]), T=(T, sharding.SEQ_AXIS), N=(N, qkv_spec[2]),
                    K=(K, qkv_spec[2]))
    sp = sharding.sequence_parallel_size(mesh)
    layout.check(load_balance, T, sp, what)
    if mask_balance is not None:
        layout.check(mask_balance, T, sp, what)
    tp = dict(mesh.shape).get(sharding.HEAD_AXIS, 1)
    if strategy == "ulysses_ring":
        ulysses_size = 1 if sp == 1 else ulysses_size  # one device: nothing to split
        sharding.check_ulysses_ring(N, K, tp, sp, ulysses_size)
    elif ulysses_size:
        raise ValueError(f"context_parallel_ulysses_size={ulysses_size} applies only to "
                         f"context_parallel_strategy='ulysses_ring', not {strategy!r}")
    cfg = RingConfig(causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, block_impl=block_impl,
                     pallas_interpret=pallas_interpret, load_balance=load_balance, mask_balance=mask_balance,
                     global_offsets=global_offsets, ulysses_size=max(ulysses_size, 1))
    block_fns(cfg)  # validates block_impl / backend before tracing
    if strategy == "ring":
        local = functools.partial(ring_local, cfg)
    elif strategy == "all_gather":
        local = functools.partial(all_gather_local, cfg)
    elif strategy == "ulysses_ring":
        local = functools.partial(ulysses_ring_local, cfg)
    else:
        sharding.check_ulysses_heads(N, K, tp, sp)
        local = functools.partial(ulysses_local, cfg, kernel=_ulysses_kernel(cfg))
    # Pallas interpret mode (jax 0.10) fails shard_map's varying-axes check inside the kernel
    # interpreter, and pallas_call outputs would need explicit variance; the jnp path is fully checked.
    check_vma = block_impl != "pallas"
    if segment_ids is None:
        fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                           out_specs=qkv_spec, check_vma=check_vma)
        return fn(q, k, v)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                       check_vma=check_vma)
    return fn(q, k, v, segment_ids)


def ring_attention(q, k, v, segment_ids=None, *, causal: bool = True, q_chunk: int = 512, k_chunk: int = 512,
                   block_impl: str = "blockwise", pallas_interpret: bool = False, load_balance: str = "none",
                   global_offsets: bool = True):
    """The ring strategy of `lwm.attention.context_parallel.context_parallel_attention` (see there).

    q: (B, T, N, H); k, v: (B, T, K, H); segment_ids (B, T) | None: global arrays in the layout order of
    `load_balance`. global_offsets=False is a deliberately wrong variant (negative control of the tests)."""
    return context_parallel_attention(q, k, v, segment_ids, strategy="ring", load_balance=load_balance,
                                      causal=causal, q_chunk=q_chunk, k_chunk=k_chunk, block_impl=block_impl,
                                      pallas_interpret=pallas_interpret, global_offsets=global_offsets)
