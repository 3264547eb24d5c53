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

Quantized cache (--cache_dtype int8 / fp8): each of cache_k, cache_v is then a pair (values (L, B, K, S, H)
int8 or float8_e4m3fn, scale (L, B, K, S) float32), one scale per token and kv head (`quantize`). New rows
are quantized as they are written; a chunk's values are converted to float32 inside the chunk loop and the
scales are folded into the scores (s[r, c] = scale_k[c] * q[r] . k[c]) and into the probabilities
(p[r, c] * scale_v[c]), so no full-precision copy of the cache is ever made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from lwm.parallel import sharding
from lwm.attention import ring
from lwm.attention.blockwise import match_vma


def quantize(x, dtype):
    """x (..., H) float -> (values (..., H) `dtype`, scale (...) float32), symmetric, one scale per vector:
    scale = max|x| / qmax over H (qmax 127 for int8, 448 = finfo(float8_e4m3fn).max for fp8); values =
    round(x / scale) (int8, clipped to [-127, 127]) or x / scale cast to fp8 (round to nearest). An all-zero
    vector gets scale 0 and values 0. Round-trip error |dequantize - x| <= scale / 2 per element for int8
    (absmax int8 quantization, e.g. LLM.int8(), Dettmers et al. 2022); for fp8 it is relative, <= 2^-4 |x|
    for normals (3 mantissa bits).
    Example (int8): x = [1.0, -0.5, 0.25] -> scale 1/127, values [127, -64, 32] (-63.5 rounds to even)."""
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    qmax = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    scale = jnp.max(jnp.abs(x), axis=-1) / qmax
    y = x / jnp.where(scale == 0, 1.0, scale)[..., None]
    if dtype == jnp.int8:
        y = jnp.clip(jnp.round(y), -127, 127)
    return y.astype(dtype), scale


def dequantize(values, scale):
    """(values (..., H), scale (...)) -> float32 (..., H) = values * scale. For tests and checks: the
    decode read never calls it on the whole cache (it folds the scales into the scores, chunk by chunk)."""
    return values.astype(jnp.float32) * scale[..., None]


def as_bits(a):
    """A float8 array as its uint8 bit patterns (a free bitcast), other arrays unchanged: XLA:CPU runs
    scatters and slices of float8 arrays by converting the whole array to a wider float and back (50x the
    cost of the same op on uint8), so the cache's fp8 values are written and sliced as bits."""
    is_fp8 = jnp.dtype(a.dtype).itemsize == 1 and jnp.issubdtype(a.dtype, jnp.floating)
    return lax.bitcast_convert_type(a, jnp.uint8) if is_fp8 else a


def from_bits(a, dtype):
    return lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def is_quantized(cache) -> bool:
    """True for a quantized cache array: the pair (values, scale)."""
    return isinstance(cache, (tuple, list))


def cache_values(cache):
    """The values array (L, B, K, S, H) of a plain or quantized cache array."""
    return cache[0] if is_quantized(cache) else cache


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
    [0, S) are dropped (never wrapped). One scatter of B * T rows, in place on a donated/carried buffer.
    A quantized cache (values, scale (L, B, K, S)) gets the rows quantized (`quantize`) and their scales."""
    values = cache_values(cache)
    B, S = values.shape[1], values.shape[3]
    slots = jnp.where((slots >= 0) & (slots < S), slots, S)
    at = (layer, jnp.arange(B)[:, None], slice(None), slots)
    if is_quantized(cache):
        q, scale = quantize(new, values.dtype)  # (B, T, K, H), (B, T, K)
        bits = as_bits(values).at[at].set(as_bits(q), mode="drop")
        return (from_bits(bits, values.dtype), cache[1].at[at].set(scale.astype(cache[1].dtype), mode="drop"))
    return values.at[at].set(new.astype(values.dtype), mode="drop")


def write_prefix(cache, new):
    """cache (L, B, K, S, H) (or a quantized pair) with new (L, B, T, K, H) written at slots [0, T): one
    dynamic_update_slice (the prefill's write), quantized per token and kv head for a quantized cache."""
    if is_quantized(cache):
        q, scale = quantize(new, cache[0].dtype)  # (L, B, T, K, H), (L, B, T, K)
        bits = lax.dynamic_update_slice(as_bits(cache[0]), as_bits(jnp.swapaxes(q, 2, 3)), (0, 0, 0, 0, 0))
        return (from_bits(bits, cache[0].dtype),
                lax.dynamic_update_slice(cache[1], jnp.swapaxes(scale, 2, 3).astype(cache[1].dtype), (0, 0, 0, 0)))
    return lax.dynamic_update_slice(cache, jnp.swapaxes(new, 2, 3).astype(cache.dtype), (0, 0, 0, 0, 0))


def attend_filled(q, cache_k, cache_v, layer, cache_seg, q_seg, q_slots, *, slot_offset=0, chunk: int = 512):
    """Attention of T queries per row to the filled chunks of one layer of the cache (online softmax).

    q: (B, T, N, H); cache_k, cache_v: (L, B, K, S, H), or quantized pairs (values, scale (L, B, K, S)) read
    as values * scale inside the loop; cache_seg: (B, S); q_seg, q_slots: (B, T) global slots of the queries.
    slot_offset: global slot of local slot 0 (a shard's offset).
    Returns (out (B, T, N, H) float32 normalised over these keys, m (B, T, N) running max, l (B, T, N) sum
    of exp(score - m)); a row with no visible key has l = 0, m = -inf, out = 0.
    """
    B, T, N, H = q.shape
    K, S = cache_values(cache_k).shape[2], cache_values(cache_k).shape[3]
    quantized = is_quantized(cache_k)
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
        chunk_of = lambda a: lax.dynamic_slice(a, (layer, 0, 0, start, 0), (1, B, K, c, H))[0]  # (B, K, c, H)
        scale_of = lambda a: lax.dynamic_slice(a, (layer, 0, 0, start), (1, B, K, c))[0]  # (B, K, c)
        seg_j = lax.dynamic_slice_in_dim(cache_seg, start, c, axis=1)  # (B, c)
        local = start + jnp.arange(c)
        if quantized:  # this chunk's values in float32; the scales fold into the scores and probabilities
            dq = lambda a: from_bits(chunk_of(as_bits(a)), a.dtype).astype(acc)  # (B, K, c, H) float32
            k_j, v_j = dq(cache_k[0]), dq(cache_v[0])
            s = jnp.einsum("bkrh,bkch->bkrc", qh, k_j, preferred_element_type=acc)
            s = s * scale_of(cache_k[1]).astype(acc)[:, :, None, :]
        else:
            k_j, v_j = chunk_of(cache_k), chunk_of(cache_v)
            s = jnp.einsum("bkrh,bkch->bkrc", qh.astype(k_j.dtype), k_j, preferred_element_type=acc)
        mask = ((local + slot_offset)[None, None, :] <= q_slot_rows[:, :, None]) & (local >= j * c)[None, None, :]
        mask = mask & (seg_j[:, None, :] == q_seg_rows[:, :, None])  # (B, R, c)
        s = jnp.where(mask[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pw = p * scale_of(cache_v[1]).astype(acc)[:, :, None, :] if quantized else p
        pv = jnp.einsum("bkrc,bkch->bkrh", pw.astype(v_j.dtype), v_j, preferred_element_type=acc)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

    R = G * T
    init = (jnp.full((B, K, R), -jnp.inf, acc), jnp.zeros((B, K, R), acc), jnp.zeros((B, K, R, H), acc))
    init = match_vma(init, qh, cache_values(cache_k), cache_seg)
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
    values = cache_values(cache_k)
    B, S = values.shape[1], values.shape[3]
    ring.check_divisible(mesh, "sharded cached_attention", B=(B, batch), S=(S, ring.SEQ_AXIS),
                         N=(q.shape[2], heads), K=(values.shape[2], heads))
    if is_quantized(cache_k):  # the scales shard like their values
        kv_spec = (kv_spec, specs["k_scale"])
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (B,))

    def local(q, k_new, v_new, cache_k, cache_v, cache_seg, q_seg, index, layer):
        offset = lax.axis_index(ring.SEQ_AXIS) * cache_values(cache_k).shape[3]
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
