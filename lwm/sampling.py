"""Autoregressive sampling: prefill the prompt with the model's long-context attention, then decode with the
KV cache inside one compiled `lax.while_loop`.

The pieces, each usable alone (the vision generator builds classifier-free guidance and forced
end-of-frame tokens from them):

  sample_logits(logits, rng, temperature, top_k, top_p)  (B, V) -> (B,) tokens; greedy when temperature == 0
  filter_logits(logits, temperature, top_k, top_p)       the temperature / top-k / top-p rule alone
  left_pad(prompts, length, pad_id)                      ragged prompts -> ids, segment_ids, position_ids (B, T)
  prefill(model, params, ids, seg, pos, cache_len)       -> next-token logits (B, V), filled cache
  decode(model, params, cache, logits, ...)              -> new tokens (B, N), counts (B,); one while_loop with
                                                            a `logits_processor(logits, step)` hook and a
                                                            `sample_fn(logits, rng, step)` override
  Sampler                                                host side: buckets, batch padding, the length check,
                                                            one compile per (batch, bucket, budget)

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
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwm.llama import LLaMAConfig, LLaMAForCausalLM, init_cache

LogitsProcessor = Callable[[jax.Array, jax.Array], jax.Array]     # (logits (B, V), step) -> logits (B, V)
SampleFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (logits (B, V), rng, step) -> (B,) int32


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


def _cache_spec(config: LLaMAConfig):
    """With ring attention under an ambient ('dp','fsdp','tp','sp') mesh, the cache is sharded along the
    sequence over sp (as `lwm.attention.decode` expects); otherwise it is left to the compiler."""
    mesh = jax.sharding.get_abstract_mesh()
    if (config.attention_impl not in ("ring", "ring_pallas") or mesh.empty
            or not {"dp", "fsdp", "tp", "sp"} <= set(mesh.axis_names)):
        return None
    P = jax.sharding.PartitionSpec
    kv = P(None, ("dp", "fsdp"), "sp", "tp", None)          # (L, B, S, K, H)
    return dict(k=kv, v=kv, segment_ids=P(("dp", "fsdp"), "sp"))


def _constrain_cache(cache, config: LLaMAConfig):
    spec = _cache_spec(config)
    if spec is None:
        return cache
    return {name: jax.lax.with_sharding_constraint(x, spec[name]) for name, x in cache.items()}


def prefill(model: LLaMAForCausalLM, params, input_ids, segment_ids, position_ids, cache_len: int,
            cache_dtype=None):
    """Run the prompt through the model once, filling cache slots [0, T).

    input_ids, segment_ids, position_ids: (B, T) left-padded (see `left_pad`). Logits are computed for the
    last slot only (hidden (B, T, D) -> (B, 1, V)), never for the whole prompt.
    Returns (logits (B, V) float32, cache with k, v (L, B, cache_len, K, H) and segment_ids (B, cache_len))."""
    b, t = input_ids.shape
    if cache_len < t:
        raise ValueError(f"cache_len={cache_len} is shorter than the prompt ({t} slots)")
    cache = init_cache(model.config, b, cache_len, cache_dtype or model.dtype)
    cache = _constrain_cache(cache, model.config)
    hidden, cache = model.apply({"params": params}, input_ids, position_ids=position_ids,
                                segment_ids=segment_ids, cache=cache, cache_index=0, return_hidden=True)
    logits = model.apply({"params": params}, hidden[:, -1:], method=LLaMAForCausalLM.logits)
    return logits[:, 0], _constrain_cache(cache, model.config)


def decode(model: LLaMAForCausalLM, params, cache, logits, next_positions, start_index, rng, *,
           max_new_tokens: int, eos_id: int, pad_id: int, sample_fn: SampleFn,
           logits_processor: Optional[LogitsProcessor] = None, stream: Optional[Callable] = None):
    """Draw up to max_new_tokens tokens per row inside one `lax.while_loop`.

    logits: (B, V) for the first new token (from `prefill`); next_positions: (B,) its position ids;
    start_index: the cache slot it is written to (the padded prompt length). Step i: processor ->
    sample_fn -> write token; a row is finished after it emits eos_id (later slots hold pad_id); the loop
    ends when every row is finished or the budget is spent. Then the token goes through the model at slot
    start_index + i, which gives the next logits. stream(step, tokens (B,)) is called on the host after
    each step (a `jax.debug.callback`: ordered effects are refused on several devices, so calls carry
    their step), for printing tokens as they come.
    Returns (tokens (B, max_new_tokens) int32, num_tokens (B,) int32 including the EOS)."""
    b = logits.shape[0]

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, num, logits, cache, rng, pos = carry
        rng, key = jax.random.split(rng)
        if logits_processor is not None:
            logits = logits_processor(logits, step)
        tok = jnp.where(done, pad_id, sample_fn(logits, key, step).astype(jnp.int32))    # (B,)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
        num = num + (~done).astype(jnp.int32)
        done = done | (tok == eos_id)
        if stream is not None:
            jax.debug.callback(stream, step, tok)
        out, cache = model.apply({"params": params}, tok[:, None], position_ids=pos[:, None],
                                 segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache,
                                 cache_index=jnp.asarray(start_index + step, jnp.int32))
        return step + 1, tokens, done, num, out[:, 0], cache, rng, pos + 1

    carry = (jnp.int32(0), jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), bool),
             jnp.zeros((b,), jnp.int32), logits, cache, rng, next_positions.astype(jnp.int32))
    _, tokens, _, num, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, num


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


class Sampler:
    """Generate from token prompts with one compiled prefill and one compiled decode loop per shape.

    sampler = Sampler(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id)
    outs = sampler.generate([[1, 306, 4966], [1, 15043]], max_new_tokens=32)   # lists of new token ids

    With an ambient mesh (`jax.set_mesh`), the batch is padded to a multiple of dp*fsdp and prompt buckets
    to multiples of sp; `params` should already be placed on the mesh. `last_stats` holds the timings of
    the latest call (prefill_s, decode_s, prompt_tokens, new_tokens, padded_length)."""

    def __init__(self, model: LLaMAForCausalLM, params, *, eos_id: int, pad_id: int, cache_dtype=None,
                 vocab_size: Optional[int] = None):
        self.model, self.params = model, params
        self.config: LLaMAConfig = model.config
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        # Ids the tokenizer can decode; a model vocabulary padded beyond it never emits the extra ids.
        self.vocab_size = self.config.vocab_size if vocab_size is None else int(vocab_size)
        self.cache_dtype = cache_dtype or model.dtype
        self.last_stats: dict = {}
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len",))
        donate = () if jax.default_backend() == "cpu" else (0,)   # CPU cannot reuse donated buffers
        self._decode = jax.jit(self._decode_impl, donate_argnums=donate,
                               static_argnames=("max_new_tokens", "sampling", "logits_processor", "stream"))

    # The two compiled halves; `jax.jit` caches one executable per shape and static setting.
    def _prefill_impl(self, params, ids, seg, pos, *, cache_len):
        return prefill(self.model, params, ids, seg, pos, cache_len, self.cache_dtype)

    def _decode_impl(self, cache, params, logits, next_pos, start, rng, *, max_new_tokens, sampling,
                     logits_processor, stream):
        sample_fn = lambda lg, key, step: sample_logits(lg, key, sampling.temperature, sampling.top_k,
                                                        sampling.top_p)
        processor = logits_processor
        if self.vocab_size < self.config.vocab_size:
            def processor(lg, step):
                lg = lg.at[:, self.vocab_size:].set(-jnp.inf)
                return lg if logits_processor is None else logits_processor(lg, step)
        return decode(self.model, params, cache, logits, next_pos, start, rng, max_new_tokens=max_new_tokens,
                      eos_id=self.eos_id, pad_id=self.pad_id, sample_fn=sample_fn, logits_processor=processor,
                      stream=stream)

    @staticmethod
    def mesh_sizes() -> tuple[int, int]:
        """(data-parallel size dp*fsdp, sequence-parallel size sp) of the ambient mesh, (1, 1) without one."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1, 1
        shape = dict(mesh.shape)
        return shape.get("dp", 1) * shape.get("fsdp", 1), shape.get("sp", 1)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """The over-length error, raised before anything is compiled."""
        limit = self.config.max_sequence_length
        if prompt_len + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
                f"{prompt_len + max_new_tokens} exceeds the model's max_sequence_length={limit}; shorten the "
                "prompt, lower the token budget, or raise max_sequence_length (e.g. "
                "--update_llama_config='{\"max_sequence_length\": N}')")

    def padded_length(self, prompt_len: int) -> int:
        _, sp = self.mesh_sizes()
        block = max(self.config.scan_query_chunk_size, self.config.scan_key_chunk_size)
        return bucket_length(prompt_len, sp, block)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), rng: Optional[jax.Array] = None, *,
                 logits_processor: Optional[LogitsProcessor] = None, stream: Optional[Callable] = None,
                 padded_length: Optional[int] = None) -> list[list[int]]:
        """Token prompts (BOS included if the model wants one) -> new tokens per prompt, cut after EOS
        (the EOS itself is dropped). padded_length forces a bucket (it must hold every prompt)."""
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        longest = max(len(p) for p in prompts)
        self.check_length(longest, max_new_tokens)
        data, sp = self.mesh_sizes()
        t = padded_length or self.padded_length(longest)
        if t % sp:
            raise ValueError(f"padded_length={t} is not divisible by the mesh's sp={sp}")
        n = len(prompts)
        rows = list(prompts) + [prompts[0]] * (-n % data)    # whole batch shards; extra rows are dropped
        ids, seg, pos = left_pad(rows, t, self.pad_id)
        next_pos = jnp.asarray(seg.sum(axis=1), jnp.int32)
        cache_len = t + sp * math.ceil(max_new_tokens / sp)
        rng = jax.random.PRNGKey(0) if rng is None else rng

        t0 = time.perf_counter()
        logits, cache = self._prefill(self.params, ids, seg, pos, cache_len=cache_len)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        tokens, num = self._decode(cache, self.params, logits, next_pos, jnp.int32(t), rng,
                                   max_new_tokens=max_new_tokens, sampling=sampling,
                                   logits_processor=logits_processor, stream=stream)
        tokens, num = np.asarray(tokens), np.asarray(num)
        t2 = time.perf_counter()
        self.last_stats = dict(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=int(sum(map(len, prompts))),
                               new_tokens=int(num[:n].sum()), padded_length=t, batch=len(rows),
                               decode_steps=int(num.max()))
        outs = []
        for r in range(n):
            row = tokens[r, :num[r]].tolist()
            if row and row[-1] == self.eos_id:
                row = row[:-1]
            outs.append(row)
        return outs


def cast_params(params, dtype):
    """Cast floating leaves of a parameter tree to `dtype` (integers untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
