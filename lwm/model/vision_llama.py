"""The vision-language LLaMA: one decoder over interleaved text tokens and VQGAN codes.

Text and vision tokens share positions, layers and cache but not vocabularies. A boolean vision mask marks
which positions hold vision tokens; those read their embedding from `vte` and are predicted by
`vision_head`, the others use `wte` / `lm_head`. Vision ids are the VQGAN codes 0..8191 plus two markers:

    8192  end of frame     (after every frame but the last)
    8193  end of vision    (after the last frame)

so a two-frame clip of 16x16 codes is 2 * 257 vision tokens. The vision vocabulary is 8448 (8192 + 256;
the rest is unused). Letters: B batch, T tokens, D model dim, V text vocab, W vision vocab.

    cfg = VisionLLaMAConfig.load("tiny")                   # LLaMAConfig fields + the three below
    model = VisionLLaMAForCausalLM(cfg)
    vision_logits, text_logits = model.apply({"params": params}, ids, vision_masks)   # sample_mode 'all'

Parameter tree: the text model's (`transformer/wte`, `transformer/h/...`, `transformer/ln_f`, `lm_head`) plus
`transformer/vte/embedding` (W, D) and `vision_head/kernel` (D, W), as in the original LWM.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from lwm.model.llama import LLaMAConfig, decoder_stack, dense_layer, output_head_kernel, positions_and_cache_mode
from lwm.parallel.sharding import constrain

NUM_VISION_CODES = 8192          # VQGAN codebook size; codes are vision ids 0..8191
END_OF_FRAME = 8192              # vision id closing every frame but the last
END_OF_VISION = 8193             # vision id closing the last frame
SAMPLE_MODES = ("text", "vision", "all")


@dataclasses.dataclass(frozen=True)
class VisionLLaMAConfig(LLaMAConfig):
    """LLaMAConfig plus the vision vocabulary. Presets and json::path load as for LLaMAConfig.

    sample_mode picks what `__call__` returns: 'text' -> text logits, 'vision' -> vision logits,
    'all' -> (vision logits, text logits) (the original's order). It is also the embedding used for every
    position when no vision mask is given (generation of one modality); 'all' then requires masks.
    Generation does not need it: the engine (lwm.inference.engine.Engine) always passes the masks and takes
    the sampled head as an argument (`head='text'|'vision'`, of the engine or of each call), so one model and
    one set of parameters serve text answers and image generation. The key is still accepted (old configs,
    --llama.sample_mode): 'text' or 'vision' only supplies the engine's default head."""

    vision_vocab_size: int = 8448
    tie_vision_embeddings: bool = False
    sample_mode: str = "all"

    def __post_init__(self):
        super().__post_init__()
        if self.sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode={self.sample_mode!r}; choose one of {SAMPLE_MODES}")
        if self.vision_vocab_size <= END_OF_VISION:
            raise ValueError(f"vision_vocab_size={self.vision_vocab_size} must exceed the end-of-vision id "
                             f"{END_OF_VISION}")

    @classmethod
    def from_text_config(cls, config: LLaMAConfig, **vision_fields) -> "VisionLLaMAConfig":
        return cls.from_dict({**config.to_dict(), **vision_fields})

    def shape_model(self, dtype: Any = jnp.float32):
        """(model, example inputs) for `lwm.model.shapes.param_shapes`: the shape twin's
        VisionLLaMAForCausalLM with `dtype` parameters, on one text token (1, 1) and its vision mask."""
        one = jnp.zeros((1, 1), jnp.int32)
        return VisionLLaMAForCausalLM(self.shape_twin(), dtype=dtype, param_dtype=dtype), (one, one.astype(bool))


def _embed(vocab_size: int, config: VisionLLaMAConfig, dtype, param_dtype, name: str) -> nn.Embed:
    return nn.Embed(vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=nn.initializers.normal(config.initializer_range), name=name)


class VisionLLaMAModule(nn.Module):
    """`transformer`: both embeddings, the text model's layers (`h`) and final norm (`ln_f`).
    Returns (hidden (B, T, D) after ln_f, new cache)."""
    config: VisionLLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, vision_masks=None, position_ids=None, segment_ids=None, cache=None,
                 cache_index=None, deterministic=True, cache_mode=None):
        cfg = self.config
        position_ids, mode = positions_and_cache_mode(input_ids.shape, position_ids, cache, cache_index, cache_mode)
        if vision_masks is None:
            if cfg.sample_mode == "all":
                raise ValueError("vision_masks are required with sample_mode='all' (which positions are vision "
                                 "tokens?); pass them, or use sample_mode 'text' / 'vision'")
            vision_masks = jnp.full(input_ids.shape, cfg.sample_mode == "vision")
        if vision_masks.shape != input_ids.shape:
            raise ValueError(f"vision_masks shape {vision_masks.shape} != input_ids shape {input_ids.shape}")
        ids = input_ids.astype(jnp.int32)
        vision_masks = vision_masks.astype(bool)                                               # (B, T)
        # Each table sees id 0 where the other modality sits, so no lookup goes out of range.
        text = _embed(cfg.vocab_size, cfg, self.dtype, self.param_dtype, "wte")(jnp.where(vision_masks, 0, ids))
        vision = _embed(cfg.vision_vocab_size, cfg, self.dtype, self.param_dtype, "vte")(
            jnp.where(vision_masks, ids, 0))
        x = jnp.where(vision_masks[..., None], vision, text)                                   # (B, T, D)
        return decoder_stack(self, x, mode, deterministic, position_ids, segment_ids, cache, cache_index)


class VisionLLaMAForCausalLM(nn.Module):
    """apply(params, input_ids, vision_masks, ...) -> logits per `sample_mode`, or hidden (B, T, D) with
    return_hidden=True (for the blockwise two-head loss, see `output_head_kernels`). With a cache, returns
    (out, cache); cache_mode (lwm.model.llama.CacheMode) says prefill or decode, as in `lwm.model.llama`."""
    config: VisionLLaMAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.transformer = VisionLLaMAModule(cfg, self.dtype, self.param_dtype)
        if not cfg.tie_vision_embeddings:
            self.vision_head = dense_layer(cfg.vision_vocab_size, cfg, self.dtype, self.param_dtype, "vision_head")
        if not cfg.tie_word_embeddings:
            self.lm_head = dense_layer(cfg.vocab_size, cfg, self.dtype, self.param_dtype, "lm_head")

    def _logits(self, hidden, tied: bool, table: str, head: Optional[nn.Dense]):
        if tied:
            emb = self.transformer.variables["params"][table]["embedding"]                    # (V|W, D)
            out = jnp.einsum("btd,vd->btv", hidden, emb.astype(hidden.dtype))
        else:
            out = head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "seq", "vocab"))

    def text_logits(self, hidden):
        """(B, T, D) -> (B, T, V) float32."""
        return self._logits(hidden, self.config.tie_word_embeddings, "wte", getattr(self, "lm_head", None))

    def vision_logits(self, hidden):
        """(B, T, D) -> (B, T, W) float32."""
        return self._logits(hidden, self.config.tie_vision_embeddings, "vte", getattr(self, "vision_head", None))

    def __call__(self, input_ids, vision_masks=None, position_ids=None, segment_ids=None, cache=None,
                 cache_index=None, deterministic=True, return_hidden=False, cache_mode=None):
        hidden, new_cache = self.transformer(input_ids, vision_masks, position_ids, segment_ids, cache,
                                             cache_index, deterministic, cache_mode)
        mode = self.config.sample_mode
        if self.is_initializing():  # create both heads whatever is asked for
            self.text_logits(hidden), self.vision_logits(hidden)
        if return_hidden:
            out = hidden
        elif mode == "all":
            out = (self.vision_logits(hidden), self.text_logits(hidden))
        elif mode == "vision":
            out = self.vision_logits(hidden)
        else:
            out = self.text_logits(hidden)
        return out if cache is None else (out, new_cache)


def output_head_kernels(params, config: VisionLLaMAConfig):
    """(text (D, V), vision (D, W)): the matrices mapping hidden states to each vocabulary's logits
    (lm_head / vision_head, or the transposed tied embedding)."""
    vision = (params["transformer"]["vte"]["embedding"].T if config.tie_vision_embeddings
              else params["vision_head"]["kernel"])
    return output_head_kernel(params, config), vision
