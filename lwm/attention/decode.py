"""KV-cache attention for decoding, on one device or with the cache sharded along `sp`.

The cache is kept in the layout decode reads: keys and values (L, B, K, S, H) (layer, row, kv head, slot,
head dim), so the keys of one (row, kv head) for a chunk of slots are one contiguous run and a chunk's
scores are a plain batched matmul (no per-step transpose or relayout). Segment ids (B, S) mark the slots:
0 is an empty slot (or left padding); they are written once per step by the model, before the layers.

A call writes T new tokens of one layer at each row's own slots [index[b], index[b] + T) in place (a
scatter into the carried cache; slots >= S are dropped) and attends the T queries to that row's cache under
`key slot <= query slot` and equal segment ids. Keys are read chunk by chunk in a loop whose trip count is
the filled length, ceil((max(index) + T) / chunk), not the allocated S, so a step costs O(filled).

Sharded (`cached_attention_sharded`): the slot axis S is split over the mesh's 'sp' axis (rows over
dp/fsdp, kv heads over tp). Each shard writes the new rows that fall into its slice, attends to its filled
chunks with the global slot offset shard * S_local, and the shards' partial results are merged with one
reduction of the softmax statistics: a pmax of the running max and one psum of the rescaled (output, sum)
pair -- no ring pass per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm.parallel import sharding
from lwm.attention import ring
from lwm.attention.blockwise import match_vma


def row_slots(index, batch: int, length: int):
    """Slots of T new tokens per row: index (B,) or scalar -> (B, T) int32, index[b] + t."""
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (batch,))
    return index[:, None] + jnp.arange(length, dtype=jnp.int32)[None]


def write_segments(cache_seg, q_seg, index):
    """cache_seg (B, S) with q_seg (B, T) written at each row's slots index[b] + t; slots >= S dropped.
    Example: cache [[0, 0, 0]], q_seg [[1, 1]], index [2] -> [[0, 0, 1]]."""
    B, S = cache_seg.shape
    slots = row_slots(index, B, q_seg.shape[1])
    slots = jnp.where((slots >= 0) & (slots < S), slots, S)
    return cache_seg.at[jnp.arange(B)[:, None], slots].set(q_seg.astype(cache_seg.dtype), mode="drop")


def write_kv(cache, new, layer, slots):
    """cache (L, B, K, S, H) with new (B, T, K, H) written at [layer, b, :, slots[b, t]]; slots outside
    [0, S) are dropped (never wrapped). One scatter of B * T rows, in place on a donated/carried buffer."""
    B, S = cache.shape[1], cache.shape[3]
    slots = jnp.where((slots >= 0) & (slots < S), slots, S)
    return cache.at[layer, jnp.arange(B)[:, None], :, slots].set(new.astype(cache.dtype), mode="drop")


def attend_filled(q, cache_k, cache_v, layer, cache_seg, q_seg, q_slots, *, slot_offset=0, chunk: int = 512):
    """Attention of T queries per row to the filled chunks of one layer of the cache (online softmax).

    q: (B, T, N, H); cache_k, cache_v: (L, B, K, S, H); cache_seg: (B, S); q_seg, q_slots: (B, T) global
    slots of the queries. slot_offset: global slot of local slot 0 (a shard's offset).
    Returns (out (B, T, N, H) float32 normalised over these keys, m (B, T, N) running max, l (B, T, N) sum
    of exp(score - m)); a row with no visible key has l = 0, m = -inf, out = 0.
    """
    B, T, N, H = q.shape
    K, S = cache_k.shape[2], cache_k.shape[3]
    G = N // K
    c = min(chunk, S)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qh = (q.astype(acc) * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    q_slot_rows = jnp.tile(q_slots, (1, G))  # (B, R): row g * T + t is query t of head g
    q_seg_rows = jnp.tile(q_seg.astype(jnp.int32), (1, G))
    last = jnp.max(q_slots) - slot_offset  # highest local slot any query may see
    n_chunks = jnp.clip(last // c + 1, 0, -(-S // c))

    def body(j, carry):
        m, l, o = carry  # (B, K, R), (B, K, R), (B, K, R, H)
        start = jnp.minimum(j * c, S - c)  # the last chunk may overlap the one before: masked below
        k_j = lax.dynamic_slice(cache_k, (layer, 0, 0, start, 0), (1, B, K, c, H))[0]  # (B, K, c, H)
        v_j = lax.dynamic_slice(cache_v, (layer, 0, 0, start, 0), (1, B, K, c, H))[0]
        seg_j = lax.dynamic_slice_in_dim(cache_seg, start, c, axis=1)  # (B, c)
        local = start + jnp.arange(c)
        s = jnp.einsum("bkrh,bkch->bkrc", qh.astype(k_j.dtype), k_j, preferred_element_type=acc)
        mask = ((local + slot_offset)[None, None, :] <= q_slot_rows[:, :, None]) & (local >= j * c)[None, None, :]
        mask = mask & (seg_j[:, None, :] == q_seg_rows[:, :, None])  # (B, R, c)
        s = jnp.where(mask[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkrc,bkch->bkrh", p.astype(v_j.dtype), v_j, preferred_element_type=acc)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

    R = G * T
    init = (jnp.full((B, K, R), -jnp.inf, acc), jnp.zeros((B, K, R), acc), jnp.zeros((B, K, R, H), acc))
    init = match_vma(init, qh, cache_k, cache_seg)
    m, l, o = lax.fori_loop(0, n_chunks, body, init)
    o = o / jnp.where(l == 0, 1.0, l)[..., None]

    def rows_to_heads(x):  # (B, K, G * T, ...) -> (B, T, N, ...)
        x = x.reshape(B, K, G, T, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1).reshape(B, T, N, *x.shape[4:])

    return rows_to_heads(o), rows_to_heads(m), rows_to_heads(l)


def cached_attention_local(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, layer=0, *,
                           chunk: int = 512):
    """Single-device write + attend; see `lwm.attention.cached_attention` for the contract."""
    slots = row_slots(index, q.shape[0], q.shape[1])
    cache_k = write_kv(cache_k, k_new, layer, slots)
    cache_v = write_kv(cache_v, v_new, layer, slots)
    out, _, _ = attend_filled(q, cache_k, cache_v, layer, cache_seg, q_seg, slots, chunk=chunk)
    return out.astype(q.dtype), cache_k, cache_v


def merge_shards(out, m, l, axis_name: str):
    """Exact softmax merge over a mesh axis of per-shard (out, m, l) (B, T, N, ...): one pmax of the max,
    then one psum of the rescaled (out * l, l) pair. Returns the merged out, the same on every shard."""
    g = lax.pmax(m, axis_name)
    w = l * jnp.exp(m - jnp.where(jnp.isneginf(g), 0.0, g))  # 0 for shards with no visible key
    packed = lax.psum(jnp.concatenate([out * w[..., None], w[..., None]], axis=-1), axis_name)
    num, den = packed[..., :-1], packed[..., -1]
    return num / jnp.where(den == 0, 1.0, den)[..., None]


def cached_attention_sharded(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, layer=0, *,
                             chunk: int = 512):
    """The cache's slot axis sharded over the ambient mesh's 'sp' axis; see the module docstring."""
    mesh = ring.ambient_sp_mesh("sharded cached_attention")
    specs = sharding.cache_specs(mesh)  # k/v (L, B, K, S, H) over (None, batch, heads, 'sp', None)
    kv_spec, seg_spec = specs["k"], specs["segment_ids"]
    batch, heads = kv_spec[1], kv_spec[2]
    tok_spec, tok_seg_spec = sharding.token_spec(mesh), P(batch, None)
    B, S = cache_k.shape[1], cache_k.shape[3]
    ring.check_divisible(mesh, "sharded cached_attention", B=(B, batch), S=(S, ring.SEQ_AXIS),
                         N=(q.shape[2], heads), K=(cache_k.shape[2], heads))
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (B,))

    def local(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, layer):
        offset = lax.axis_index(ring.SEQ_AXIS) * cache_k.shape[3]
        slots = row_slots(index, q.shape[0], q.shape[1])  # global
        cache_k = write_kv(cache_k, k_new, layer, slots - offset)
        cache_v = write_kv(cache_v, v_new, layer, slots - offset)
        out, m, l = attend_filled(q, cache_k, cache_v, layer, cache_seg, q_seg, slots, slot_offset=offset,
                                  chunk=chunk)
        return merge_shards(out, m, l, ring.SEQ_AXIS).astype(q.dtype), cache_k, cache_v

    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, kv_spec, kv_spec, seg_spec, tok_seg_spec, P(batch), P()),
        out_specs=(tok_spec, kv_spec, kv_spec),
    )
    return fn(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, jnp.asarray(layer, jnp.int32))
