"""Sampling math and prompt layout for the generation engine (`lwm.inference.engine`, which holds the one
prefill/decode loop):

  sample_logits(logits, rng, temperature, top_k, top_p)  (B, V) -> (B,) tokens, one setting for all rows
  sample_rows(logits, keys, temperature, top_k, top_p)   (B, V) -> (B,) tokens, per-row settings and keys
  filter_logits(logits, temperature, top_k, top_p)       the temperature / top-k / top-p rule alone
  left_pad(prompts, length, pad_id)                      ragged prompts -> ids, segment_ids, position_ids (B, T)
  bucket_length(n, multiple, block)                      padded prompt lengths (few shapes, few compiles)

Left padding, worked example (pad 0, prompts [5 6 7] and [8 9], T = 4):
    ids           0 5 6 7     segment_ids  0 1 1 1     position_ids  0 0 1 2
                  0 0 8 9                  0 0 1 1                   0 0 0 1
Padding is segment 0, so real tokens never attend to it; every row's last real token sits at slot T-1,
so one logits row per prompt comes out of the prefill, and decode step i writes slot T+i for every row,
at position (real length + i).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np



class PromptTooLongError(ValueError):
    """Prompt length plus the token budget does not fit the model's max_sequence_length."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 switch those filters off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits / temperature, then -inf outside the top_k largest (top_k > 0) and outside the smallest set of
    tokens whose probability mass reaches top_p (top_p < 1; the most likely token is always kept).
    (B, V) -> (B, V) float32. The same rule as transformers' Temperature/TopK/TopP warpers."""
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]                        # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]                           # (B, V) descending
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs                         # mass of strictly better tokens
        kept = jnp.where(mass_before < top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)                        # smallest kept logit
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draw one token per row: (B, V) -> (B,) int32. Settings are Python numbers (static under jit).
    temperature == 0 is argmax; otherwise a draw from `filter_logits(...)`."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                *, filters: bool = True) -> jax.Array:
    """One token per row with per-row settings: logits (R, V); keys (R, 2) uint32 (one PRNG key per row);
    temperature (R,) (0 = greedy), top_k (R,) int (0 = off), top_p (R,) (1 = off). The rule of
    `filter_logits` row by row (temperature, then top-k, then top-p over what top-k kept), done with one
    sort; filters=False (static) skips the sort when no row uses top-k or top-p. Returns (R,) int32."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x = logits / t[:, None]
    if filters:
        v = x.shape[-1]
        ordered = jnp.sort(x, axis=-1)[..., ::-1]                                   # (R, V) descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)             # (R, 1)
        x = jnp.where(x < kth, -jnp.inf, x)
        ordered = jnp.where(ordered < kth, -jnp.inf, ordered)                     # sorted, after top-k
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where((top_p[:, None] < 1.0) & (x < threshold), -jnp.inf, x)
    # The random draw only when some row samples: its Gumbel noise (one threefry word per logit) costs more than
    # the argmax (about 10 ms against 1 ms for (16, 32000) on a 2-core CPU), and all-greedy batches are common.
    drawn = jax.lax.cond(jnp.any(temperature > 0),
                         lambda: jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32),
                         lambda: greedy)
    return jnp.where(temperature > 0, drawn, greedy)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """Ragged prompts -> (ids, segment_ids, position_ids), each (B, length) int32 numpy (module docstring)."""
    b = len(prompts)
    ids = np.full((b, length), pad_id, np.int32)
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for r, p in enumerate(prompts):
        n = len(p)
        if n == 0:
            raise ValueError(f"prompt {r} is empty; every prompt needs at least one token (e.g. BOS)")
        if n > length:
            raise ValueError(f"prompt {r} has {n} tokens, more than the padded length {length}")
        ids[r, length - n:] = np.asarray(p, np.int32)
        seg[r, length - n:] = 1
        pos[r, length - n:] = np.arange(n, dtype=np.int32)
    return ids, seg, pos


def bucket_length(n: int, multiple: int = 1, block: int = 1024) -> int:
    """Padded prompt length for n tokens: a power of two times `multiple` up to `multiple * block`, then a
    multiple of `multiple * block` (so a ring over `multiple` devices gets whole chunks). Few distinct
    shapes, hence few compiles. bucket_length(300, 4, 64) == 512; bucket_length(3000, 4, 64) == 3072."""
    if n < 1:
        raise ValueError(f"bucket_length: n={n} must be positive")
    per = math.ceil(n / multiple)
    if per <= block:
        return multiple * (1 << max(0, math.ceil(math.log2(per))))
    return multiple * block * math.ceil(per / block)


def cast_params(params, dtype):
    """Cast floating leaves of a parameter tree to `dtype` (integers untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
