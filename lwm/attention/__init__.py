"""Attention for LWM: one dispatch over a dense reference, blockwise jnp, Pallas kernels and the ring.

    out = attention(q, k, v, segment_ids, impl="ring")     # inside `with jax.set_mesh(mesh):`

| impl          | where it runs                          | memory          | module           |
|---------------|----------------------------------------|-----------------|------------------|
| "dense"       | anywhere; materialises (B, N, T, T)    | O(T^2)          | dense.py         |
| "blockwise"   | anywhere; jnp online softmax           | O(T * chunk)    | blockwise.py     |
| "pallas"      | GPU (Triton) / TPU (Mosaic) kernel     | O(T * chunk)    | pallas_gpu/tpu.py|
| "ring"        | context parallel over mesh axis 'sp'   | per strategy    | context_parallel |
| "ring_pallas" | the same, Pallas block kernel inside   | per strategy    | context_parallel |

'ring' and 'ring_pallas' are the original's names; they mean "context parallelism over 'sp' with the
blockwise (resp. Pallas) kernel inside". How the sequence is split is chosen separately:
`strategy` ('ring' = RingAttention, the default and the original's; 'all_gather'; 'ulysses';
'ulysses_ring' = Ulysses inside groups of `ulysses_size` devices, the ring across the groups) and
`load_balance` ('none' = contiguous shards, the default; 'zigzag'; 'striped'), see context_parallel.py.

Nothing is chosen behind the caller's back: an unknown impl, strategy or balance, or 'pallas' on CPU
without pallas_interpret=True, raises ValueError.
"""

from __future__ import annotations

import jax.numpy as jnp

from lwm.attention import decode
from lwm.attention.blockwise import blockwise_attention
from lwm.attention.dense import dense_attention
from lwm.attention.context_parallel import STRATEGIES, context_parallel_attention, ring_attention
from lwm.attention.layout import LOAD_BALANCES

ATTENTION_IMPLS = ("dense", "blockwise", "pallas", "ring", "ring_pallas")
CONTEXT_PARALLEL_IMPLS = ("ring", "ring_pallas")  # impls that shard the sequence over 'sp'

__all__ = [
    "ATTENTION_IMPLS",
    "CONTEXT_PARALLEL_IMPLS",
    "LOAD_BALANCES",
    "STRATEGIES",
    "context_parallel_attention",
    "attention",
    "cached_attention",
    "dense_attention",
    "blockwise_attention",
    "ring_attention",
]


def _check_impl(impl: str, what: str):
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{what}: unknown attention impl {impl!r}; allowed values: {ATTENTION_IMPLS}")


def _check_heads(what: str, q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{what}: q, k, v must be rank 4 (B, T, N|K, H); got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{what}: k and v shapes differ: {k.shape} vs {v.shape}")
    B, _, N, H = q.shape
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"{what}: q {q.shape} and k {k.shape} disagree on batch or head dim")
    if N % k.shape[2]:
        raise ValueError(f"{what}: query heads N={N} must be a multiple of kv heads K={k.shape[2]}")


def _check_segments(what: str, name: str, seg, shape):
    if seg is not None and tuple(seg.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(seg.shape)}")


def attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    impl: str,
    causal: bool = True,
    q_chunk: int = 512,
    k_chunk: int = 512,
    pallas_interpret: bool = False,
    strategy: str = "ring",
    load_balance: str = "none",
    ulysses_size: int = 0,
):
    """Self-attention. q: (B, T, N, H); k, v: (B, T, K, H), N % K == 0 (grouped-query attention).

    segment_ids: (B, T) int or None. A query attends to a key only when their segment ids are equal
    (packed sequences; padding is just another segment id, 0 by convention) and, if causal, when the key's
    index in the row is <= the query's index. Scale 1/sqrt(H) is applied inside. Returns (B, T, N, H) in
    q.dtype; softmax statistics are kept in float32. A row with no allowed key returns zeros.

    q_chunk, k_chunk: block sizes of the blockwise / Pallas / ring paths (ignored by 'dense'). The Triton
      kernel caps them (`pallas_gpu.FWD` / `BWD` block sizes) and rounds them to powers of two.
    pallas_interpret: for 'pallas' / 'ring_pallas' on CPU, run the GPU kernel in Pallas interpret mode
      (slow; this is how the tests run it). Without it, 'pallas' on CPU raises.
    impl 'ring' / 'ring_pallas' run context parallelism (`context_parallel_attention`) under jax.shard_map
    over the ambient mesh (jax.set_mesh) with q/k/v sharded P(('dp','fsdp'), 'sp', 'tp', None) and segment
    ids P(('dp','fsdp'), 'sp'); they raise when no mesh with an 'sp' axis is set. strategy ('ring',
    'all_gather', 'ulysses', 'ulysses_ring' with its inner group size `ulysses_size`) and load_balance
    ('none', 'zigzag', 'striped': the layout q/k/v/segment_ids are in, `lwm.attention.layout`) apply to them
    only; other impls raise if load_balance is not 'none'.
    """
    what = f"attention(impl={impl!r})"
    _check_impl(impl, "attention")
    _check_heads(what, q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"{what}: self-attention needs k, v of the same length as q: T={q.shape[1]}, "
            f"S={k.shape[1]} (use cached_attention for a KV cache)"
        )
    _check_segments(what, "segment_ids", segment_ids, q.shape[:2])
    chunks = dict(q_chunk=q_chunk, k_chunk=k_chunk)
    if impl not in CONTEXT_PARALLEL_IMPLS and load_balance != "none":
        raise ValueError(f"{what}: load_balance={load_balance!r} needs a context-parallel impl "
                         f"{CONTEXT_PARALLEL_IMPLS}; a single-device kernel reads array order as position order")
    if impl == "dense":
        return dense_attention(q, k, v, segment_ids, causal=causal)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, causal=causal, **chunks)
    if impl == "pallas":
        from lwm.attention import pallas_common

        kernels = pallas_common.kernel_module(pallas_interpret)
        return kernels.flash_attention(q, k, v, segment_ids, causal=causal, interpret=pallas_interpret, **chunks)
    block_impl = "pallas" if impl == "ring_pallas" else "blockwise"
    return context_parallel_attention(
        q, k, v, segment_ids, strategy=strategy, load_balance=load_balance, causal=causal, block_impl=block_impl,
        pallas_interpret=pallas_interpret, ulysses_size=ulysses_size, **chunks
    )


def cached_attention(
    q,
    k_new,
    v_new,
    cache_k,
    cache_v,
    cache_segment_ids,
    q_segment_ids,
    index,
    layer=0,
    *,
    impl: str,
    k_chunk: int = 512,
):
    """Decoding step(s) through a KV cache. Returns (out (B, T, N, H), cache_k, cache_v).

    q, k_new, v_new: (B, T, N|K, H) for each row's slots index[b] .. index[b]+T-1 (index: int, int32
    scalar or (B,) int32: each row has its own fill length).
    cache_k, cache_v: (L, B, K, S, H), the layout decode reads (`lwm.attention.decode`), or for an int8/fp8
    cache the pairs (values (L, B, K, S, H), scale (L, B, K, S) float32), returned as pairs; `layer` (int or
    int32 scalar) picks the layer written and read, so the whole cache can be carried through the layers.
    cache_segment_ids: (B, S) int32 (0 = empty/padding), already holding the new tokens' ids
    (`decode.write_segments`); q_segment_ids: (B, T) int32 (None means all 1).
    Writes k_new/v_new in place at the row's slots (slots >= S are dropped) and attends over the filled
    chunks only (cost O(max(index) + T), not O(S)) with the causal rule key_slot <= query_slot and equal
    segment ids. impl 'dense' / 'blockwise' / 'pallas': one device (decode is memory-bound; no kernel is
    used). 'ring' / 'ring_pallas': S sharded over 'sp' (rows over dp/fsdp, kv heads over tp); the shards'
    partials merge with one pmax and one psum of the softmax statistics.
    """
    what = f"cached_attention(impl={impl!r})"
    _check_impl(impl, "cached_attention")
    _check_heads(what, q, k_new, v_new)
    B, T, _, H = q.shape
    ck, cv = decode.cache_values(cache_k), decode.cache_values(cache_v)  # a quantized cache: (values, scale)
    if ck.ndim != 5 or ck.shape != cv.shape or ck.shape[1] != B or ck.shape[2] != k_new.shape[2] or ck.shape[4] != H:
        raise ValueError(
            f"{what}: cache_k {ck.shape} / cache_v {cv.shape} must be (L, B, K, S, H) "
            f"matching k_new {k_new.shape}"
        )
    _check_segments(what, "cache_segment_ids", cache_segment_ids, (B, ck.shape[3]))
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((B, T), cache_segment_ids.dtype)
    _check_segments(what, "q_segment_ids", q_segment_ids, (B, T))
    args = (q, k_new, v_new, cache_k, cache_v, cache_segment_ids, q_segment_ids, index, layer)
    if impl in CONTEXT_PARALLEL_IMPLS:
        return decode.cached_attention_sharded(*args, chunk=k_chunk)
    return decode.cached_attention_local(*args, chunk=k_chunk)
