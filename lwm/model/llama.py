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
import enum
import logging
import json
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lwm.attention import (ATTENTION_IMPLS, CONTEXT_PARALLEL_IMPLS, LOAD_BALANCES, STRATEGIES, attention,
                           cached_attention, layout)
from lwm.attention.decode import write_prefix, write_segments
from lwm.parallel.sharding import constrain, sequence_parallel_size
from lwm.utils.dtypes import CACHE_SCALE_DTYPE
from lwm.utils.dtypes import is_quantized as is_quantized_dtype
from lwm.utils.fields import check_ranges, check_types

_COMMON = dict(vocab_size=32000, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _size(d: int, f: int, layers: int, heads: int, **extra) -> dict[str, Any]:
    """One LLaMA size: width D, feed-forward F, layers L, heads N (the original's table), 2K planned length."""
    return {**_COMMON, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_sequence_length": 2048, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters per layer, GQA on, chunks small enough to exercise blocking.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_sequence_length=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, scan_query_chunk_size=64,
                 scan_key_chunk_size=64, scan_mlp_chunk_size=64),
    # CPU-sized; chunk 512: the fastest blockwise attention chunk on CPU, 2K..32K (benchmarks/train_step_bench.py).
    "debug": _size(256, 256, 2, 2, scan_query_chunk_size=512, scan_key_chunk_size=512),
    #               D      F      L   N
    "200m": _size(1024, 2048, 14, 8),
    "1b": _size(2048, 5504, 22, 16),
    "3b": _size(3200, 8640, 26, 32),
    "7b": _size(4096, 11008, 32, 32, max_sequence_length=4096),
    "13b": _size(5120, 13824, 40, 40),
    "30b": _size(6656, 17920, 60, 52),
    "65b": _size(8192, 22016, 80, 64, rms_norm_eps=1e-5),
}

# Keys that appear in the original's / transformers' config files but mean nothing to this model.
_IGNORED_KEYS = frozenset({
    "use_cache", "mesh_dim", "fcm_min_ratio", "fcm_max_ratio", "model_type", "architectures",
    "transformers_version", "torch_dtype", "dtype", "pad_token_id", "return_dict", "output_attentions",
    "output_hidden_states", "add_cross_attention", "_name_or_path", "rope_theta",
})

ROPE_SCALING_TYPES = ("", "linear", "llama3", "yarn", "dynamic", "longrope")

REMAT_POLICIES = {
    "": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,
    "checkpoint_dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_SAID: set = set()


def _say_once(message: str) -> None:
    """Log a warning about a setting that cannot apply, once per process and message."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger(__name__).warning(message)


_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_sequence_length", "rope_original_max_position",
                    "scan_query_chunk_size", "scan_key_chunk_size", "decode_chunk_size", "scan_mlp_chunk_size")


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
    vocab_size: int = 32000                    # V: token ids 0 .. V-1 (embedding rows and lm_head columns)
    hidden_size: int = 4096                    # D: model width
    intermediate_size: int = 11008             # F: SwiGLU feed-forward width
    num_hidden_layers: int = 32                # L: decoder layers
    num_attention_heads: int = 32              # N: query heads; head dim H = D // N
    num_key_value_heads: Optional[int] = None  # K: key/value heads; None = N (no grouped-query attention)
    max_sequence_length: int = 4096            # longest sequence the run plans for (read by the entry points)
    rms_norm_eps: float = 1e-6                 # epsilon inside RMSNorm's rsqrt
    initializer_range: float = 0.02            # std of the normal init of every kernel and the embedding
    theta: float = 10000.0                     # rotary base (rope_theta in transformers' configs)
    tie_word_embeddings: bool = False          # True: logits use the embedding (V, D) transposed; no lm_head
    # RoPE frequency scaling, transformers' `rope_type` (modeling_rope_utils): '' none, 'linear' (every
    # frequency / factor), 'llama3' (Llama 3.1: wavelengths above original_max/low_freq_factor / factor,
    # below original_max/high_freq_factor kept, smooth in between), 'yarn', 'dynamic' (NTK-aware, the base grows
    # with the sequence), 'longrope' (per-frequency short/long factors). See `rope_inv_freq`, docs/llama.md.
    rope_scaling_type: str = ""                # one of ROPE_SCALING_TYPES
    rope_scaling_factor: float = 1.0           # the scaling factor s of every type (longrope: for the attention factor)
    rope_low_freq_factor: float = 1.0          # llama3: wavelengths above original_max / this are divided by factor
    rope_high_freq_factor: float = 4.0         # llama3: wavelengths below original_max / this are kept
    rope_original_max_position: int = 8192     # llama3/yarn/longrope: the base's trained context; dynamic: the
                                               # length above which the base grows (transformers' max_position_embeddings)
    rope_attention_factor: Optional[float] = None  # yarn/longrope: cos and sin multiplier; None = derived from s
    rope_beta_fast: float = 32.0               # yarn: rotations above which a frequency is kept (extrapolated)
    rope_beta_slow: float = 1.0                # yarn: rotations below which a frequency is divided by s
    rope_mscale: float = 0.0                   # yarn: with rope_mscale_all_dim (both > 0) the attention factor is
    rope_mscale_all_dim: float = 0.0           # mscale(s, rope_mscale) / mscale(s, rope_mscale_all_dim)
    rope_truncate: bool = True                 # yarn: round the ramp's bounds to whole dims (floor/ceil)
    rope_short_factor: tuple[float, ...] = ()  # longrope: H/2 divisors of the frequencies up to original_max
    rope_long_factor: tuple[float, ...] = ()   # longrope: H/2 divisors beyond original_max
    bos_token_id: int = 1                      # begin-of-sequence id, the LLaMA tokenizer's (the original said 0)
    eos_token_id: int = 2                      # end-of-sequence id (the original said 1); entry points set the tokenizer's
    embd_pdrop: float = 0.0                    # dropout on the embedding output (training only)
    resid_pdrop: float = 0.0                   # dropout on each attention and feed-forward output (training only)
    attn_pdrop: float = 0.0                    # attention-probability dropout: not implemented, > 0 raises in training
    remat_block: str = ""                      # remat policy of a whole layer ('' = off), see REMAT_POLICIES
    remat_attention: str = ""                  # remat policy of the attention sublayer
    remat_mlp: str = ""                        # remat policy of the feed-forward sublayer
    attention_impl: str = "blockwise"          # the attention path, one of ATTENTION_IMPLS (see lwm.attention)
    scan_attention: bool = False               # the original's switch, only checked: True rejects impl "dense"
    scan_query_chunk_size: int = 1024          # query block size of the blockwise / ring / Pallas attention
    scan_key_chunk_size: int = 1024            # key block size of the same
    decode_chunk_size: int = 128               # slots per chunk that decode reads up to the filled length (docs/sampling.md)
    pallas_interpret: bool = False             # run the Pallas kernel in interpret mode (CPU tests)
    # Context parallelism over the mesh's 'sp' axis (attention_impl 'ring' / 'ring_pallas'; see
    # docs/context_parallel.md). The defaults are the original's plain ring.
    context_parallel_strategy: str = "ring"    # 'ring', 'all_gather', 'ulysses' or 'ulysses_ring' (the split)
    context_parallel_load_balance: str = "none"  # its layout: 'none' (contiguous), 'zigzag' or 'striped'
    context_parallel_ulysses_size: int = 0     # 'ulysses_ring' only (required there): devices per all-to-all group
    scan_mlp: bool = False                     # feed-forward in chunks of scan_mlp_chunk_size tokens (T padded up)
    scan_mlp_chunk_size: int = 1024            # tokens per feed-forward chunk
    scan_layers: bool = True                   # nn.scan over layers: params h/scan_decoder/... with a layer axis
    param_scan_axis: int = 0                   # where that layer axis sits in each scanned parameter (0 or 1)

    def __post_init__(self):
        what = type(self).__name__
        for name in ("rope_short_factor", "rope_long_factor"):   # JSON / flags give lists: hashable tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_types(self, what)                 # each field against its annotation (lwm.utils.fields)
        check_ranges(self, what, at_least={n: 1 for n in _POSITIVE_FIELDS} | {"bos_token_id": 0, "eos_token_id": 0},
                     above={"rms_norm_eps": 0, "theta": 0, "rope_scaling_factor": 0, "rope_low_freq_factor": 0,
                            "rope_attention_factor": 0, "rope_beta_slow": 0},
                     unit_interval=("embd_pdrop", "resid_pdrop", "attn_pdrop"))
        if self.initializer_range < 0:
            raise ValueError(f"{what}.initializer_range={self.initializer_range}: must be >= 0")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{what}.{name}={getattr(self, name)}: must be < vocab_size={self.vocab_size}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
        if self.context_parallel_strategy not in STRATEGIES:
            raise ValueError(f"context_parallel_strategy={self.context_parallel_strategy!r}; choose one of "
                             f"{STRATEGIES}")
        if self.context_parallel_load_balance not in LOAD_BALANCES:
            raise ValueError(f"context_parallel_load_balance={self.context_parallel_load_balance!r}; choose one "
                             f"of {LOAD_BALANCES}")
        two_level = self.context_parallel_strategy == "ulysses_ring"
        if two_level and self.context_parallel_ulysses_size < 1:
            raise ValueError(f"context_parallel_strategy='ulysses_ring' needs context_parallel_ulysses_size >= 1 "
                             f"(devices per all-to-all group; it must divide sp), got "
                             f"{self.context_parallel_ulysses_size}")
        if not two_level and self.context_parallel_ulysses_size:
            raise ValueError(f"context_parallel_ulysses_size={self.context_parallel_ulysses_size} applies only to "
                             f"context_parallel_strategy='ulysses_ring', not {self.context_parallel_strategy!r}; "
                             "leave it 0")
        inactive = {k: v for k, v in (("context_parallel_strategy", self.context_parallel_strategy),
                                      ("context_parallel_load_balance", self.context_parallel_load_balance),
                                      ("context_parallel_ulysses_size", self.context_parallel_ulysses_size))
                    if v != LLaMAConfig.__dataclass_fields__[k].default}
        if inactive and not self.context_parallel:
            _say_once(f"{', '.join(f'{k}={v!r}' for k, v in inactive.items())} has no effect with attention_impl="
                      f"{self.attention_impl!r}: context parallelism applies only to attention_impl "
                      f"{CONTEXT_PARALLEL_IMPLS}")
        if self.attention_impl == "dense" and self.scan_attention:
            raise ValueError("scan_attention=True asks for blockwise attention but attention_impl='dense'")
        if self.pallas_interpret and self.attention_impl not in ("pallas", "ring_pallas"):
            raise ValueError(f"pallas_interpret=True applies only to attention_impl 'pallas' or 'ring_pallas', "
                             f"not {self.attention_impl!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.kv_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size={self.hidden_size} / num_attention_heads={self.num_attention_heads} = "
                             f"head dim {self.hidden_size // self.num_attention_heads}: must be even (rotary "
                             f"embeddings rotate pairs)")
        for name in ("remat_block", "remat_attention", "remat_mlp"):
            if getattr(self, name) not in REMAT_POLICIES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {list(REMAT_POLICIES)}")
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r}; choose one of {ROPE_SCALING_TYPES}")
        if self.rope_scaling_type and self.rope_scaling_factor <= 0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be > 0")
        if self.rope_scaling_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")
        _check_rope_fields(self, what)
        if self.param_scan_axis not in (0, 1):
            raise ValueError(f"param_scan_axis={self.param_scan_axis}; must be 0 or 1")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def context_parallel(self) -> bool:
        """True when attention shards the sequence over 'sp' (attention_impl 'ring' or 'ring_pallas')."""
        return self.attention_impl in CONTEXT_PARALLEL_IMPLS

    def shape_twin(self) -> "LLaMAConfig":
        """The same parameter shapes with plain dense attention and no context-parallel settings: for
        `jax.eval_shape` of the parameters (a ring cannot trace one token without a mesh)."""
        defaults = LLaMAConfig.__dataclass_fields__
        return self.replace(attention_impl="dense", scan_attention=False,
                            context_parallel_strategy=defaults["context_parallel_strategy"].default,
                            context_parallel_load_balance=defaults["context_parallel_load_balance"].default,
                            context_parallel_ulysses_size=defaults["context_parallel_ulysses_size"].default)

    def shape_model(self, dtype: Any = jnp.float32):
        """(model, example inputs) that the one parameter-shape tracer (`lwm.model.shapes.param_shapes`)
        traces: the shape twin's LLaMAForCausalLM with `dtype` parameters, on one token (1, 1)."""
        one = jnp.zeros((1, 1), jnp.int32)
        return LLaMAForCausalLM(self.shape_twin(), dtype=dtype, param_dtype=dtype), (one,)

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
        d = {k: v for k, v in d.items() if k != "rope_theta"}
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


def _check_rope_fields(config: LLaMAConfig, what: str) -> None:
    """The range checks of the yarn / longrope fields (one ValueError line naming the field)."""
    check_ranges(config, what, at_least={"rope_mscale": 0, "rope_mscale_all_dim": 0})
    kind, half = config.rope_scaling_type, config.head_dim // 2
    if kind == "yarn" and not config.rope_beta_fast > config.rope_beta_slow:
        raise ValueError(f"{what}.rope_beta_fast={config.rope_beta_fast}: must exceed "
                         f"rope_beta_slow={config.rope_beta_slow}")
    if kind == "longrope":
        for name in ("rope_short_factor", "rope_long_factor"):
            values = getattr(config, name)
            if len(values) != half:
                raise ValueError(f"{what}.{name} has {len(values)} values: longrope needs head_dim/2 = {half}")
            if not all(v > 0 for v in values):
                raise ValueError(f"{what}.{name}={list(values)}: every value must be > 0")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (arXiv 2309.00071, Eq. 21); 1 for s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(config: LLaMAConfig) -> float:
    """The factor that multiplies cos and sin (so q.k by its square), transformers' `attention_scaling`:
    rope_attention_factor if set; else yarn: mscale(s) = 0.1 ln(s) + 1, or mscale(s, rope_mscale) /
    mscale(s, rope_mscale_all_dim) when both are > 0 (arXiv 2309.00071 Eq. 21; DeepSeek's variant); longrope:
    sqrt(1 + ln(s) / ln(original_max)) for s > 1, else 1 (arXiv 2402.13753, Phi-3); every other type 1."""
    kind, s = config.rope_scaling_type, config.rope_scaling_factor
    if kind not in ("yarn", "longrope"):
        return 1.0
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    if kind == "yarn":
        if config.rope_mscale and config.rope_mscale_all_dim:
            return _yarn_mscale(s, config.rope_mscale) / _yarn_mscale(s, config.rope_mscale_all_dim)
        return _yarn_mscale(s)
    return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(config.rope_original_max_position))


def _exponents(config: LLaMAConfig) -> np.ndarray:
    """(H/2,) float32 2i/H, the exponent of theta per rotated pair."""
    h = config.head_dim
    return np.arange(0, h, 2, dtype=np.float32) / np.float32(h)


def _dynamic_inv_freq(config: LLaMAConfig, seq_len, xp=np):
    """Dynamic NTK-aware scaling (transformers' `_compute_dynamic_ntk_parameters`, after the NTK-aware rule of
    reddit r/LocalLLaMA 14lz7j5 / 14mrgpr): with L = max(seq_len, M), M = rope_original_max_position,
    base = theta * (s L / M - (s - 1)) ^ (H / (H - 2)), inv_freq = base^(-2i/H); L <= M gives theta unchanged.
    seq_len: (B,) ints (numpy or jax, per `xp`) -> (B, H/2) float32."""
    h, f32 = config.head_dim, np.float32
    m, s = f32(config.rope_original_max_position), f32(config.rope_scaling_factor)
    length = xp.maximum(xp.asarray(seq_len).astype(f32), m)
    base = f32(config.theta) * ((s * length / m) - (s - f32(1))) ** f32(h / (h - 2))        # (B,)
    return (f32(1) / (base[:, None] ** xp.asarray(_exponents(config))[None])).astype(f32)


def rope_inv_freq(config: LLaMAConfig, seq_len: Optional[int] = None) -> np.ndarray:
    """(H/2,) float32 inverse frequencies theta^(-2i/H), scaled per `rope_scaling_type`, computed in float32
    as transformers' `modeling_rope_utils` does (`_compute_{default,linear_scaling,llama3,yarn,dynamic_ntk,
    longrope}_parameters`). seq_len (tokens the call covers, its largest position + 1) matters to 'dynamic' and
    'longrope' only; None is transformers' value at load (dynamic: theta unscaled; longrope: short factors).
    The model takes them per row from the positions, see `rope_frequencies`.
      yarn (arXiv 2309.00071, "NTK-by-parts"): pair i rotates r_i = M / (2 pi theta^(2i/H)) times over the
        original context M; with the ramp gamma_i = clip((i - lo) / (hi - lo), 0, 1), lo/hi the dims where
        r = beta_fast / beta_slow (floor/ceil with rope_truncate), inv_freq_i = theta^(-2i/H) *
        ((1 - gamma_i) + gamma_i / s): fast pairs are kept, slow ones divided by s.
      longrope (arXiv 2402.13753): inv_freq_i = 1 / (f_i theta^(2i/H)), f = rope_long_factor when
        seq_len > M, else rope_short_factor."""
    kind, f32 = config.rope_scaling_type, np.float32
    inv = (f32(1.0) / (f32(config.theta) ** _exponents(config))).astype(f32)
    factor = f32(config.rope_scaling_factor)
    if kind == "linear":
        return (inv / factor).astype(f32)
    if kind == "llama3":
        old = f32(config.rope_original_max_position)
        low, high = f32(config.rope_low_freq_factor), f32(config.rope_high_freq_factor)
        wavelen = f32(2 * np.pi) / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(f32)
    if kind == "yarn":
        h, base, m = config.head_dim, config.theta, config.rope_original_max_position
        dim_of = lambda rotations: h * math.log(m / (rotations * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = dim_of(config.rope_beta_fast), dim_of(config.rope_beta_slow)
        if config.rope_truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, h - 1)
        if lo == hi:
            hi += 0.001                                   # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(h // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1).astype(f32)
        keep = f32(1) - ramp                              # 1: extrapolate (keep), 0: interpolate (/ s)
        pos_freq = f32(config.theta) ** _exponents(config)
        interpolated, extrapolated = f32(1) / (factor * pos_freq), f32(1) / pos_freq
        return (interpolated * (f32(1) - keep) + extrapolated * keep).astype(f32)
    if kind == "dynamic":
        return _dynamic_inv_freq(config, np.asarray([seq_len or 0]))[0]
    if kind == "longrope":
        long = seq_len is not None and seq_len > config.rope_original_max_position
        ext = np.asarray(config.rope_long_factor if long else config.rope_short_factor, f32)
        return (f32(1) / (ext * f32(config.theta) ** _exponents(config))).astype(f32)
    return inv


def rope_frequencies(config: LLaMAConfig, position_ids):
    """(inv_freq, attention factor) of one model call, for `apply_rotary`. position_ids: (B, T) int.

    inv_freq is (H/2,) numpy for the types that do not depend on the length, else (B, H/2) float32 computed
    from each row's length L_b = max(position_ids[b]) + 1 ('dynamic': the NTK base at max(L_b, M); 'longrope':
    the long factors when L_b > M). A prefill's L_b is its prompt length (left padding sits at position 0);
    a decode step's is the new token's position + 1. So, as in transformers' generate (its
    `dynamic_rope_update` takes max(position_ids) + 1 on every forward), each key is rotated by the frequencies
    of the call that wrote it into the cache and is not re-rotated later. transformers takes the maximum over
    the whole batch; ours is per row, so one request's frequencies do not depend on its batch neighbours (the
    two agree for a batch of one or of rows of equal length)."""
    scale = rope_attention_factor(config)
    kind = config.rope_scaling_type
    if kind not in ("dynamic", "longrope"):
        return rope_inv_freq(config), scale
    length = jnp.max(position_ids, axis=-1).astype(jnp.int32) + 1                     # (B,)
    if kind == "dynamic":
        return _dynamic_inv_freq(config, length, jnp), scale
    short, long = rope_inv_freq(config), rope_inv_freq(config, config.rope_original_max_position + 1)
    return jnp.where((length > config.rope_original_max_position)[:, None], long[None], short[None]), scale


def apply_rotary(x, positions, inv_freq, scale: float = 1.0):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i], as the original LWM does (with
    inv_freq[i] = theta^(-2i/H) unscaled; see `rope_inv_freq`), times `scale` (cos and sin are multiplied by it,
    transformers' `attention_scaling`; `rope_attention_factor`). x: (B, T, N, H); positions: (B, T) int;
    inv_freq: (H/2,) or per row (B, H/2). A float `inv_freq` is taken as theta (the unscaled form)."""
    h = x.shape[-1]
    if isinstance(inv_freq, (int, float)):
        inv_freq = 1.0 / (inv_freq ** (np.arange(0, h, 2, dtype=np.float32) / h))
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.ndim == 2:
        inv_freq = inv_freq[:, None, :]                                                 # (B, 1, H/2)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq                         # (B, T, H/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
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
    cache_mode: Optional[str] = None  # None (training), CacheMode.PREFILL or CacheMode.DECODE
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, position_ids, segment_ids, layer_cache=None, cache_segment_ids=None, cache_index=None):
        cfg = self.config
        b, t, _ = x.shape
        n, k, h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        q = dense_layer(n * h, cfg, self.dtype, self.param_dtype, "wq")(x).reshape(b, t, n, h)
        key = dense_layer(k * h, cfg, self.dtype, self.param_dtype, "wk")(x).reshape(b, t, k, h)
        val = dense_layer(k * h, cfg, self.dtype, self.param_dtype, "wv")(x).reshape(b, t, k, h)
        inv_freq, rope_scale = rope_frequencies(cfg, position_ids)
        q = apply_rotary(q, position_ids, inv_freq, rope_scale)
        key = apply_rotary(key, position_ids, inv_freq, rope_scale)
        if cfg.attn_pdrop > 0 and not self.deterministic:
            raise ValueError(
                f"attn_pdrop={cfg.attn_pdrop}: dropout on the attention probabilities is not implemented by the "
                "blockwise, ring or Pallas attention (the original LWM drew a (B, N, T, S) Bernoulli mask and "
                "masked dropped scores before the softmax); set attn_pdrop=0 (resid_pdrop and embd_pdrop apply)")
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        key = constrain(key, ("batch", "seq", "kv_heads", "head_dim"))
        val = constrain(val, ("batch", "seq", "kv_heads", "head_dim"))

        new_cache = None
        balance, sp = sequence_layout(cfg, self.cache_mode)
        if self.cache_mode == "decode":  # layer_cache: (k, v) of every layer (L, B, K, S, H) and this layer's index
            cache_k, cache_v, layer = layer_cache
            out, cache_k, cache_v = cached_attention(
                q, key, val, cache_k, cache_v, cache_segment_ids, segment_ids, cache_index, layer,
                impl=cfg.attention_impl, k_chunk=cfg.decode_chunk_size)
            new_cache = (cache_k, cache_v)
        else:
            out = attention(q, key, val, segment_ids, impl=cfg.attention_impl, causal=True,
                            q_chunk=cfg.scan_query_chunk_size, k_chunk=cfg.scan_key_chunk_size,
                            pallas_interpret=cfg.pallas_interpret, strategy=cfg.context_parallel_strategy,
                            load_balance=balance, ulysses_size=cfg.context_parallel_ulysses_size)
            if self.cache_mode == "prefill":  # this layer's keys/values (B, T, K, H) in natural order (the
                # cache's slots [0, T)), written by the collection
                new_cache = tuple(layout.from_layout(a, sp, balance) for a in (key, val))
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        out = dense_layer(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "wo")(out.reshape(b, t, n * h))
        out = nn.Dropout(rate=cfg.resid_pdrop)(out, deterministic=self.deterministic)
        return out, new_cache


def sequence_layout(config: LLaMAConfig, cache_mode: Optional[str] = None) -> tuple[str, int]:
    """(load balance, sp) of the token order inside the layers: the config's
    context_parallel_load_balance when the sequence is sharded over sp > 1 devices (context-parallel impl,
    ambient mesh), else 'none'. Decode steps (one new token against the cache) keep the natural order."""
    sp = sequence_parallel_size()
    if not config.context_parallel or sp == 1 or cache_mode == "decode":
        return "none", sp
    return config.context_parallel_load_balance, sp


def sequence_multiple(config: LLaMAConfig, sp: Optional[int] = None) -> int:
    """What a sequence length must divide by under this config and `sp` (default: the ambient mesh's)."""
    sp = sequence_parallel_size() if sp is None else sp
    if config.context_parallel and config.context_parallel_load_balance == "zigzag":
        return 2 * sp
    return sp


class LLaMAMLP(nn.Module):
    """SwiGLU feed-forward. With scan_mlp it runs over chunks of scan_mlp_chunk_size tokens in a remat'd
    scan, so memory is O(chunk * F) instead of O(T * F); a T that is not a multiple of the chunk is padded
    (the feed-forward is per token). The original did the same with T a multiple of the chunk."""
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
        if not (self.config.scan_mlp and t > chunk) or self.is_initializing():
            return self._ff(x)  # one chunk holds the whole sequence: the same computation as a scan of one
        # The feed-forward is per token, so padding T up to a multiple of the chunk changes no real row.
        n_chunks = -(-t // chunk)
        xp = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - t), (0, 0)))
        body = nn.remat(lambda mdl, carry, xc: (carry, mdl._ff(xc)), prevent_cse=False)
        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       in_axes=1, out_axes=1)
        _, y = scan(self, None, xp.reshape(b, n_chunks, chunk, d))
        return y.reshape(b, n_chunks * chunk, d)[:, :t]


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
    Prefill (cache_mode PREFILL) writes the prompt's keys/values at slots [0, T) once after the
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
        # The load-balanced layout (lwm.attention.layout) is applied here, once, to everything per token that
        # enters the layers, and undone on the hidden states that leave; the cache segment ids above and the
        # prefill's cache writes (LLaMAAttention hands back natural order) stay in natural order.
        balance, sp = sequence_layout(cfg, self.cache_mode)
        if balance != "none":
            layout.check(balance, x.shape[1], sp, "context_parallel_load_balance")
            x, position_ids, segment_ids = (None if a is None else layout.to_layout(a, sp, balance)
                                            for a in (x, position_ids, segment_ids))
        if self.cache_mode == "decode":  # decode keeps the natural order (sequence_layout gives 'none')
            x = (x, cache_pair(cache, "k"), cache_pair(cache, "v"))
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
        if self.cache_mode == "decode":
            x, cache_k, cache_v = x
        x = layout.from_layout(x, sp, balance)
        if cache is None:
            return x, None
        if self.cache_mode == "prefill":  # (L, B, T, K, H) -> the cache layout (L, B, K, T, H), one write at slot 0
            cache_k, cache_v = (write_prefix(cache_pair(cache, "k"), kv[0]),
                                write_prefix(cache_pair(cache, "v"), kv[1]))
        return x, dict(**cache_entries("k", cache_k), **cache_entries("v", cache_v), segment_ids=cache_seg)


def init_cache(config: LLaMAConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache in the layout decode reads (`lwm.attention.decode`): k, v (L, B, K, S, H);
    segment_ids (B, S) with 0 = empty/padding. `dtype` is the cache's own (e.g. bf16 for an fp32 model);
    int8 or float8_e4m3fn (--cache_dtype int8 / fp8) add k_scale, v_scale (L, B, K, S) float32, one scale
    per token and kv head (`lwm.attention.decode.quantize`). Every entry's row axis is CACHE_ROW_AXIS[name]."""
    shape = (config.num_hidden_layers, batch_size, config.kv_heads, max_length, config.head_dim)
    cache = dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 segment_ids=jnp.zeros((batch_size, max_length), jnp.int32))
    if is_quantized_dtype(dtype):
        scale = jnp.zeros(shape[:4], CACHE_SCALE_DTYPE)
        cache.update(k_scale=scale, v_scale=scale)
    return cache


# The row (batch) axis of each cache entry: what copies a row between caches (Engine.insert / move) slices.
CACHE_ROW_AXIS = {"k": 1, "v": 1, "k_scale": 1, "v_scale": 1, "segment_ids": 0}


def cache_pair(cache: dict, name: str):
    """cache[name] (L, B, K, S, H), or (values, scale) for a quantized cache (the form decode reads)."""
    return (cache[name], cache[name + "_scale"]) if name + "_scale" in cache else cache[name]


def cache_entries(name: str, value) -> dict:
    """The inverse of cache_pair: {name: values} or {name: values, name_scale: scale}."""
    return {name: value[0], name + "_scale": value[1]} if isinstance(value, tuple) else {name: value}


class CacheMode(str, enum.Enum):
    """The one explicit choice between the two cached passes (no cache: training, or a plain forward).

    PREFILL: the prompt (B, T) is attended causally and its keys/values are written at slots [0, T).
    DECODE: each row's new token(s) attend to the cache and are written at the rows' slots cache_index
      (scalar or (B,) int32, usually traced).
    The engine (lwm.inference.engine) passes it on every cached call; kept so by
    `tests/model/test_llama.py::test_cache_mode_is_explicit`. A str enum, so a flax module field holding it
    compares equal to 'prefill' / 'decode'."""

    PREFILL = "prefill"
    DECODE = "decode"


def positions_and_cache_mode(input_shape, position_ids, cache, cache_index, cache_mode):
    """(position_ids (B, T) int32, mode: CacheMode or None) of one model call; checks the mode is explicit.

    Without a cache the mode is None and cache_mode must be None. With one, cache_mode must be given:
    PREFILL takes cache_index None or 0 (it always fills slots [0, T)), DECODE needs a cache_index. Position
    ids default to start + [0, T) with start 0 (no cache, prefill) or cache_index (decode). Raises
    ValueError otherwise."""
    b, t = input_shape
    if cache is None:
        if cache_mode is not None:
            raise ValueError(f"cache_mode={cache_mode!r} without a cache: pass cache= (init_cache)")
        mode = None
    else:
        if cache_mode is None:
            raise ValueError("a call with a cache needs cache_mode=CacheMode.PREFILL or CacheMode.DECODE")
        mode = CacheMode(cache_mode)
        at_zero = cache_index is None or (isinstance(cache_index, int) and cache_index == 0)
        if mode is CacheMode.PREFILL and not at_zero:
            raise ValueError(f"cache_mode=PREFILL fills slots [0, T): cache_index must be 0 or None, "
                             f"got {cache_index!r}")
        if mode is CacheMode.DECODE and cache_index is None:
            raise ValueError("cache_mode=DECODE needs cache_index (the rows' slots, scalar or (B,) int32)")
    if position_ids is None:
        start = jnp.zeros((b,), jnp.int32) if mode is not CacheMode.DECODE else jnp.broadcast_to(
            jnp.asarray(cache_index, jnp.int32), (b,))
        position_ids = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    return position_ids, mode


def decoder_stack(module: nn.Module, x, mode, deterministic, position_ids, segment_ids, cache, cache_index):
    """What follows the embedding in `transformer` (text and vision models alike): embedding dropout, the
    layers `h`, the final norm `ln_f`. Called inside `module`'s compact __call__, so `h` and `ln_f` are its
    children. x: (B, T, D) embeddings -> (hidden (B, T, D) after ln_f, new cache or None)."""
    cfg = module.config
    x = nn.Dropout(rate=cfg.embd_pdrop)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "seq", "embed"))
    x, new_cache = LLaMABlockCollection(cfg, module.dtype, module.param_dtype, mode, deterministic, name="h")(
        x, position_ids, segment_ids, cache, cache_index)
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, module.dtype, module.param_dtype, name="ln_f")(x)
    return x, new_cache


class LLaMAModule(nn.Module):
    """`transformer`: embedding, layers, final norm. Returns (hidden (B, T, D) after ln_f, new cache)."""
    config: LLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids=None, segment_ids=None, cache=None, cache_index=None,
                 deterministic=True, cache_mode=None):
        cfg = self.config
        position_ids, mode = positions_and_cache_mode(input_ids.shape, position_ids, cache, cache_index, cache_mode)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(cfg.initializer_range), name="wte")(
            input_ids.astype(jnp.int32))
        return decoder_stack(self, x, mode, deterministic, position_ids, segment_ids, cache, cache_index)


class LLaMAForCausalLM(nn.Module):
    """The causal LM. apply(...) -> logits (B, T, V), or hidden (B, T, D) with return_hidden=True (the
    training loss computes logits blockwise from hidden, see lwm.model.loss). With a cache, returns (out, cache)
    and cache_mode says which pass: CacheMode.PREFILL fills slots [0, T); CacheMode.DECODE writes at the
    rows' slots cache_index."""
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
                 deterministic=True, return_hidden=False, cache_mode=None):
        hidden, new_cache = self.transformer(input_ids, position_ids, segment_ids, cache, cache_index,
                                             deterministic, cache_mode)
        out = hidden if return_hidden else self.logits(hidden)
        return out if cache is None else (out, new_cache)


def output_head_kernel(params, config: LLaMAConfig):
    """The (D, V) matrix that maps hidden states to logits (lm_head, or the tied embedding)."""
    if config.tie_word_embeddings:
        return params["transformer"]["wte"]["embedding"].T
    return params["lm_head"]["kernel"]
