"""KV-cache attention for prefill and decoding, on one device or with the cache sharded along `sp`.

The cache holds S slots per sequence: keys/values (B, S, K, H) and segment ids (B, S) with 0 meaning an
empty slot (or left padding). A call writes T new tokens at slots [index, index + T) and attends the T
queries (global positions index .. index + T - 1) to the whole cache under the causal rule
`key slot <= query slot` and equal segment ids. Slots past the write are still empty (segment 0) or
causally masked, so stale contents never leak in.

Sharded (`impl` 'ring' / 'ring_pallas'): the cache is split along S over the mesh's 'sp' axis. Every shard
gets all T queries, writes the new rows that fall into its own slice of slots, attends to its slice with
the global key offset shard * S_local, and the partial (out, lse) pairs are merged across shards by
log-sum-exp (pmax for the max, psum for the weighted sums). The decode step reads each cached byte once,
so it is memory-bound and runs on the jnp blockwise path for every impl (the key-chunk loop stops at the
last written slot, so a step costs O(index), not O(S)); impl 'dense' uses the dense reference instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm.attention import blockwise, ring
from lwm.attention.dense import dense_attention


def write_rows(cache, rows, slots):
    """Writes rows[:, t] into cache[:, slots[t]]; slots outside [0, S) are dropped.

    cache: (B, S, ...); rows: (B, T, ...); slots: (T,) int.
    Example: cache zeros (1, 4), rows [[7, 8]], slots [3, 4] -> [[0, 0, 0, 7]] (slot 4 is out of range).
    """
    S = cache.shape[1]
    slots = jnp.where((slots >= 0) & (slots < S), slots, S)  # negative slots must not wrap around
    return cache.at[:, slots].set(rows.astype(cache.dtype), mode="drop")


def _update_and_attend(
    q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, slot_offset, *, q_chunk, k_chunk
):
    """Writes the new tokens into this cache (slice) and attends to it: returns out, lse and the caches."""
    T = q.shape[1]
    slots = index + jnp.arange(T) - slot_offset  # local slots of the new tokens
    cache_k = write_rows(cache_k, k_new, slots)
    cache_v = write_rows(cache_v, v_new, slots)
    cache_seg = write_rows(cache_seg, q_seg, slots)
    out, lse = blockwise.block_forward(
        q,
        cache_k,
        cache_v,
        q_seg,
        cache_seg,
        q_offset=index,
        k_offset=slot_offset,
        causal=True,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
    )
    return out, lse, cache_k, cache_v, cache_seg


def _merge_over_axis(out, lse, axis_name: str):
    """Exact softmax merge of per-shard partials: out (B, T, N, H), lse (B, T, N) -> out, replicated."""
    m = lax.pmax(lse, axis_name)
    w = jnp.exp(lse - jnp.where(jnp.isneginf(m), 0.0, m))  # (B, T, N); 0 for shards with no key
    num = lax.psum(out * w[..., None], axis_name)
    den = lax.psum(w, axis_name)
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def cached_attention_local(
    q,
    k_new,
    v_new,
    cache_k,
    cache_v,
    cache_segment_ids,
    q_segment_ids,
    index,
    *,
    dense: bool = False,
    q_chunk: int = 512,
    k_chunk: int = 512,
):
    """Single-device cache update + attention; see `lwm.attention.cached_attention` for the contract."""
    if dense:
        T = q.shape[1]
        slots = index + jnp.arange(T)
        cache_k = write_rows(cache_k, k_new, slots)
        cache_v = write_rows(cache_v, v_new, slots)
        cache_seg = write_rows(cache_segment_ids, q_segment_ids, slots)
        out = dense_attention(
            q, cache_k, cache_v, q_segment_ids, kv_segment_ids=cache_seg, causal=True, q_offset=index, k_offset=0
        )
        return out, cache_k, cache_v, cache_seg
    out, _, cache_k, cache_v, cache_seg = _update_and_attend(
        q,
        k_new,
        v_new,
        cache_k,
        cache_v,
        cache_segment_ids,
        q_segment_ids,
        index,
        0,
        q_chunk=q_chunk,
        k_chunk=k_chunk,
    )
    return out.astype(q.dtype), cache_k, cache_v, cache_seg


def cached_attention_sharded(
    q,
    k_new,
    v_new,
    cache_k,
    cache_v,
    cache_segment_ids,
    q_segment_ids,
    index,
    *,
    q_chunk: int = 512,
    k_chunk: int = 512,
):
    """Cache sharded along S over the ambient mesh's 'sp' axis; merged across shards by log-sum-exp."""
    mesh = ring.ambient_sp_mesh("sharded cached_attention")
    cache_spec, cache_seg_spec = ring.sharding_specs(mesh)  # (batch, 'sp', heads, None), (batch, 'sp')
    batch, heads = cache_spec[0], cache_spec[2]
    tok_spec, tok_seg_spec = P(batch, None, heads, None), P(batch, None)
    B, S = cache_k.shape[:2]
    ring.check_divisible(
        mesh,
        "sharded cached_attention",
        B=(B, batch),
        S=(S, ring.SEQ_AXIS),
        N=(q.shape[2], heads),
        K=(cache_k.shape[2], heads),
    )

    def local(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index):
        slot_offset = lax.axis_index(ring.SEQ_AXIS) * cache_k.shape[1]
        out, lse, cache_k, cache_v, cache_seg = _update_and_attend(
            q,
            k_new,
            v_new,
            cache_k,
            cache_v,
            cache_seg,
            q_seg,
            index,
            slot_offset,
            q_chunk=q_chunk,
            k_chunk=k_chunk,
        )
        return _merge_over_axis(out, lse, ring.SEQ_AXIS).astype(q.dtype), cache_k, cache_v, cache_seg

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, cache_spec, cache_spec, cache_seg_spec, tok_seg_spec, P()),
        out_specs=(tok_spec, cache_spec, cache_spec, cache_seg_spec),
    )
    return fn(q, k_new, v_new, cache_k, cache_v, cache_segment_ids, q_segment_ids, jnp.asarray(index, jnp.int32))
