"""VQGAN image tokenizer: frames in [-1, 1] <-> grids of codebook indices.

The architecture and parameter names follow the released LWM `vqgan` checkpoint, so its parameter pickle
loads unchanged. With the released defaults a 256x256 frame becomes 16x16 codes from an 8192-entry codebook
(about 146M parameters); `VQGANConfig.load("tiny")` builds the same architecture small enough for tests.

    vqgan = VQGAN.load(None, VQGANConfig.load("tiny"))     # random init; or a path to weights
    quantized, codes = vqgan.encode(frames)                 # (B, H, W, 3) -> (B, h, w, E), (B, h, w)
    frames = vqgan.decode(codes)                             # (B, h, w) -> (B, H, W, 3) in [-1, 1]

Video works the same with a time axis: (B, T, H, W, 3) <-> (B, T, h, w). Letters here: B batch, T frames,
H/W pixel height/width, h/w code-grid height/width, C channels, E code-vector dimension, V codebook size.

Weight files: the released pickle (a nested dict of numpy arrays) is read with `lwm.utils.safe_pickle`, which
refuses anything that is not plain data. `VQGAN.save` writes the safe native format, flax msgpack
(`*.msgpack`), which stores only arrays and containers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lwm.utils import safe_pickle
from lwm.utils.fields import check_ranges, check_types

_GROUPS = 32  # GroupNorm groups, as in the original (flax's default); every block width must divide by it.


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """VQGAN hyper-parameters; field names are the original's. Defaults are the released model."""

    resolution: int = 256                       # input frames are resolution x resolution
    num_channels: int = 3                       # RGB
    hidden_channels: int = 128                  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)  # width of level i = hidden_channels * channel_mult[i]
    num_res_blocks: int = 2                     # residual blocks per encoder level (decoder uses one more)
    attn_resolutions: tuple[int, ...] = ()      # feature-map sizes at which an attention block follows
    no_attn_mid_block: bool = True              # the released model has no attention in the middle
    z_channels: int = 64                        # encoder output / decoder input width
    num_embeddings: int = 8192                  # codebook size V
    quantized_embed_dim: int = 64               # code-vector dimension E
    dropout: float = 0.0                        # kept for compatibility; inference only, never applied
    resample_with_conv: bool = True             # strided / post-upsample convolutions vs pooling only
    commitment_cost: float = 0.25               # beta of the commitment loss (lwm.train_vqgan)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        check_types(self, "VQGANConfig")
        check_ranges(self, "VQGANConfig", at_least={"resolution": 1, "num_channels": 1, "hidden_channels": 1,
                                                    "num_res_blocks": 0, "z_channels": 1, "num_embeddings": 1,
                                                    "quantized_embed_dim": 1, "commitment_cost": 0},
                     unit_interval=("dropout",))
        if any(m < 1 for m in self.channel_mult) or any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"VQGANConfig.channel_mult={self.channel_mult} and attn_resolutions="
                             f"{self.attn_resolutions}: every entry must be >= 1")
        if not self.channel_mult:
            raise ValueError("VQGANConfig.channel_mult must name at least one level")
        down = 2 ** (self.num_resolutions - 1)
        if self.resolution % down:
            raise ValueError(f"VQGANConfig.resolution={self.resolution} must be divisible by "
                             f"2**(len(channel_mult)-1)={down}")
        widths = [self.hidden_channels * m for m in self.channel_mult] + [self.hidden_channels]
        if any(w % _GROUPS for w in widths):
            raise ValueError(f"VQGANConfig: hidden_channels * channel_mult = {widths} must all be multiples "
                             f"of {_GROUPS} (GroupNorm groups)")

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def codes_per_side(self) -> int:
        """Code-grid side h = w: 16 for the released model (256 / 2**4)."""
        return self.resolution // 2 ** (self.num_resolutions - 1)

    def shape_model(self, dtype: Any = jnp.float32):
        """(model, example inputs) for `lwm.model.shapes.param_shapes`: VQGANModel on one (1, R, R, C) image.
        Its parameters are float32 whatever `dtype` (the model has no param_dtype)."""
        image = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, self.num_channels), jnp.float32)
        return VQGANModel(self), (image,)

    def replace(self, **updates) -> "VQGANConfig":
        unknown = set(updates) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown VQGANConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **updates)

    @classmethod
    def load(cls, name: str) -> "VQGANConfig":
        """A preset ('released', 'tiny') or 'json::path' holding a subset of the fields."""
        if name.startswith("json::"):
            import fsspec

            path = name[len("json::"):]
            with fsspec.open(path, "r") as f:
                try:
                    updates = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(updates, dict):
                raise ValueError(f"{path}: expected a JSON object of VQGANConfig fields")
            return cls().replace(**updates)
        if name not in VQGAN_PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; choose from {sorted(VQGAN_PRESETS)} or json::path")
        return VQGAN_PRESETS[name]


VQGAN_PRESETS = {
    "released": VQGANConfig(),
    # Same module structure (attention included) at 32x32 -> 8x8 codes; the full codebook so that any
    # vision token of the language model decodes. About 0.93M parameters.
    "tiny": VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                        attn_resolutions=(8,), no_attn_mid_block=False, z_channels=16,
                        quantized_embed_dim=16),
}


# ----------------------------------------------------------------------------------------------------------
# Modules. Class names matter: flax names submodules `<ClassName>_<i>`, which gives the checkpoint's paths,
# e.g. encoder/DownsamplingBlock_1/ResnetBlock_0/Conv_2/kernel (the 1x1 shortcut of a widening block).


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus the input (through a 1x1 conv when the width changes)."""

    out_channels: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) -> (B, H, W, C_out)
        out_channels = self.out_channels or x.shape[-1]
        h = nn.silu(nn.GroupNorm(_GROUPS, dtype=self.dtype)(x))
        h = nn.Conv(out_channels, (3, 3), dtype=self.dtype)(h)
        h = nn.silu(nn.GroupNorm(_GROUPS, dtype=self.dtype)(h))
        h = nn.Conv(out_channels, (3, 3), dtype=self.dtype)(h)
        if out_channels != x.shape[-1]:
            x = nn.Conv(out_channels, (1, 1), dtype=self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        h = nn.GroupNorm(_GROUPS, dtype=self.dtype)(x)
        q, k, v = (nn.Conv(C, (1, 1), dtype=self.dtype)(h).reshape(B, H * W, C) for _ in range(3))
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * C ** -0.5  # (B, HW, HW)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", probs, v)                                    # (B, HW, C)
        h = nn.Conv(C, (1, 1), dtype=self.dtype)(h)
        return x + h.reshape(B, H, W, C)


class Downsample(nn.Module):
    """Halve H and W: pad one row/column at the end, then a 3x3 stride-2 conv (or 2x2 average pooling)."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) -> (B, H/2, W/2, C)
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), (2, 2))
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype)(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then (optionally) a 3x3 conv."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, C) -> (B, 2H, 2W, C)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype)(x)
        return x


def _res_blocks(x, cfg: VQGANConfig, block_idx: int, n: int, dtype):
    """`n` residual blocks of level `block_idx`'s width, each followed by attention when the image side is in
    `attn_resolutions`. Called inside a compact `__call__`, so the blocks belong to that module (ResnetBlock_0,
    AttnBlock_0, ...: the released checkpoint's names)."""
    width = cfg.hidden_channels * cfg.channel_mult[block_idx]
    for _ in range(n):
        x = ResnetBlock(width, dtype=dtype)(x)
        if x.shape[1] in cfg.attn_resolutions:
            x = AttnBlock(dtype=dtype)(x)
    return x


class DownsamplingBlock(nn.Module):
    """Encoder level `block_idx`: residual blocks (+ attention at chosen sizes), then downsample."""

    config: VQGANConfig
    block_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _res_blocks(x, cfg, self.block_idx, cfg.num_res_blocks, self.dtype)
        if self.block_idx != cfg.num_resolutions - 1:
            x = Downsample(cfg.resample_with_conv, dtype=self.dtype)(x)
        return x


class UpsamplingBlock(nn.Module):
    """Decoder level `block_idx`: num_res_blocks + 1 residual blocks (+ attention), then upsample."""

    config: VQGANConfig
    block_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _res_blocks(x, cfg, self.block_idx, cfg.num_res_blocks + 1, self.dtype)
        if self.block_idx != 0:
            x = Upsample(cfg.resample_with_conv, dtype=self.dtype)(x)
        return x


class MidBlock(nn.Module):
    """Residual block, optional attention, residual block, at the lowest resolution."""

    config: VQGANConfig
    no_attn: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(dtype=self.dtype)(x)
        if not self.no_attn:
            x = AttnBlock(dtype=self.dtype)(x)
        return ResnetBlock(dtype=self.dtype)(x)


class Encoder(nn.Module):
    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, H, W, 3) -> (B, h, w, z_channels)
        cfg = self.config
        x = nn.Conv(cfg.hidden_channels, (3, 3), dtype=self.dtype)(x)
        for level in range(cfg.num_resolutions):
            x = DownsamplingBlock(cfg, level, dtype=self.dtype)(x)
        x = MidBlock(cfg, cfg.no_attn_mid_block, dtype=self.dtype)(x)
        x = nn.silu(nn.GroupNorm(_GROUPS, dtype=self.dtype)(x))
        return nn.Conv(cfg.z_channels, (3, 3), dtype=self.dtype)(x)


class Decoder(nn.Module):
    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, h, w, z_channels) -> (B, H, W, 3)
        cfg = self.config
        x = nn.Conv(cfg.hidden_channels * cfg.channel_mult[-1], (3, 3), dtype=self.dtype)(x)
        x = MidBlock(cfg, cfg.no_attn_mid_block, dtype=self.dtype)(x)
        for level in reversed(range(cfg.num_resolutions)):
            x = UpsamplingBlock(cfg, level, dtype=self.dtype)(x)
        x = nn.silu(nn.GroupNorm(_GROUPS, dtype=self.dtype)(x))
        return nn.Conv(cfg.num_channels, (3, 3), dtype=self.dtype)(x)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization (squared Euclidean distance), with a straight-through gradient."""

    n_e: int    # V
    e_dim: int  # E

    def setup(self):
        init = lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -1.0 / self.n_e, 1.0 / self.n_e)
        self.embeddings = self.param("embeddings", init, (self.n_e, self.e_dim), jnp.float32)  # (V, E)

    def lookup(self, codes):  # (...) int -> (..., E)
        return jnp.take(self.embeddings, codes, axis=0)

    def __call__(self, z):  # (..., E) -> quantized (..., E), codes (...)
        flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)                      # (P, E)
        dist = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(self.embeddings ** 2, axis=1)
                - 2.0 * flat @ self.embeddings.T)                                    # (P, V)
        codes = jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])
        z_q = self.lookup(codes).astype(z.dtype)
        return z + jax.lax.stop_gradient(z_q - z), codes


class VQGANModel(nn.Module):
    """Encoder -> 1x1 quant_conv -> quantize; codes -> lookup -> 1x1 post_quant_conv -> decoder."""

    config: VQGANConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.quantized_embed_dim)
        self.quant_conv = nn.Conv(cfg.quantized_embed_dim, (1, 1), dtype=self.dtype)
        self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1), dtype=self.dtype)

    def encode(self, pixels):
        """(B, H, W, 3) or (B, T, H, W, 3) -> quantized (..., h, w, E) float32, codes (..., h, w) int32."""
        lead = pixels.shape[:-3]
        x = pixels.reshape(-1, *pixels.shape[-3:])                 # (B*T, H, W, 3)
        z = self.quant_conv(self.encoder(x))                       # (B*T, h, w, E)
        quantized, codes = self.quantize(z)
        return (quantized.astype(jnp.float32).reshape(*lead, *quantized.shape[1:]),
                codes.reshape(*lead, *codes.shape[1:]))

    def decode(self, encoding, is_codebook_indices: bool = True):
        """Codes (B[, T], h, w) or vectors (B[, T], h, w, E) -> pixels (B[, T], H, W, 3) in [-1, 1]."""
        if is_codebook_indices:
            encoding = self.quantize.lookup(encoding)              # (..., h, w, E)
        lead = encoding.shape[:-3]
        x = encoding.reshape(-1, *encoding.shape[-3:]).astype(self.dtype)
        pixels = self.decoder(self.post_quant_conv(x))             # (B*T, H, W, 3)
        pixels = jnp.clip(pixels.astype(jnp.float32), -1.0, 1.0)
        return pixels.reshape(*lead, *pixels.shape[1:])

    def __call__(self, pixels):
        """Round trip, used to create every parameter at init."""
        return self.decode(self.encode(pixels)[1])

    # ---- training (lwm.training.vqgan); inference above never calls these

    def encode_latents(self, pixels):
        """(B, H, W, 3) -> encoder outputs z before quantization (B, h, w, E) float32: what the trainer
        initialises the codebook from and restarts dead codes with."""
        return self.quant_conv(self.encoder(pixels)).astype(jnp.float32)

    def train_forward(self, pixels):
        """(B, H, W, 3) in [-1, 1] -> dict of the training terms, with gradients to every parameter:

        reconstruction (B, H, W, 3) float32, the decoder's output NOT clipped (a clipped loss would stop the
        gradient of pixels outside [-1, 1]); z (B, h, w, E) the encoder outputs; codes (B, h, w) int32, the
        same nearest entries `encode` picks; codebook_loss = mean ||sg(z) - e||^2 (moves the codebook only)
        and commitment_loss = mean ||z - sg(e)||^2 (moves the encoder only; the trainer weighs it by
        config.commitment_cost, beta = 0.25), means over B*h*w*E elements (van den Oord et al. 2017, "Neural
        Discrete Representation Learning", eq. 3; taming-transformers' VectorQuantizer). The decoder reads
        z + sg(e - z): e in value, the straight-through gradient to z."""
        z = self.encode_latents(pixels)                                            # (B, h, w, E)
        _, codes = self.quantize(z)
        e = self.quantize.lookup(codes)                                            # (B, h, w, E)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
        commitment_loss = jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        z_q = z + jax.lax.stop_gradient(e - z)
        reconstruction = self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)
        return dict(reconstruction=reconstruction, z=z, codes=codes, codebook_loss=codebook_loss,
                    commitment_loss=commitment_loss)


# ----------------------------------------------------------------------------------------------------------
# Jitted entry points. The module is static (hashable), parameters are arguments, so each (config, shape)
# compiles once and is shared by every VQGAN instance.


@functools.partial(jax.jit, static_argnames=("model",))
def encode_jit(model: VQGANModel, params, pixels):
    return model.apply({"params": params}, pixels, method=VQGANModel.encode)


@functools.partial(jax.jit, static_argnames=("model", "is_codebook_indices"))
def decode_jit(model: VQGANModel, params, encoding, is_codebook_indices: bool = True):
    return model.apply({"params": params}, encoding, is_codebook_indices, method=VQGANModel.decode)


def init_params(config: VQGANConfig, seed: int = 0) -> dict:
    """Random parameters for demos, tests and benchmarks, drawn on the host with numpy.

    Kernels ~ normal with std 1/sqrt(fan_in) (flax's LeCun normal, untruncated), zero biases, unit norm
    scales and the original's uniform(-1/V, 1/V) codebook. No init graph is compiled: `jax.jit(model.init)`
    takes several seconds to compile even for the tiny preset; this takes milliseconds (~3 s at 146M)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from lwm.model.shapes import param_shapes

    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in flatten_dict(param_shapes(config)).items():
        shape, name = leaf.shape, path[-1]
        if name == "kernel":                                  # (kh, kw, in, out): std 1 / sqrt(fan_in)
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]), dtype=np.float32)
        elif name == "embeddings":
            value = rng.uniform(-1 / shape[0], 1 / shape[0], shape).astype(np.float32)
        elif name in ("bias", "scale"):
            value = np.full(shape, name == "scale", np.float32)
        else:
            raise AssertionError(f"no initializer for VQGAN parameter {'/'.join(path)}")
        params[path] = jnp.asarray(value)
    return unflatten_dict(params)


def _check_tree(params: dict, config: VQGANConfig, source: str) -> dict:
    """Check `params` has exactly the paths and shapes `config` builds (the one tree validator,
    lwm.utils.trees); return it as float32 jnp arrays. A {'params': ...} wrapper is unwrapped."""
    from flax.traverse_util import unflatten_dict

    from lwm.model.shapes import param_shapes
    from lwm.utils.trees import TreeValidator

    if not isinstance(params, dict):
        raise ValueError(f"{source}: expected a nested dict of arrays, got {type(params).__name__}")
    if set(params) == {"params"}:
        params = params["params"]
    validator = TreeValidator(f"{source} (VQGAN parameters for this VQGANConfig)", param_shapes(config))
    flat = validator.check_tree(params)
    return unflatten_dict({k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in flat.items()})


class VQGAN:
    """Parameters plus jitted, batched encode/decode for one VQGANConfig."""

    def __init__(self, config: VQGANConfig, params: dict, dtype: Any = jnp.float32):
        self.config = config
        self.params = params
        self.model = VQGANModel(config, dtype=dtype)

    @classmethod
    def load(cls, path: str | None, config: VQGANConfig | None = None, *, seed: int = 0,
             dtype: Any = jnp.float32) -> "VQGAN":
        """Weights from `path`, or a random init (from `seed`) when path is None or ''.

        `*.msgpack` is the native format (`VQGAN.save`); any other path is read as the released parameter
        pickle with the restricted unpickler. Local paths and fsspec URLs both work."""
        config = config or VQGANConfig()
        if not path:
            return cls(config, init_params(config, seed), dtype)
        if str(path).endswith(".msgpack"):
            import fsspec

            with fsspec.open(path, "rb") as f:
                tree = flax.serialization.msgpack_restore(f.read())
        else:
            tree = safe_pickle.load_path(path)
        return cls(config, _check_tree(tree, config, str(path)), dtype)

    def save(self, path: str) -> None:
        """Write the parameters as flax msgpack (no pickle); `path` must end in .msgpack."""
        import fsspec

        if not str(path).endswith(".msgpack"):
            raise ValueError(f"{path}: the native VQGAN format is flax msgpack; use a .msgpack suffix")
        tree = jax.tree.map(np.asarray, self.params)
        with fsspec.open(path, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(tree))

    def _check_pixels(self, pixels) -> None:
        cfg = self.config
        if pixels.ndim not in (4, 5) or pixels.shape[-3:] != (cfg.resolution, cfg.resolution, cfg.num_channels):
            raise ValueError(f"VQGAN.encode: expected (B, H, W, C) or (B, T, H, W, C) with H = W = "
                             f"{cfg.resolution}, C = {cfg.num_channels}; got shape {tuple(pixels.shape)}")

    def encode(self, pixels) -> tuple[jax.Array, jax.Array]:
        """Frames in [-1, 1], (B, H, W, 3) or (B, T, H, W, 3) -> (quantized (..., h, w, E), codes (..., h, w)).

        Frames are encoded independently, so the compiled function is keyed on the frame count alone:
        4 images and 2 videos of 2 frames share one compilation."""
        pixels = jnp.asarray(pixels, jnp.float32)
        self._check_pixels(pixels)
        lead = pixels.shape[:-3]
        quantized, codes = encode_jit(self.model, self.params, pixels.reshape(-1, *pixels.shape[-3:]))
        return quantized.reshape(*lead, *quantized.shape[1:]), codes.reshape(*lead, *codes.shape[1:])

    def decode(self, codes) -> jax.Array:
        """Codes (B, h, w) or (B, T, h, w) in [0, num_embeddings) -> frames (B[, T], H, W, 3) in [-1, 1]."""
        codes = jnp.asarray(codes)
        side = self.config.codes_per_side
        if codes.ndim not in (3, 4) or codes.shape[-2:] != (side, side):
            raise ValueError(f"VQGAN.decode: expected codes (B, {side}, {side}) or (B, T, {side}, {side}); "
                             f"got shape {tuple(codes.shape)}")
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"VQGAN.decode: codes must be integers, got {codes.dtype}")
        if not isinstance(codes, jax.core.Tracer) and codes.size:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.config.num_embeddings:
                raise ValueError(f"VQGAN.decode: codes must lie in [0, {self.config.num_embeddings}); "
                                 f"got values in [{lo}, {hi}]")
        pixels = decode_jit(self.model, self.params, codes.reshape(-1, side, side).astype(jnp.int32))
        return pixels.reshape(*codes.shape[:-2], *pixels.shape[1:])

    def decode_vectors(self, quantized) -> jax.Array:
        """Quantized vectors (B[, T], h, w, E) -> frames, as the original's decode(..., False)."""
        quantized = jnp.asarray(quantized, jnp.float32)
        pixels = decode_jit(self.model, self.params, quantized.reshape(-1, *quantized.shape[-3:]),
                         is_codebook_indices=False)
        return pixels.reshape(*quantized.shape[:-3], *pixels.shape[1:])
