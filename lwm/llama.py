"""LLaMA decoder in Flax linen whose attention is RingAttention (or any impl in `lwm.attention`).

The parameter tree matches the original LWM's linen tree, so the official Jax checkpoints load:
  transformer/wte/embedding                                     (V, D)
  transformer/h/scan_decoder/attention/{wq,wk,wv,wo}/kernel     (L, D, N*H) ... (layer axis = param_scan_axis)
  transformer/h/scan_decoder/feed_forward/{w1,w2,w3}/kernel
  transformer/h/scan_decoder/{attention_norm,ffn_norm}/kernel   (L, D)
  transformer/ln_f/kernel                                       (D,)
  lm_head/kernel                                                (D, V)
With scan_layers=False the layers are `transformer/h/<i>/...` without the layer axis.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lwm.attention import ATTENTION_IMPLS, attention, cached_attention
from lwm.attention.decode import write_segments
from lwm.sharding import constrain

_COMMON = dict(vocab_size=32000, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters per layer, GQA on, chunks small enough to exercise blocking.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_sequence_length=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, scan_query_chunk_size=64,
                 scan_key_chunk_size=64, scan_mlp_chunk_size=64),
    # CPU-sized; chunk 512: the fastest blockwise attention chunk on CPU, 2K..32K (benchmarks/train_step_bench.py).
    "debug": dict(_COMMON, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  max_sequence_length=2048, scan_query_chunk_size=512, scan_key_chunk_size=512),
    "200m": dict(_COMMON, hidden_size=1024, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=8,
                 max_sequence_length=2048),
    "1b": dict(_COMMON, hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=16,
               max_sequence_length=2048),
    "3b": dict(_COMMON, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               max_sequence_length=2048),
    "7b": dict(_COMMON, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               max_sequence_length=4096),
    "13b": dict(_COMMON, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                max_sequence_length=2048),
    "30b": dict(_COMMON, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                max_sequence_length=2048),
    "65b": dict(_COMMON, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                max_sequence_length=2048, rms_norm_eps=1e-5),
}

# Keys that appear in the original's / transformers' config files but mean nothing to this model.
_IGNORED_KEYS = frozenset({
    "use_cache", "mesh_dim", "fcm_min_ratio", "fcm_max_ratio", "model_type", "architectures",
    "transformers_version", "torch_dtype", "dtype", "pad_token_id", "return_dict", "output_attentions",
    "output_hidden_states", "add_cross_attention", "_name_or_path",
})

REMAT_POLICIES = {
    "": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,
    "checkpoint_dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (no grouped-query attention)
    max_sequence_length: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    # Memory: rematerialisation policies ('' = off), see REMAT_POLICIES.
    remat_block: str = ""
    remat_attention: str = ""
    remat_mlp: str = ""
    # Blockwise compute. attention_impl picks the attention path explicitly (see lwm.attention);
    # scan_attention is the original's switch, accepted for old configs (True contradicts 'dense').
    attention_impl: str = "blockwise"
    scan_attention: bool = False
    scan_query_chunk_size: int = 1024
    scan_key_chunk_size: int = 1024
    # Decode reads the KV cache in chunks of this many slots, up to the filled length (lwm.attention.decode).
    # 128 is the fastest on CPU (benchmarks/sampling_bench.py: a chunk's K/V stay in L2); raise on accelerators.
    decode_chunk_size: int = 128
    pallas_interpret: bool = False
    scan_mlp: bool = False
    scan_mlp_chunk_size: int = 1024
    scan_layers: bool = True
    param_scan_axis: int = 0

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if self.attention_impl == "dense" and self.scan_attention:
            raise ValueError("scan_attention=True asks for blockwise attention but attention_impl='dense'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.kv_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head dim must be even for rotary embeddings")
        for name in ("remat_block", "remat_attention", "remat_mlp"):
            if getattr(self, name) not in REMAT_POLICIES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {list(REMAT_POLICIES)}")
        if self.param_scan_axis not in (0, 1):
            raise ValueError(f"param_scan_axis={self.param_scan_axis}; must be 0 or 1")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **updates) -> "LLaMAConfig":
        return self.from_dict({**dataclasses.asdict(self), **updates})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "LLaMAConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown LLaMAConfig keys {unknown}; known keys: {sorted(fields)}")
        if "rope_theta" in d and "theta" not in d:
            d = {**d, "theta": d["rope_theta"]}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def load(cls, spec: str) -> "LLaMAConfig":
        """A preset name ('tiny', 'debug', '7b', ...) or 'json::path' (local or fsspec URL)."""
        if spec in PRESETS:
            return cls.from_dict(PRESETS[spec], source=f"preset {spec!r}")
        kind, sep, path = spec.partition("::")
        if sep and kind == "json":
            import fsspec

            with fsspec.open(path, "r") as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from None
            return cls.from_dict(raw, source=path)
        raise ValueError(f"load_llama_config={spec!r}: use a preset {sorted(PRESETS)} or 'json::path'")


class RMSNorm(nn.Module):
    dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("kernel", nn.initializers.ones, (self.dim,), self.param_dtype)
        x = x.astype(jnp.promote_types(self.dtype, jnp.float32))
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x.astype(self.dtype) * jnp.asarray(weight, self.dtype)


def apply_rotary(x, positions, theta: float):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/H), as the original LWM does.
    x: (B, T, N, H); positions: (B, T) int."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # (H/2,)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], h // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def dense_layer(features, config, dtype, param_dtype, name):
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.initializers.normal(config.initializer_range))


class LLaMAAttention(nn.Module):
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cache_mode: Optional[str] = None  # None (training), 'prefill' (cache_index 0), 'decode'
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, position_ids, segment_ids, layer_cache=None, cache_segment_ids=None, cache_index=None):
        cfg = self.config
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        q = dense_layer(n * h, cfg, self.dtype, self.param_dtype, "wq")(x).reshape(b, t, n, h)
        key = dense_layer(k * h, cfg, self.dtype, self.param_dtype, "wk")(x).reshape(b, t, k, h)
        val = dense_layer(k * h, cfg, self.dtype, self.param_dtype, "wv")(x).reshape(b, t, k, h)
        q = apply_rotary(q, position_ids, cfg.theta)
        key = apply_rotary(key, position_ids, cfg.theta)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        key = constrain(key, ("batch", "seq", "kv_heads", "head_dim"))
        val = constrain(val, ("batch", "seq", "kv_heads", "head_dim"))

        new_cache = None
        if self.cache_mode == "decode":  # layer_cache: (k, v) of every layer (L, B, K, S, H) and this layer's index
            cache_k, cache_v, layer = layer_cache
            out, cache_k, cache_v = cached_attention(
                q, key, val, cache_k, cache_v, cache_segment_ids, segment_ids, cache_index, layer,
                impl=cfg.attention_impl, k_chunk=cfg.decode_chunk_size)
            new_cache = (cache_k, cache_v)
        else:
            out = attention(q, key, val, segment_ids, impl=cfg.attention_impl, causal=True,
                            q_chunk=cfg.scan_query_chunk_size, k_chunk=cfg.scan_key_chunk_size,
                            pallas_interpret=cfg.pallas_interpret)
            if self.cache_mode == "prefill":  # this layer's keys/values (B, T, K, H), written by the collection
                new_cache = (key, val)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        out = dense_layer(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "wo")(out.reshape(b, t, n * h))
        out = nn.Dropout(rate=cfg.resid_pdrop)(out, deterministic=self.deterministic)
        return out, new_cache


class LLaMAMLP(nn.Module):
    """SwiGLU feed-forward; with scan_mlp, applied to sequence chunks in a scan so memory is O(chunk * F)."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.w1 = dense_layer(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w1")
        self.w3 = dense_layer(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "w3")
        self.w2 = dense_layer(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "w2")
        self.dropout = nn.Dropout(rate=cfg.resid_pdrop)

    def _ff(self, x):  # (B, C, D) -> (B, C, D)
        hidden = constrain(nn.silu(self.w1(x)) * self.w3(x), ("batch", "seq", "mlp"))
        return self.dropout(self.w2(hidden), deterministic=self.deterministic)

    def __call__(self, x):
        b, t, d = x.shape
        chunk = self.config.scan_mlp_chunk_size
        if not (self.config.scan_mlp and t > chunk and t % chunk == 0) or self.is_initializing():
            return self._ff(x)
        body = nn.remat(lambda mdl, carry, xc: (carry, mdl._ff(xc)), prevent_cse=False)
        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       in_axes=1, out_axes=1)
        _, y = scan(self, None, x.reshape(b, t // chunk, chunk, d))
        return y.reshape(b, t, d)


def _remat(module_cls, policy_name: str, config: LLaMAConfig, static_argnums=()):
    if not policy_name:
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=not config.scan_layers,
                    static_argnums=static_argnums)


class LLaMABlock(nn.Module):
    """Pre-norm decoder layer. Signature (carry, *xs) -> (carry, y) so nn.scan can stack it directly."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cache_mode: Optional[str] = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, position_ids, segment_ids, layer, cache_segment_ids, cache_index):
        """Training / prefill: x (B, T, D) -> (x, None | this layer's (k, v)). Decode: x is the carry
        (x, cache_k, cache_v) with the whole cache, `layer` this layer's index -> ((x, cache_k, cache_v), None)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
        norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn = _remat(LLaMAAttention, cfg.remat_attention, cfg)(cfg, cache_mode=self.cache_mode,
                                                                  name="attention", **kw)
        layer_cache = None
        if self.cache_mode == "decode":
            x, cache_k, cache_v = x
            layer_cache = (cache_k, cache_v, layer)
        attn_out, new_cache = attn(norm("attention_norm")(x), position_ids, segment_ids, layer_cache,
                                   cache_segment_ids, cache_index)
        x = constrain(x + attn_out, ("batch", "seq", "embed"))
        ff = _remat(LLaMAMLP, cfg.remat_mlp, cfg)(cfg, name="feed_forward", **kw)(norm("ffn_norm")(x))
        x = constrain(x + ff, ("batch", "seq", "embed"))
        if self.cache_mode == "decode":
            return (x, *new_cache), None
        return x, new_cache


class LLaMABlockCollection(nn.Module):
    """`h`: the L decoder layers, scanned (`h/scan_decoder/...`) or unrolled (`h/<i>/...`).
    cache: None or dict(k=(L, B, K, S, H), v=(L, B, K, S, H), segment_ids=(B, S)) (`init_cache`).
    Prefill (cache_index 0, a Python int) writes the prompt's keys/values at slots [0, T) once after the
    layers; decode carries the whole cache through the layers and each layer writes its new rows in place
    at the rows' slots cache_index (scalar or (B,)), so no layer's cache is copied or stacked per step."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cache_mode: Optional[str] = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, position_ids, segment_ids, cache=None, cache_index=None):
        cfg = self.config
        block = _remat(LLaMABlock, cfg.remat_block, cfg)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, cache_mode=self.cache_mode,
                  deterministic=self.deterministic)
        cache_seg = layers = None
        if cache is not None:
            seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            start = 0 if self.cache_mode == "prefill" else cache_index
            cache_seg = write_segments(cache["segment_ids"], seg, start)
            segment_ids = seg
        if self.cache_mode == "decode":
            x = (x, cache["k"], cache["v"])
            layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": cfg.param_scan_axis},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers)
            x, kv = scanned(cfg, name="scan_decoder", **kw)(x, position_ids, segment_ids, layers, cache_seg,
                                                             cache_index)
        else:
            outs = []
            for i in range(cfg.num_hidden_layers):
                x, nc = block(cfg, name=str(i), **kw)(x, position_ids, segment_ids, i, cache_seg, cache_index)
                outs.append(nc)
            kv = None if self.cache_mode != "prefill" else jax.tree.map(lambda *c: jnp.stack(c), *outs)
        if cache is None:
            return x, None
        if self.cache_mode == "decode":
            x, cache_k, cache_v = x
        else:  # prefill: (L, B, T, K, H) -> the cache layout (L, B, K, T, H), one write at slot 0
            write = lambda c, new: jax.lax.dynamic_update_slice(
                c, jnp.swapaxes(new, 2, 3).astype(c.dtype), (0, 0, 0, 0, 0))
            cache_k, cache_v = write(cache["k"], kv[0]), write(cache["v"], kv[1])
        return x, dict(k=cache_k, v=cache_v, segment_ids=cache_seg)


def init_cache(config: LLaMAConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache in the layout decode reads (`lwm.attention.decode`): k, v (L, B, K, S, H);
    segment_ids (B, S) with 0 = empty/padding. `dtype` is the cache's own (e.g. bf16 for an fp32 model)."""
    shape = (config.num_hidden_layers, batch_size, config.kv_heads, max_length, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                segment_ids=jnp.zeros((batch_size, max_length), jnp.int32))


def positions_and_cache_mode(input_shape, position_ids, cache, cache_index):
    b, t = input_shape
    if cache is None:
        mode = None
    elif isinstance(cache_index, int) and cache_index == 0:
        mode = "prefill"
    else:
        mode = "decode"
    if position_ids is None:
        start = jnp.zeros((b,), jnp.int32) if cache_index is None else jnp.broadcast_to(
            jnp.asarray(cache_index, jnp.int32), (b,))
        position_ids = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    return position_ids, mode


class LLaMAModule(nn.Module):
    """`transformer`: embedding, layers, final norm. Returns (hidden (B, T, D) after ln_f, new cache)."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids=None, segment_ids=None, cache=None, cache_index=None,
                 deterministic=True):
        cfg = self.config
        position_ids, mode = positions_and_cache_mode(input_ids.shape, position_ids, cache, cache_index)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(cfg.initializer_range), name="wte")(
            input_ids.astype(jnp.int32))
        x = nn.Dropout(rate=cfg.embd_pdrop)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "seq", "embed"))
        x, new_cache = LLaMABlockCollection(cfg, self.dtype, self.param_dtype, mode, deterministic, name="h")(
            x, position_ids, segment_ids, cache, cache_index)
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, self.param_dtype, name="ln_f")(x)
        return x, new_cache


class LLaMAForCausalLM(nn.Module):
    """The causal LM. apply(...) -> logits (B, T, V), or hidden (B, T, D) with return_hidden=True (the
    training loss computes logits blockwise from hidden, see lwm.loss). With a cache, returns (out, cache):
    cache_index=0 (a Python int) prefills slots [0, T); a traced index decodes at that slot."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.transformer = LLaMAModule(cfg, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense_layer(cfg.vocab_size, cfg, self.dtype, self.param_dtype, "lm_head")

    def logits(self, hidden):
        """(B, T, D) -> (B, T, V) float32."""
        if self.config.tie_word_embeddings:
            emb = self.transformer.variables["params"]["wte"]["embedding"]
            out = jnp.einsum("btd,vd->btv", hidden, emb.astype(hidden.dtype))
        else:
            out = self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "seq", "vocab"))

    def __call__(self, input_ids, position_ids=None, segment_ids=None, cache=None, cache_index=None,
                 deterministic=True, return_hidden=False):
        hidden, new_cache = self.transformer(input_ids, position_ids, segment_ids, cache, cache_index,
                                             deterministic)
        out = hidden if return_hidden else self.logits(hidden)
        return out if cache is None else (out, new_cache)


def output_head_kernel(params, config: LLaMAConfig):
    """The (D, V) matrix that maps hidden states to logits (lm_head, or the tied embedding)."""
    if config.tie_word_embeddings:
        return params["transformer"]["wte"]["embedding"].T
    return params["lm_head"]["kernel"]
