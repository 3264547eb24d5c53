"""The one generation engine: prefill, a decode step over a batch of slots, and batched generation on top.

Every inference front-end (text chat, the needle evals, vision chat, vision generation, the server, the
benchmarks) calls this; there is no other prefill or decode loop in the package (no other module builds a
cache or picks a CacheMode: tests/test_one_home.py::test_rule_holds[engine]).

    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)

(a) Batched generation, host-driven (streaming and cancellation are plain Python):

    result = engine.generate([[1, 306, 4966], [1, 15043]], max_new_tokens=32,
                             sampling=[SamplingConfig(0.7, 40, 0.9), SamplingConfig()],  # or one for all rows
                             seeds=[0, 1], stop_ids=[tok.eos_id], stream=callback)
    result.tokens   # list per row of new token ids, cut before the first stop id
    result.finish   # per row: 'stop' (a stop id came), 'length' (budget spent) or 'cancelled'
    result.stats    # prefill_s, time_to_first_token_s (prefill + drawing token 0), decode_s (the rest),
                    # prompt_tokens, new_tokens, steps, batch, padded_length, cache_length

  max_new_tokens: int or one per row. stream(step, tokens) is called after every decode step with tokens[r]
  the new id of row r (None once row r has finished); it may return row indices to cancel. Vision-language
  models (lwm.model.vision_llama) take `vision=[mask per prompt]` (True where the prompt id is a vision id);
  generated tokens are of the sampled head, `head='text'|'vision'` (a call argument of every prefill / insert /
  step / generate / score, default the engine's `head`). `rule` replaces per-row
  sampling by a batch-level token rule (classifier-free guidance, forced end-of-frame tokens: see
  `TokenRule`). A prompt + budget longer than the model's max_sequence_length raises PromptTooLongError
  (naming the numbers) before anything is compiled.

(b) Slots, for continuous batching (MaxText's MaxEngine / JetStream style):

    state = engine.init_state(slots=8, cache_length=4096)   # every slot free
    prefix = engine.prefill(prompt_ids, vision=None)         # one prompt -> its cache rows and first logits
    state = engine.insert(prefix, state, slot=3, max_new_tokens=64, sampling=SamplingConfig(), seed=0)
    # or a batched prefill (prefill_batch) into several slots at once: slot=[5, 6, -1, 7] (-1: row left out)
    first, going = engine.drawn(state)                        # slot 3's first token: first[3] (numpy (S,))
    state, tokens, emitted = engine.step(state)               # the next token for every active slot (numpy (S, 1))
    state = engine.free(state, 3)
    engine.active(state)                                      # numpy (S,) bool: slots still generating

  A slot's first token is drawn at `insert` (from the prefill's logits: the time to first token is the
  prefill, no decode step), as JetStream's prefill returns it; each step then writes a slot's last token to
  the cache and draws the next. A slot stops by itself after a stop id (`stop_ids` of init_state) or its
  budget; each slot keeps its own fill length and position, and a step costs what the longest filled slot
  holds, not the allocated length.

(e) Log-probabilities (`token_logprobs`: the model's log_softmax over decodable ids, before temperature / top-k /
top-p). The decode state carries each slot's last drawn token's logprob and its K = TOP_LOGPROBS likeliest
alternatives; `step(state, logprobs=True)` returns them per step as TokenLogprobs ((R, n), (R, n, K) x 2; one
more compiled step, whatever k a caller slices) and `drawn(state, logprobs=True)` the first token's.
`score(prompts)` is the one log-likelihood scorer: one forward over every position, per prompt entry t = token
t+1's logprob given the tokens before it, with its top K.

(g) Chunked and prefix-cached prefill (`prefill(..., chunk=, prefix_cache=)`, `start_prefill`, and
`generate(..., prefill_chunk=, prefix_cache=)`): the prompt sits at slots [0, n) and is prefilled chunk by chunk
through the decode pass, so a chunk attends to the cache so far and causally to itself and the working memory
is one chunk's; a PrefixCache (lwm.inference.prefix_cache) supplies the prompt's longest cached prefix as KV
blocks and only the rest is computed. `Engine.prefix_cache(budget_bytes, block_size)` makes one for this
model and cache dtype; the --prefix_cache_mb / --prefix_cache_block / --prefill_chunk flags are
lwm.inference.runtime's.

(c) Host read-back (`lwm.parallel.multihost.host_array`, the one read-back) gathers arrays that span several processes before reading them, so the
same code runs on one host or a multi-host pod. (d) `check_length` is the length check.

(f) Stateless: the engine holds the model, its parameters and its compiled functions, nothing per slot or per
request. Everything that differs per slot (sampling settings, key, fill, budget, flags) travels in the
DecodeState; which head is sampled travels in the call (a static argument: one compile per head and shape).
So one engine serves every decode state (the server keeps one for all of its states and its image
generation) and `move` between two states needs no second engine. The top-k/top-p sort runs only in the
steps where some live slot asks for it: the default rule picks it with a `lax.cond` on the state's per-slot
settings (`_PerRow`), so an all-greedy step costs what it did with a separate greedy compile.

Cache (lwm.model.llama.init_cache): k, v (L, B, K, S, H) in the layout decode reads, written in place (the
decode state is donated); `cache_dtype` may differ from the model's (e.g. bf16 cache for an fp32 model).
With ring attention under a mesh with 'sp', the cache is sharded along S and every step merges the shards
with one pmax/psum of the softmax statistics (lwm.attention.decode).

Letters: R rows (slots), T padded prompt length, S cache slots, V vocabulary of the sampled head.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lwm.attention.decode import as_bits, from_bits
from lwm.parallel import sharding
from lwm.parallel.multihost import host_array
from lwm.utils.dtypes import check_cache_dtype_backend
from lwm.model.llama import CACHE_ROW_AXIS, CacheMode, LLaMAForCausalLM, init_cache, sequence_multiple
from lwm.inference.prefix_cache import PrefixCache
from lwm.inference.sampling import PromptTooLongError, SamplingConfig, bucket_length, left_pad, sample_rows
from lwm.model.vision_llama import VisionLLaMAForCausalLM

# Tokens per chunk of a chunked prefill when a prefix cache is given without --prefill_chunk.
DEFAULT_PREFILL_CHUNK = 2048


def default_prefill_chunk(block_size: Optional[int] = None) -> int:
    """The chunk of a chunked prefill given none: DEFAULT_PREFILL_CHUNK tokens, rounded down to whole blocks of a
    prefix cache of `block_size`-slot blocks (at least one block). The server's scheduler budgets its steps
    with it."""
    if block_size is None:
        return DEFAULT_PREFILL_CHUNK
    return block_size * max(1, DEFAULT_PREFILL_CHUNK // block_size)

# (logits (R, V) float32, keys (R, 2) uint32, steps (R,) int32, temperature (R,), top_k (R,), top_p (R,))
#   -> tokens (R,) int32. Must be hashable (it is a static argument of the compiled step).
TokenRule = Callable[..., jax.Array]


def per_row_sampling(logits, keys, steps, temperature, top_k, top_p, *, filters: bool = True):
    """The default TokenRule: each row drawn with its own settings (greedy where temperature is 0)."""
    return sample_rows(logits, keys, temperature, top_k, top_p, filters=filters)


class DecodeState(NamedTuple):
    """Everything the decode step carries, one entry per slot (a pytree; donated to each step)."""
    cache: dict                 # k, v (L, R, K, S, H); segment_ids (R, S)
    token: jax.Array            # (R,) int32: each slot's last drawn token, not yet in the cache
    index: jax.Array            # (R,) int32: the cache slot that token is written to
    position: jax.Array         # (R,) int32: its position id
    steps: jax.Array            # (R,) int32: tokens drawn so far
    budget: jax.Array           # (R,) int32: max new tokens
    active: jax.Array           # (R,) bool
    temperature: jax.Array      # (R,) float32
    top_k: jax.Array            # (R,) int32
    top_p: jax.Array            # (R,) float32
    keys: jax.Array             # (R, 2) uint32: per-slot PRNG key; step i draws with fold_in(key, i)
    stop_ids: jax.Array         # (n,) int32
    logprob: jax.Array          # (R,) float32: log-probability of `token` (see `token_logprobs`)
    top_ids: jax.Array          # (R, K) int32: the K = TOP_LOGPROBS most likely ids where `token` was drawn
    top_logprobs: jax.Array     # (R, K) float32: their log-probabilities, descending


TOP_LOGPROBS = 20   # K: alternatives kept per drawn token (OpenAI's largest top_logprobs); callers slice fewer


class TokenLogprobs(NamedTuple):
    """Log-probabilities of drawn tokens, from `Engine.step(..., logprobs=True)` (shapes (R, n), (R, n, K),
    (R, n, K)), `Engine.drawn(state, logprobs=True)` ((R,), (R, K), (R, K)) and `Engine.score` (per prompt,
    (P-1,), (P-1, K), (P-1, K)). Values are `token_logprobs` of the model's logits: natural log, float32."""
    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class Prefix(NamedTuple):
    """Prefilled prompts, ready for `insert`: cache rows (k, v (L, P, K, T, H), segment_ids (P, T)), each
    row's next-token logits (P, V), `length` the slot the next token is written at (the padded length T of a
    left-padded whole prefill; the prompt length of a chunked one, whose prompt starts at slot 0), the next
    position (the prompt length: an int, or one per row) and `cached`, the prompt tokens taken from a prefix
    cache."""
    cache: dict
    logits: jax.Array
    length: int
    position: Union[int, Sequence[int]]
    cached: int = 0             # prompt tokens whose cache came from a prefix cache (not computed again)


@dataclasses.dataclass
class GenerateResult:
    tokens: list            # list[list[int]] new tokens per row, before the first stop id
    finish: list            # per row 'stop' | 'length' | 'cancelled'
    stats: dict


def mesh_sizes() -> tuple[int, int]:
    """(data-parallel size dp*fsdp, sequence-parallel size sp) of the ambient mesh, (1, 1) without one."""
    return sharding.data_parallel_size(), sharding.sequence_parallel_size()


def parse_cache_dtype(value):
    """None / '' (the model's dtype), a float dtype, or a name ('fp32', 'bf16', 'fp16', or the quantized 'int8',
    'fp8'; the --cache_dtype flag) of the one dtype table (lwm.utils.dtypes); raises ValueError naming
    --cache_dtype."""
    from lwm.utils import dtypes

    return dtypes.parse_cache_dtype(value, what="--cache_dtype")


def seed_of(rng) -> int:
    """An int seed from a PRNG key (raw uint32 or typed): its last word (PRNGKey(s) -> s for 0 <= s < 2**32),
    for callers that hold keys; 0 for None."""
    if rng is None:
        return 0
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return int(np.asarray(rng).reshape(-1)[-1])


def token_logprobs(logits: jax.Array, vocab_size: int) -> jax.Array:
    """The log-probabilities the engine reports (..., V) -> (..., V) float32: log_softmax of the model's logits
    over the ids the tokenizer can decode (ids >= vocab_size get -inf), before temperature, top-k and top-p:
    the model's own distribution, whatever rule then draws from it (vLLM's default, 'raw' log-probabilities).
    A token drawn at temperature 0.7 is reported with its probability under the model, not under the
    sharpened distribution it was drawn from."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def _replicated(x):
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


HEADS = ("text", "vision")


class Engine:
    """See the module docstring. model: LLaMAForCausalLM, or VisionLLaMAForCausalLM (any sample_mode: the
    engine always passes the vision masks, so the model's sample_mode never chooses an embedding here);
    params already placed on the ambient mesh (if any). head: the head sampled when a call names none, 'text'
    (lm_head, V = vocab_size) or 'vision' (vision_head, V = vision_vocab_size; vision models only); default the
    model config's `sample_mode` when that is 'text' or 'vision' (the old way of choosing it, still accepted),
    else 'text'. vocab_size: ids the tokenizer can decode, a bound on the default head (a model vocabulary
    padded beyond it never emits the extra ids); the other head is unbounded. cache_dtype: the KV cache's
    dtype (default the model's). Raises ValueError for an unknown head or a vision head on a text model,
    TypeError for another model class. The engine holds no per-slot or per-request state (module docstring
    (f)): after construction only `last_stats` (generate's timings) changes."""

    def __init__(self, model, params, *, eos_id: int, pad_id: int, vocab_size: Optional[int] = None,
                 cache_dtype=None, head: Optional[str] = None):
        self.model, self.params, self.config = model, params, model.config
        self.vision = isinstance(model, VisionLLaMAForCausalLM)
        if not self.vision and not isinstance(model, LLaMAForCausalLM):
            raise TypeError(f"Engine: unsupported model {type(model).__name__}")
        if head is None:
            head = getattr(self.config, "sample_mode", "text")
            head = head if head in HEADS else "text"
        self.head = self._check_head(head)
        self.head_size = self._head_size(self.head)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.vocab_size = self.head_size if vocab_size is None else min(int(vocab_size), self.head_size)
        self.cache_dtype = jnp.dtype(parse_cache_dtype(cache_dtype) or model.dtype)
        check_cache_dtype_backend(self.cache_dtype)  # int8 / fp8: one line before anything compiles
        self.last_stats: dict = {}
        self._prefill_jit = jax.jit(self._prefill_impl, static_argnames=("cache_len", "head"))
        self._step_jit = jax.jit(self._step_impl, donate_argnums=(1,),
                                 static_argnames=("rule", "n_steps", "logprobs", "head"))
        self._score_jit = jax.jit(self._score_impl, static_argnames=("head",))
        self._insert_jit = jax.jit(self._insert_impl, donate_argnums=(0,), static_argnames=("rule", "head"))
        self._move_jit = jax.jit(self._move_impl, donate_argnums=(0,))
        self._start_jit = jax.jit(self._start_impl, static_argnames=("rule", "head"))
        self._chunk_jit = jax.jit(self._chunk_impl, donate_argnums=(1,), static_argnames=("head",))
        self._empty_jit = jax.jit(self._empty_impl, static_argnames=("rows", "length"))
        self._put_block_jit = jax.jit(self._put_block_impl, donate_argnums=(0,))
        self._take_block_jit = jax.jit(self._take_block_impl, static_argnames=("size",))

    def _check_head(self, head: Optional[str]) -> str:
        """head or the engine's default; ValueError naming the choices, or a vision head on a text model."""
        head = self.head if head is None else head
        if head not in HEADS:
            raise ValueError(f"head={head!r}; choose one of {HEADS}")
        if head == "vision" and not self.vision:
            raise ValueError("head='vision' needs a vision-language model (VisionLLaMAForCausalLM)")
        return head

    def _head_size(self, head: str) -> int:
        """V of the head: the model's text or vision vocabulary."""
        return self.config.vision_vocab_size if head == "vision" else self.config.vocab_size

    def _decodable(self, head: str) -> int:
        """Ids of `head` that may be drawn: `vocab_size` for the default head, the whole head otherwise."""
        return self.vocab_size if head == self.head else self._head_size(head)

    # ---------------------------------------------------------------------------------- the model calls
    def _hidden(self, params, ids, vision, position_ids, segment_ids, cache, cache_index, cache_mode):
        """vision: (R, T) bool masks for a vision model (never None: the model's sample_mode is not read)."""
        kw = dict(position_ids=position_ids, segment_ids=segment_ids, cache=cache, cache_index=cache_index,
                  cache_mode=cache_mode, return_hidden=True)
        if self.vision:
            return self.model.apply({"params": params}, ids, vision, **kw)
        return self.model.apply({"params": params}, ids, **kw)

    def _logits(self, params, hidden, head: str):
        """(R, T, D) -> (R, T, V) float32 of `head`."""
        if not self.vision:
            method = LLaMAForCausalLM.logits
        elif head == "vision":
            method = VisionLLaMAForCausalLM.vision_logits
        else:
            method = VisionLLaMAForCausalLM.text_logits
        return self.model.apply({"params": params}, hidden, method=method)

    def _constrain_cache(self, cache):
        """With context parallelism under a ('dp','fsdp','tp','sp') mesh, the cache is sharded as
        `lwm.parallel.sharding.cache_specs` says (S over sp, as lwm.attention.decode expects); otherwise it is left to
        the compiler."""
        if not self.config.context_parallel or not sharding.has_full_mesh():
            return cache
        spec = sharding.cache_specs()
        return {name: jax.lax.with_sharding_constraint(x, spec[name]) for name, x in cache.items()}

    def _prefill_impl(self, params, ids, vision, seg, pos, *, cache_len, head):
        """Left-padded prompts (R, T) -> (logits (R, V) at the last slot, cache with slots [0, T) filled).
        Logits are computed for the last slot only (hidden (R, T, D) -> (R, 1, V))."""
        cache = self._constrain_cache(init_cache(self.config, ids.shape[0], cache_len, self.cache_dtype))
        hidden, cache = self._hidden(params, ids, vision, pos, seg, cache, 0, CacheMode.PREFILL)
        return self._logits(params, hidden[:, -1:], head)[:, 0], self._constrain_cache(cache)

    def _chunk_impl(self, params, cache, ids, vision, seg, pos, index, last, *, head):
        """One chunk of a chunked prefill: ids (R, C) at slots [index, index + C) attend to the cache's
        filled slots and causally to each other (the decode pass: lwm.attention.cached_attention), their keys
        and values written in place. Returns (logits (R, V) of `head` at chunk entry `last`, the cache)."""
        hidden, cache = self._hidden(params, ids, vision, pos, seg, cache, index, CacheMode.DECODE)
        h = jax.lax.dynamic_index_in_dim(hidden, last, axis=1, keepdims=True)          # (R, 1, D)
        return self._logits(params, h, head)[:, 0], self._constrain_cache(cache)

    def _empty_impl(self, *, rows: int, length: int):
        return self._constrain_cache(init_cache(self.config, rows, length, self.cache_dtype))

    def _put_block_impl(self, cache, block, start):
        """A prefix-cache block (k, v (L, 1, K, B, H) and an int8/fp8 cache's scales (L, 1, K, B)) copied into
        every row of the cache at slots [start, start + B), marked filled (segment id 1)."""
        out = dict(cache)
        for name, piece in block.items():
            big = cache[name]
            piece = jnp.broadcast_to(piece, piece.shape[:1] + big.shape[1:2] + piece.shape[2:]).astype(big.dtype)
            at = (0, 0, 0, start, 0)[:big.ndim]
            out[name] = from_bits(jax.lax.dynamic_update_slice(as_bits(big), as_bits(piece), at), big.dtype)
        seg = cache["segment_ids"]
        size = next(iter(block.values())).shape[3]
        out["segment_ids"] = jax.lax.dynamic_update_slice(seg, jnp.ones((seg.shape[0], size), seg.dtype), (0, start))
        return self._constrain_cache(out)

    @staticmethod
    def _take_block_impl(cache, start, *, size):
        """Row 0's slots [start, start + size) of every k, v (and scale) entry: one prefix-cache block."""
        return {name: from_bits(jax.lax.dynamic_slice_in_dim(as_bits(x[:, :1]), start, size, axis=3), x.dtype)
                for name, x in cache.items() if name != "segment_ids"}

    # ---------------------------------------------------------------------------------- the decode step
    def _draw(self, logits, keys, steps, live, budget, temperature, top_k, top_p, stop_ids, rule, head):
        """Each live row's next token from its logits (R, V): the rule with key fold_in(key, steps) over the
        ids `head` may draw (`_decodable`). Rows that are not live draw greedily (their token is dropped), so
        a freed slot's settings never ask for the top-k/top-p sort. Returns (tokens (R,) int32, pad_id where
        not live; steps (R,) after the draw; whether each row goes on: live, not a stop id, budget not spent)."""
        logits = jnp.where(jnp.arange(logits.shape[-1]) < self._decodable(head), logits, -jnp.inf)
        keys = jax.vmap(jax.random.fold_in)(keys, steps)
        temperature = jnp.where(live, temperature, 0).astype(temperature.dtype)
        tok = rule(logits, keys, steps, temperature, top_k, top_p).astype(jnp.int32)
        tok = jnp.where(live, tok, self.pad_id)
        steps = steps + live
        return tok, steps, live & ~(jnp.isin(tok, stop_ids) | (steps >= budget))

    def _logprobs(self, logits, tok, head):
        """logits (R, V), drawn tok (R,) -> (logprob (R,), top_ids (R, K), top_logprobs (R, K)) of
        `token_logprobs`. Dead code (removed by the compiler) where the caller does not keep them."""
        lp = token_logprobs(logits, self._decodable(head))
        k = min(TOP_LOGPROBS, lp.shape[-1])
        top_lp, top_ids = jax.lax.top_k(lp, k)
        if k < TOP_LOGPROBS:                                   # a vocabulary smaller than K: pad with -inf
            pad = TOP_LOGPROBS - k
            top_lp = jnp.pad(top_lp, ((0, 0), (0, pad)), constant_values=-jnp.inf)
            top_ids = jnp.pad(top_ids, ((0, 0), (0, pad)))
        return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def _step_impl(self, params, state: DecodeState, keep, *, rule, n_steps: int, logprobs: bool = False,
                   head: str = "text"):
        """Up to n_steps tokens for every active slot (a while_loop that ends early when none is active):
        each iteration writes the slot's drawn token to the cache and draws the next from the logits that
        gives. Returns (state, tokens (R, n_steps) int32, emitted (R, n_steps) bool, lp), tokens/emitted
        replicated; lp: None, or with logprobs (static) the TokenLogprobs arrays (R, n_steps), (R, n_steps, K) x 2
        of each drawn token (and the state's logprob fields follow the last one)."""
        r = state.index.shape[0]
        kk = TOP_LOGPROBS

        def cond(carry):
            i, st, *_ = carry
            return (i < n_steps) & jnp.any(st.active)

        def body(carry):
            i, st, toks, emitted, hist = carry
            live = st.active
            seg = live.astype(jnp.int32)[:, None]          # finished/free slots write an empty slot
            vision = jnp.full((r, 1), head == "vision") if self.vision else None   # new tokens: of `head`
            hidden, cache = self._hidden(params, jnp.where(live, st.token, self.pad_id)[:, None], vision,
                                         st.position[:, None], seg, st.cache, st.index, CacheMode.DECODE)
            logits = self._logits(params, hidden, head)[:, 0]
            tok, steps, going = self._draw(logits, st.keys, st.steps, live, st.budget, st.temperature, st.top_k,
                                           st.top_p, st.stop_ids, rule, head)
            adv = live.astype(jnp.int32)
            st = st._replace(cache=cache, token=jnp.where(live, tok, st.token), index=st.index + adv,
                             position=st.position + adv, steps=steps, active=going)
            toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
            emitted = jax.lax.dynamic_update_slice_in_dim(emitted, live[:, None], i, axis=1)
            if logprobs:
                lp, top_ids, top_lp = self._logprobs(logits, tok, head)
                st = st._replace(logprob=jnp.where(live, lp, st.logprob),
                                 top_ids=jnp.where(live[:, None], top_ids, st.top_ids),
                                 top_logprobs=jnp.where(live[:, None], top_lp, st.top_logprobs))
                hist = tuple(jax.lax.dynamic_update_slice_in_dim(h, x[:, None], i, axis=1)
                             for h, x in zip(hist, (lp, top_ids, top_lp)))
            return i + 1, st, toks, emitted, hist

        state = state._replace(active=state.active & keep)
        hist = ((jnp.zeros((r, n_steps), jnp.float32), jnp.zeros((r, n_steps, kk), jnp.int32),
                 jnp.zeros((r, n_steps, kk), jnp.float32)) if logprobs else ())
        carry = (jnp.int32(0), state, jnp.full((r, n_steps), self.pad_id, jnp.int32),
                 jnp.zeros((r, n_steps), bool), hist)
        _, state, toks, emitted, hist = jax.lax.while_loop(cond, body, carry)
        return state, _replicated(toks), _replicated(emitted), (_replicated(hist) if logprobs else None)

    # ------------------------------------------------------------------------------------------ checks
    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        """PromptTooLongError when prompt_len + max_new_tokens exceeds max_sequence_length (before any
        compile)."""
        limit = self.config.max_sequence_length
        if prompt_len + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = "
                f"{prompt_len + max_new_tokens} exceeds the model's max_sequence_length={limit}; shorten the "
                "prompt, lower the token budget, or raise max_sequence_length (e.g. "
                "--update_llama_config='{\"max_sequence_length\": N}')")

    def padded_length(self, prompt_len: int) -> int:
        """The prompt bucket: see lwm.inference.sampling.bucket_length (multiples of lwm.model.llama.sequence_multiple: sp,
        2 * sp under the zigzag layout; few distinct shapes)."""
        block = max(self.config.scan_query_chunk_size, self.config.scan_key_chunk_size)
        return bucket_length(prompt_len, sequence_multiple(self.config), block)

    @staticmethod
    def mesh_sizes() -> tuple[int, int]:
        return mesh_sizes()

    # --------------------------------------------------------------------------------------- slot API
    def _rows_sampling(self, sampling, seeds, n: int):
        if isinstance(sampling, SamplingConfig) or sampling is None:
            sampling = [sampling or SamplingConfig()] * n
        if len(sampling) != n:
            raise ValueError(f"{len(sampling)} sampling settings for {n} rows; give one, or one per row")
        seeds = [0] * n if seeds is None else ([int(seeds)] * n if np.isscalar(seeds) else list(seeds))
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} rows; give one, or one per row")
        return sampling, seeds

    def _start_impl(self, cache, logits, index, position, budget, temperature, top_k, top_p, seeds, stop_ids, *,
                    rule, head):
        """A decode state whose rows (budget > 0) hold token 0, drawn from their prefill logits (R, V)."""
        keys = jax.vmap(jax.random.PRNGKey)(seeds)
        r = index.shape[0]
        tok, steps, active = self._draw(logits, keys, jnp.zeros((r,), jnp.int32), budget > 0, budget, temperature,
                                        top_k, top_p, stop_ids, rule, head)
        lp, top_ids, top_lp = self._logprobs(logits, tok, head)
        return DecodeState(cache=self._constrain_cache(cache), token=tok, index=index, position=position,
                           steps=steps, budget=budget, active=active, temperature=temperature, top_k=top_k,
                           top_p=top_p, keys=keys, stop_ids=stop_ids, logprob=lp, top_ids=top_ids,
                           top_logprobs=top_lp)

    def _state(self, cache, logits, index, position, budget, sampling, seeds, stop_ids, rule,
               head) -> DecodeState:
        f32, i32 = np.float32, np.int32
        return self._start_jit(cache, logits, np.asarray(index, i32), np.asarray(position, i32),
                               np.asarray(budget, i32), np.asarray([s.temperature for s in sampling], f32),
                               np.asarray([s.top_k for s in sampling], i32),
                               np.asarray([s.top_p for s in sampling], f32), np.asarray(seeds, np.uint32),
                               np.asarray(list(stop_ids) or [-1], i32), rule=rule, head=head)

    def init_state(self, slots: int, cache_length: int, stop_ids: Optional[Sequence[int]] = None,
                   head: Optional[str] = None) -> DecodeState:
        """`slots` free decode slots of `cache_length` cache slots each (a prompt's padded length plus its
        budget must fit). stop_ids: default (eos_id,). head: the head this state's slots sample (give the
        same one to its prefill / insert / step; default the engine's)."""
        head = self._check_head(head)
        data, sp = mesh_sizes()
        if slots % data or cache_length % sp:
            raise ValueError(f"slots={slots} must divide by dp*fsdp={data} and cache_length={cache_length} "
                             f"by sp={sp}")
        cache = init_cache(self.config, slots, cache_length, self.cache_dtype)
        logits = jnp.zeros((slots, self._head_size(head)), jnp.float32)
        stop_ids = (self.eos_id,) if stop_ids is None else stop_ids
        return self._state(cache, logits, [0] * slots, [0] * slots, [0] * slots, [SamplingConfig()] * slots,
                           [0] * slots, stop_ids, _PER_ROW, head)

    # ------------------------------------------------------------------- chunked and prefix-cached prefill
    def prefix_cache(self, budget_bytes: Optional[int] = None, block_size: Optional[int] = None) -> PrefixCache:
        """A PrefixCache for this engine's model and cache dtype (lwm.inference.prefix_cache). budget_bytes:
        default `prefix_cache.default_budget_bytes()` (a quarter of the free device memory); block_size: slots
        per block, default the model's decode_chunk_size, and a multiple of it (so a block is whole decode
        chunks). Raises ValueError (one line naming --prefix_cache_mb / --prefix_cache_block) for a block size
        that is not such a multiple, a budget that holds no block, or a RoPE whose frequencies depend on the
        prompt's length (`check_chunking`)."""
        from lwm.inference import prefix_cache as pc

        self.check_chunking(None, True)
        chunk = self.config.decode_chunk_size
        block = chunk if block_size is None else int(block_size)
        if block < 1 or block % chunk:
            raise ValueError(f"--prefix_cache_block={block}: must be a positive multiple of the model's "
                             f"decode_chunk_size={chunk}")
        budget = pc.default_budget_bytes() if budget_bytes is None else int(budget_bytes)
        return PrefixCache(block, budget, self.block_bytes(block))

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one prefix-cache block of `block_size` slots: k and v (L, K, B, H) in the cache dtype, plus
        an int8/fp8 cache's two float32 scales per token and kv head."""
        c = self.config
        n = c.num_hidden_layers * c.kv_heads * block_size
        scales = 2 * n * 4 if jnp.dtype(self.cache_dtype).itemsize == 1 else 0
        return 2 * n * c.head_dim * jnp.dtype(self.cache_dtype).itemsize + scales

    def check_chunking(self, chunk: Optional[int], prefix_cache: bool = False) -> None:
        """One-line ValueError, before anything compiles, for a prefill chunk that is not a positive multiple of
        the mesh's sp (--prefill_chunk), or chunking / a prefix cache with rope_scaling_type 'dynamic' or
        'longrope', whose frequencies depend on the whole prompt's length (a chunk, or a cached block, would
        be rotated for another length than a whole prefill rotates it)."""
        kind = self.config.rope_scaling_type
        if (chunk is not None or prefix_cache) and kind in ("dynamic", "longrope"):
            what = "--prefill_chunk" if chunk is not None else "--prefix_cache_mb"
            raise ValueError(f"{what}: rope_scaling_type={kind!r} rotates keys by the prompt's whole length, so "
                             "a chunk or a cached block would differ from a whole prefill; use a whole prefill "
                             "(--prefill_chunk=0 --prefix_cache_mb=0) or a length-independent RoPE")
        if chunk is not None:
            _, sp = mesh_sizes()
            if chunk < 1 or chunk % sp:
                raise ValueError(f"--prefill_chunk={chunk}: must be a positive multiple of the mesh's sp={sp}")

    def start_prefill(self, prompt: Sequence[int], vision: Optional[Sequence[bool]] = None,
                      head: Optional[str] = None, *, prefix_cache: Optional[PrefixCache] = None,
                      chunk: Optional[int] = None) -> "ChunkedPrefill":
        """A chunked prefill run one chunk per `ChunkedPrefill.step()` call (a server interleaves them with
        decode steps); `prefill(..., chunk=)` runs them all. The prefix-cache blocks are copied in here.
        Raises ValueError (`check_chunking`, an empty prompt) or PromptTooLongError."""
        head = self._check_head(head)
        self.check_chunking(chunk, prefix_cache is not None)
        if not len(prompt):
            raise ValueError("prefill: the prompt is empty; every prompt needs at least one token (e.g. BOS)")
        self.check_length(len(prompt), 0)
        return ChunkedPrefill(self, list(prompt), vision, head, prefix_cache, chunk)

    def prefill(self, prompt: Sequence[int], vision: Optional[Sequence[bool]] = None,
                head: Optional[str] = None, *, prefix_cache: Optional[PrefixCache] = None,
                chunk: Optional[int] = None) -> Prefix:
        """Run one prompt; returns its Prefix with `head`'s logits (one cache row per data shard, `padded_length`
        slots).

        Default: one whole prefill, the prompt left-padded to its bucket. With `chunk` (tokens, a multiple of
        sp) or a `prefix_cache`, the prompt sits at slots [0, n) instead and is prefilled in chunks of `chunk`
        tokens (default `default_prefill_chunk`: 2048, rounded to whole blocks; whichever the chunk, the
        bucket (`padded_length`) of the tokens the prefix cache does not hold when that is less), each
        attending to the cache so far
        and causally to itself through the decode pass (`lwm.attention.cached_attention`: the cache's filled
        chunks read in a loop, sharded over sp with one softmax merge), so the working memory is one chunk's,
        not the prompt's. With a prefix cache, the longest run of its blocks that starts the prompt is copied
        in first (at most n - 1 tokens: the last token's logits are computed) and only the rest is
        prefilled; the new whole blocks are then stored. Equal to the whole prefill up to float rounding
        (tests/inference/test_prefix_cache.py). Raises ValueError from `check_chunking`."""
        head = self._check_head(head)
        if prefix_cache is not None or chunk is not None:
            return self.start_prefill(prompt, vision, head, prefix_cache=prefix_cache, chunk=chunk).run()
        data, _ = mesh_sizes()
        t = self.padded_length(len(prompt))
        logits, cache = self.prefill_batch([prompt] * data, t, t,        # one row per data shard
                                           None if vision is None else [vision] * data, head=head)
        return Prefix(cache=cache, logits=logits, length=t, position=len(prompt))

    def _insert_impl(self, state: DecodeState, cache, logits, slots, length, position, budget, temperature,
                     top_k, top_p, seeds, drawn, *, rule, head):
        """Prefix rows r with slots[r] >= 0 written into those decode slots (rows with slot -1 are left out),
        and their first tokens drawn, as draw number drawn[r] (0 for a new prompt). cache: k, v (L, P, K, T,
        H), segment_ids (P, T); logits (P, V); the rest (P,). One dynamic_update_slice per row (unrolled: P is a ladder size), in place on the donated
        state."""
        n_rows, s_len = state.index.shape[0], state.cache["segment_ids"].shape[1]
        valid = slots >= 0
        seg = jnp.zeros((cache["segment_ids"].shape[0], s_len), jnp.int32)
        seg = jax.lax.dynamic_update_slice(seg, cache["segment_ids"].astype(jnp.int32), (0, 0))
        new_cache = dict(state.cache)
        for name, big in state.cache.items():           # k, v (and an int8/fp8 cache's scales), segment_ids
            axis, rows = CACHE_ROW_AXIS[name], seg if name == "segment_ids" else cache[name]
            for r in range(rows.shape[axis]):
                row = jax.lax.index_in_dim(rows, r, axis, keepdims=True).astype(big.dtype)
                start = [0] * big.ndim
                start[axis] = jnp.maximum(slots[r], 0)
                old = jax.lax.dynamic_slice(big, start, row.shape)
                big = jax.lax.dynamic_update_slice(big, jnp.where(valid[r], row, old), start)
            new_cache[name] = big
        keys = jax.vmap(jax.random.PRNGKey)(seeds)
        tok, steps, active = self._draw(logits, keys, drawn, valid & (budget > drawn), budget, temperature, top_k,
                                        top_p, state.stop_ids, rule, head)
        lp, top_ids, top_lp = self._logprobs(logits, tok, head)
        at = jnp.where(valid, slots, n_rows)                 # out of range: dropped
        put = lambda arr, values: arr.at[at].set(values.astype(arr.dtype), mode="drop")
        return state._replace(
            cache=self._constrain_cache(new_cache), token=put(state.token, tok),
            index=put(state.index, jnp.full(slots.shape, length)), position=put(state.position, position),
            steps=put(state.steps, steps), budget=put(state.budget, budget), active=put(state.active, active),
            temperature=put(state.temperature, temperature), top_k=put(state.top_k, top_k),
            top_p=put(state.top_p, top_p), keys=put(state.keys, keys), logprob=put(state.logprob, lp),
            top_ids=put(state.top_ids, top_ids), top_logprobs=put(state.top_logprobs, top_lp))

    def insert(self, prefix: Prefix, state: DecodeState, slot: Union[int, Sequence[int]], *,
               max_new_tokens: Union[int, Sequence[int]], sampling: Union[SamplingConfig, Sequence[SamplingConfig]] =
               SamplingConfig(), seed: Union[int, Sequence[int]] = 0,
               drawn: Union[int, Sequence[int]] = 0, head: Optional[str] = None) -> DecodeState:
        """Put prefilled prompts into decode slots (whatever they held is dropped) and draw each one's first
        token from its prefix logits (with its sampling settings and seed, as a step draws the next ones): read
        them with `drawn(state)` before the next `step`, which writes them to the cache and draws the second.

        drawn: tokens a row already drew before (one for all rows, or one per row; default 0): the row
        continues a generation whose state was lost, its prompt ending with those tokens. Its next draw is draw
        number `drawn` (the same key fold_in(key, drawn) the lost state would have used, so the continuation
        equals the uninterrupted run) and max_new_tokens still counts the whole generation.

        slot: an int (the prefix's first row goes there; `prefill` gives one row per data shard, all the same
        prompt), or one slot per prefix row (P of them; -1 leaves a row out), so a batched prefill
        (`prefill_batch`) is inserted in one call. max_new_tokens, sampling, seed: one for all rows, or one per
        row. prefix.position: an int, or one per row. head: the state's (default the engine's). Raises
        ValueError (a slot out of range or used twice, a row's prefix + budget over the state's cache_length,
        prefix logits of another head's size) or PromptTooLongError."""
        head = self._check_head(head)
        if prefix.logits.shape[-1] != self._head_size(head):
            raise ValueError(f"insert: the prefix has logits over {prefix.logits.shape[-1]} ids, head={head!r} "
                             f"has {self._head_size(head)}; prefill with the same head")
        n_rows, s = state.index.shape[0], state.cache["segment_ids"].shape[1]
        p = prefix.logits.shape[0]
        if np.isscalar(slot) and not 0 <= slot < n_rows:
            raise ValueError(f"slot={slot} is not in [0, {n_rows})")
        slots = [int(slot)] + [-1] * (p - 1) if np.isscalar(slot) else [int(x) for x in slot]
        if len(slots) != p:
            raise ValueError(f"{len(slots)} slots for a prefix of {p} rows; give one slot, or one per row")
        used = [x for x in slots if x >= 0]
        for x in used:
            if x >= n_rows:
                raise ValueError(f"slot={x} is not in [0, {n_rows}) (-1 leaves a prefix row out)")
        if len(set(used)) != len(used):
            raise ValueError(f"slots {used}: a slot may take one prefix row only")
        per_row = lambda v: [v] * p if np.isscalar(v) or isinstance(v, SamplingConfig) else list(v)
        budgets, samplings, seeds = per_row(max_new_tokens), per_row(sampling), per_row(seed)
        positions, done = per_row(prefix.position), per_row(drawn)
        if not len(budgets) == len(samplings) == len(seeds) == len(positions) == len(done) == p:
            raise ValueError(f"max_new_tokens, sampling, seed, drawn and prefix.position: give one, or one per "
                             f"prefix row ({p})")
        for r, x in enumerate(slots):
            if x < 0:
                continue
            if not 0 <= done[r] <= budgets[r]:
                raise ValueError(f"drawn={done[r]} must be in [0, max_new_tokens={budgets[r]}]")
            if prefix.length + budgets[r] - done[r] > s:
                raise ValueError(f"a prefix of {prefix.length} slots + max_new_tokens={budgets[r] - done[r]} does "
                                 f"not fit the state's cache_length={s}")
            self.check_length(positions[r], budgets[r] - done[r])
        f32, i32 = np.float32, np.int32
        return self._insert_jit(state, prefix.cache, prefix.logits, np.asarray(slots, i32), i32(prefix.length),
                                np.asarray(positions, i32), np.asarray(budgets, i32),
                                np.asarray([x.temperature for x in samplings], f32),
                                np.asarray([x.top_k for x in samplings], i32),
                                np.asarray([x.top_p for x in samplings], f32), np.asarray(seeds, np.uint32),
                                np.asarray(done, i32), rule=_PER_ROW, head=head)

    def step(self, state: DecodeState, n_steps: int = 1, rule: Optional[TokenRule] = None,
             keep: Optional[np.ndarray] = None, logprobs: bool = False, head: Optional[str] = None):
        """Up to n_steps tokens for every active slot. Returns (state, tokens (R, n) numpy int32, emitted
        (R, n) numpy bool: whether slot r produced tokens[r, i]). keep: (R,) bool, False cancels a slot.
        logprobs=True (a second compiled step, shared by every request that asks; the default step computes
        none) returns a fourth value, TokenLogprobs of each drawn token: (R, n), (R, n, K), (R, n, K),
        K = TOP_LOGPROBS (callers slice the k they want). rule: default per-row sampling with each slot's
        settings from the state (the top-k/top-p sort only in steps where a live slot uses it). head: the
        state's (default the engine's)."""
        rule = _PER_ROW if rule is None else rule
        keep = np.ones(state.index.shape, bool) if keep is None else np.asarray(keep, bool)
        state, toks, emitted, lp = self._step_jit(self.params, state, keep, rule=rule, n_steps=int(n_steps),
                                                  logprobs=bool(logprobs), head=self._check_head(head))
        if not logprobs:
            return state, host_array(toks), host_array(emitted)
        return state, host_array(toks), host_array(emitted), TokenLogprobs(*(host_array(x) for x in lp))

    @staticmethod
    def _move_impl(dst: DecodeState, src: DecodeState, src_slot, dst_slot):
        def row(big, small, axis):  # small's row src_slot written at dst_slot of big, along axis
            piece = jax.lax.dynamic_index_in_dim(small, src_slot, axis, keepdims=True).astype(big.dtype)
            start = [0] * big.ndim
            start[axis] = dst_slot
            return jax.lax.dynamic_update_slice(big, piece, start)

        cache = {name: row(dst.cache[name], src.cache[name], CACHE_ROW_AXIS[name]) for name in dst.cache}
        rest = {f: row(getattr(dst, f), getattr(src, f), 0) for f in DecodeState._fields
                if f not in ("cache", "stop_ids")}
        return dst._replace(cache=cache, **rest)

    def move(self, src: DecodeState, src_slot: int, dst: DecodeState,
             dst_slot: int) -> tuple[DecodeState, DecodeState]:
        """Move a generating slot from state `src` to slot `dst_slot` of state `dst`: its cache rows, drawn
        token, fill, position, budget, sampling settings, key and log-probabilities (everything per slot is in
        the state), so it goes on exactly as it would have. The states must have the same cache length, stop
        ids and head. Returns (src with the slot freed, dst). Raises ValueError naming the mismatch."""
        if src.cache["k"].shape[3] != dst.cache["k"].shape[3]:
            raise ValueError(f"move: cache lengths differ ({src.cache['k'].shape[3]} vs {dst.cache['k'].shape[3]})")
        for name, slot, st in (("src_slot", src_slot, src), ("dst_slot", dst_slot, dst)):
            if not 0 <= slot < st.index.shape[0]:
                raise ValueError(f"move: {name}={slot} is not in [0, {st.index.shape[0]})")
        dst = self._move_jit(dst, src, np.int32(src_slot), np.int32(dst_slot))
        return self.free(src, src_slot), dst

    def free(self, state: DecodeState, slot: Union[int, Sequence[int]]) -> DecodeState:
        """Stop slot `slot` (or each of several, with one array op); they can take a new `insert`."""
        slots = [int(slot)] if np.isscalar(slot) else [int(x) for x in slot]
        mask = np.zeros(state.active.shape, bool)
        for x in slots:
            if not 0 <= x < mask.shape[0]:
                raise ValueError(f"slot={x} is not in [0, {mask.shape[0]})")
            mask[x] = True
        return state._replace(active=state.active & ~mask)

    @staticmethod
    def active(state: DecodeState) -> np.ndarray:
        return host_array(_replicated_fn(state.active))

    @staticmethod
    def drawn(state: DecodeState, logprobs: bool = False) -> tuple:
        """(tokens (R,), active (R,)) numpy: each slot's last drawn token (after `insert`, its first token,
        which no `step` reports) and whether the slot goes on (False: a stop id, the budget spent, or free).
        logprobs=True adds a third value, that token's TokenLogprobs ((R,), (R, K), (R, K))."""
        if logprobs:
            token, active, *lp = _replicated_fn((state.token, state.active, state.logprob, state.top_ids,
                                                 state.top_logprobs))
            return host_array(token), host_array(active), TokenLogprobs(*(host_array(x) for x in lp))
        token, active = _replicated_fn((state.token, state.active))
        return host_array(token), host_array(active)

    # --------------------------------------------------------------------------------------- scoring
    def _score_impl(self, params, ids, vision, seg, pos, *, head):
        """Left-padded prompts (R, T) through the model once, without a cache (the training forward, every
        position's logits): returns (logprob (R, T-1) of ids[:, t+1] given ids[:, :t+1], top_ids (R, T-1, K),
        top_logprobs (R, T-1, K)), `token_logprobs` of the logits (R, T, V) at positions 0..T-2."""
        hidden = self._hidden(params, ids, vision, pos, seg, None, None, None)
        lp = token_logprobs(self._logits(params, hidden[:, :-1], head), self._decodable(head))  # (R, T-1, V)
        nxt = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        k = min(TOP_LOGPROBS, lp.shape[-1])
        top_lp, top_ids = jax.lax.top_k(lp, k)
        if k < TOP_LOGPROBS:
            pad = ((0, 0), (0, 0), (0, TOP_LOGPROBS - k))
            top_lp, top_ids = jnp.pad(top_lp, pad, constant_values=-jnp.inf), jnp.pad(top_ids, pad)
        return _replicated(nxt), _replicated(top_ids.astype(jnp.int32)), _replicated(top_lp)

    def score(self, prompts: Sequence[Sequence[int]], vision: Optional[Sequence] = None,
              padded_length: Optional[int] = None, head: Optional[str] = None) -> list:
        """Prompt log-probabilities: for each prompt p (P ids), TokenLogprobs of (P-1,), (P-1, K), (P-1, K):
        entry t is token p[t+1] given p[:t+1] (`token_logprobs`: the model's distribution over decodable
        ids) and the K most likely ids there. This is the log-likelihood scorer (lm-evaluation-harness's
        `loglikelihood`: sum the entries of the continuation's tokens) and what the server's `echo` returns.
        One forward over all positions (logits (R, T, V) float32 are materialised: R * T * V * 4 bytes), the
        prompts batched left-padded to one bucket (`padded_length`, one compile per bucket and row count;
        rows padded to whole dp*fsdp shards). Raises ValueError for an empty prompt, PromptTooLongError over
        max_sequence_length. head: whose logits score (default the engine's)."""
        if not prompts:
            return []
        head = self._check_head(head)
        for p in prompts:
            self.check_length(len(p), 0)
        data, sp = mesh_sizes()
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        t = padded_length or self.padded_length(longest)
        rows = list(prompts) + [prompts[0]] * (-n % data)
        ids, seg, pos = left_pad(rows, t, self.pad_id)
        vis = self._vision_rows(None if vision is None else list(vision) + [vision[0]] * (len(rows) - n), rows, t,
                                head)
        nxt, top_ids, top_lp = (host_array(x) for x in self._score_jit(self.params, ids, vis, seg, pos, head=head))
        out = []
        for r, p in enumerate(prompts):                  # row r's real tokens sit at slots [t - len(p), t)
            a = t - len(p)
            out.append(TokenLogprobs(nxt[r, a:], top_ids[r, a:], top_lp[r, a:]))
        return out

    # -------------------------------------------------------------------------------- batched generate
    def _vision_rows(self, vision, prompts, t: int, head: str):
        """Left-padded vision masks (R, T) bool, or None for a text model; without masks every id is of `head`."""
        if not self.vision:
            if vision is not None:
                raise ValueError("vision masks given to a text-only model")
            return None
        out = np.zeros((len(prompts), t), bool)
        if vision is None:
            out[:] = head == "vision"
            return out
        if len(vision) != len(prompts):
            raise ValueError(f"{len(vision)} vision masks for {len(prompts)} prompts")
        for r, (p, m) in enumerate(zip(prompts, vision)):
            if m is None:
                continue
            if len(m) != len(p):
                raise ValueError(f"prompt {r}: vision mask of {len(m)} entries for {len(p)} tokens")
            out[r, t - len(p):] = np.asarray(m, bool)
        return out

    def prefill_batch(self, prompts: Sequence[Sequence[int]], padded_length: int, cache_length: int,
                      vision: Optional[Sequence] = None, head: Optional[str] = None):
        """Left-padded prompts (lwm.inference.sampling.left_pad) through the model at once: returns (logits (R, V) of
        each row's next token under `head` (default the engine's), cache of cache_length slots with
        [0, padded_length) filled). The number of rows must divide by the mesh's dp*fsdp."""
        head = self._check_head(head)
        ids, seg, pos = left_pad(prompts, padded_length, self.pad_id)
        vis = self._vision_rows(vision, prompts, padded_length, head)
        return self._prefill_jit(self.params, ids, vis, seg, pos, cache_len=cache_length, head=head)

    def lower_prefill(self, ids, cache_length: int):
        """The prefill (`prefill_batch`) lowered for ids (R, T) int32 (arrays or jax.ShapeDtypeStruct, also as
        this engine's params), nothing run: for memory_analysis (lwm.memory). Text models only."""
        if self.vision:
            raise ValueError("Engine.lower_prefill: text models only (a vision prompt needs its vision mask)")
        return self._prefill_jit.lower(self.params, ids, None, ids, ids, cache_len=cache_length, head="text")

    def lower_prefill_chunk(self, rows: int, chunk: int, cache_length: int):
        """One chunk of the chunked prefill (`start_prefill`) lowered for ids (rows, chunk) against a cache of
        cache_length slots, nothing run: for memory_analysis (its temporaries are one chunk's; the cache is an
        argument, donated). Text models only."""
        if self.vision:
            raise ValueError("Engine.lower_prefill_chunk: text models only (a vision prompt needs its vision mask)")
        ids = jax.ShapeDtypeStruct((rows, chunk), jnp.int32)
        cache = jax.eval_shape(lambda: init_cache(self.config, rows, cache_length, self.cache_dtype))
        return self._chunk_jit.lower(self.params, cache, ids, None, ids, ids, np.int32(0), np.int32(0), head="text")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]], *,
                 sampling: Union[SamplingConfig, Sequence[SamplingConfig], None] = None,
                 seeds: Union[int, Sequence[int], None] = None, stop_ids: Optional[Sequence[int]] = None,
                 stream: Optional[Callable] = None, vision: Optional[Sequence] = None,
                 rule: Optional[TokenRule] = None, padded_length: Optional[int] = None,
                 steps_per_call: Optional[int] = None, head: Optional[str] = None,
                 prefix_cache: Optional[PrefixCache] = None, prefill_chunk: Optional[int] = None) -> GenerateResult:
        """Batched generation (module docstring (a)). stop_ids default (eos_id,); steps_per_call: decode
        steps per compiled call (default 1 with a stream callback, else 16); head: the head sampled, 'text' or
        'vision' (default the engine's). prefix_cache / prefill_chunk: each prompt is prefilled alone by
        `prefill(..., prefix_cache=, chunk=)` (its cached prefix reused, the rest in chunks) and inserted into
        the batch's decode state; `stats['cached_tokens']` counts the reused tokens. Not with a batch-level
        `rule` (it draws from every row's logits at once): ValueError."""
        if not prompts:
            return GenerateResult([], [], {})
        head = self._check_head(head)
        n = len(prompts)
        budgets = [int(max_new_tokens)] * n if np.isscalar(max_new_tokens) else [int(b) for b in max_new_tokens]
        if len(budgets) != n or min(budgets) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: give one value >= 1, or one per prompt")
        for r, p in enumerate(prompts):
            self.check_length(len(p), budgets[r])
        sampling, seeds = self._rows_sampling(sampling, seeds, n)
        data, sp = mesh_sizes()
        longest = max(len(p) for p in prompts)
        t = padded_length or self.padded_length(longest)
        if t % sp or t < longest:
            raise ValueError(f"padded_length={t} must hold the longest prompt ({longest}) and divide by sp={sp}")
        extra = -n % data                                   # whole batch shards; extra rows are dropped
        rows = list(prompts) + [prompts[0]] * extra
        cache_len = t + sp * math.ceil(max(budgets) / sp)
        stop_ids = (self.eos_id,) if stop_ids is None else tuple(stop_ids)
        rule = _PER_ROW if rule is None else rule
        k = steps_per_call or (1 if stream is not None else 16)

        cached = 0
        t0 = time.perf_counter()
        if prefix_cache is not None or prefill_chunk is not None:
            if rule is not _PER_ROW:
                raise ValueError("generate: prefix_cache / prefill_chunk prefill each prompt alone, and a "
                                 "batch-level token rule draws from every row's logits at once; drop one")
            self.check_chunking(prefill_chunk, prefix_cache is not None)
            # Each prefill's cache has its own bucket (padded_length under the mesh), which a caller's
            # padded_length (a valid one, e.g. taken outside the mesh) may undercut: room for the largest.
            cache_len = max(t, self.padded_length(longest)) + sp * math.ceil(max(budgets) / sp)
            state = self.init_state(len(rows), cache_len, stop_ids, head)
            for r in range(n):
                pre = self.prefill(prompts[r], None if vision is None else vision[r], head,
                                   prefix_cache=prefix_cache, chunk=prefill_chunk)
                state = self.insert(pre, state, slot=r, max_new_tokens=budgets[r], sampling=sampling[r],
                                    seed=seeds[r], head=head)
                cached += pre.cached
            jax.block_until_ready(state.token)
            t1 = time.perf_counter()
        else:
            logits, cache = self.prefill_batch(rows, t, cache_len,
                                               None if vision is None else list(vision) + [vision[0]] * extra, head)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            state = self._state(cache, logits, [t] * len(rows), [len(p) for p in rows], budgets + [0] * extra,
                                sampling + [sampling[0]] * extra, seeds + [0] * extra, stop_ids, rule, head)
        out = [[] for _ in range(n)]
        finish = [None] * n
        keep = np.ones(len(rows), bool)
        step = 0

        def take(toks, emitted) -> None:
            """Token `step` of every row: toks, emitted (rows,)."""
            nonlocal step
            new = [int(toks[r]) if emitted[r] and keep[r] else None for r in range(n)]
            for r, tok in enumerate(new):
                if tok is None or finish[r] is not None:
                    continue
                if tok in stop_ids:
                    finish[r] = "stop"
                else:
                    out[r].append(tok)
                    if len(out[r]) >= budgets[r]:
                        finish[r] = "length"
            if stream is not None:
                cancel = stream(step, new)
                for r in cancel or ():
                    if not (isinstance(r, (int, np.integer)) and 0 <= r < n):
                        raise ValueError(f"stream callback returned {cancel!r}; it may return only row "
                                         f"indices in [0, {n}) to cancel (or None)")
                    if finish[r] is None:
                        finish[r] = "cancelled"
                    keep[r] = False
            step += 1

        first, _ = self.drawn(state)                        # token 0, drawn from the prefill logits
        t_first = time.perf_counter()
        take(first, np.arange(len(rows)) < n)
        while not all(f is not None for f in finish):
            state, toks, emitted, _ = self._step_jit(self.params, state, keep, rule=rule, n_steps=k, head=head)
            toks, emitted = host_array(toks), host_array(emitted)
            if not emitted.any():
                break
            for i in range(k):
                if not emitted[:, i].any():
                    break
                take(toks[:, i], emitted[:, i])
        t2 = time.perf_counter()
        finish = [f or "length" for f in finish]
        self.last_stats = dict(prefill_s=t1 - t0, time_to_first_token_s=t_first - t0, decode_s=t2 - t_first,
                               prompt_tokens=int(sum(map(len, prompts))), new_tokens=int(sum(map(len, out))),
                               steps=step, batch=len(rows), padded_length=t, cache_length=cache_len,
                               cached_tokens=cached)
        return GenerateResult(out, finish, dict(self.last_stats))


class ChunkedPrefill:
    """One prompt's chunked, prefix-cached prefill in progress (`Engine.start_prefill`; the rule is in
    `Engine.prefill`'s docstring). `cached`: prompt tokens copied from the prefix cache; `done`; `remaining`:
    tokens still to prefill; `step()` prefills the next chunk (of `chunk` tokens; the last may be shorter);
    `result()` (once done) stores the prompt's new whole blocks in the prefix cache and returns its Prefix."""

    def __init__(self, engine: Engine, prompt: list, vision, head: str, prefix_cache: Optional[PrefixCache],
                 chunk: Optional[int]):
        self.engine, self.prompt, self.head, self.prefix_cache = engine, prompt, head, prefix_cache
        self.data, sp = mesh_sizes()
        n = len(prompt)
        self.ids = np.asarray(prompt, np.int32)
        mask = engine._vision_rows(None if vision is None else [vision], [prompt], n, head)
        self.mask = None if mask is None else mask[0]
        self.cache = engine._empty_jit(rows=self.data, length=engine.padded_length(n))
        self.keys, self.cached = [], 0
        if prefix_cache is not None:
            block = prefix_cache.block_size
            self.keys = prefix_cache.keys(self.ids, self.mask)
            usable = (n - 1) // block                       # leave one token at least: its logits
            for j, blk in enumerate(prefix_cache.match(self.keys[:usable])):
                self.cache = engine._put_block_jit(self.cache, blk, np.int32(j * block))
                self.cached = (j + 1) * block
        if chunk is None:
            chunk = default_prefill_chunk(None if prefix_cache is None else prefix_cache.block_size)
        # A rest shorter than the chunk runs as one chunk of its own bucket (a 40-token turn 2 after a long turn 1:
        # not a 2048-wide chunk; one compile per bucket, as the whole prefill has).
        chunk = min(int(chunk), engine.padded_length(n - self.cached))
        self.chunk = sp * math.ceil(chunk / sp)
        self.pos, self.logits = self.cached, None

    @property
    def done(self) -> bool:
        return self.pos >= len(self.prompt)

    @property
    def remaining(self) -> int:
        return max(0, len(self.prompt) - self.pos)

    def step(self) -> None:
        """Prefill the next chunk: ids (R, C) at slots [pos, pos + C), right-padded (segment id 0) past the
        prompt's end."""
        eng, c, start = self.engine, self.chunk, self.pos
        end = min(start + c, len(self.prompt))
        ids = np.full((self.data, c), eng.pad_id, np.int32)
        ids[:, :end - start] = self.ids[start:end]
        seg = np.zeros((self.data, c), np.int32)
        seg[:, :end - start] = 1
        pos = np.broadcast_to(np.arange(start, start + c, dtype=np.int32), (self.data, c))
        vis = None
        if self.mask is not None:
            vis = np.zeros((self.data, c), bool)
            vis[:, :end - start] = self.mask[start:end]
        self.logits, self.cache = eng._chunk_jit(eng.params, self.cache, ids, vis, seg, pos, np.int32(start),
                                                 np.int32(end - 1 - start), head=self.head)
        self.pos = end

    def result(self) -> Prefix:
        if not self.done:
            raise RuntimeError(f"ChunkedPrefill.result: {self.remaining} tokens are not prefilled yet")
        pc = self.prefix_cache
        if pc is not None:
            for j in range(self.cached // pc.block_size, len(self.keys)):
                if self.keys[j] not in pc:
                    pc.put(self.keys[j], self.engine._take_block_jit(self.cache, np.int32(j * pc.block_size),
                                                                     size=pc.block_size))
        n = len(self.prompt)
        return Prefix(cache=self.cache, logits=self.logits, length=n, position=n, cached=self.cached)

    def run(self) -> Prefix:
        """Every remaining chunk, then `result()`."""
        while not self.done:
            self.step()
        return self.result()


@jax.jit
def _replicated_fn(x):
    return _replicated(x)


def uses_filters(temperature, top_k, top_p) -> jax.Array:
    """(R,) each -> (R,) bool: the rows whose draw needs the top-k/top-p sort (sampled, with a filter on)."""
    return (temperature > 0) & ((top_k > 0) | (top_p < 1.0))


@dataclasses.dataclass(frozen=True)
class _PerRow:
    """The default rule (hashable): per-row sampling, the top-k/top-p sort chosen at run time from the rows'
    own settings (`lax.cond`: only the branch taken runs), so one compiled step serves greedy, plain and
    filtered slots, and a step without filtered rows costs no sort. Rows that need no filter draw the same
    token either way (sample_rows' filters leave them unchanged)."""

    def __call__(self, logits, keys, steps, temperature, top_k, top_p):
        return jax.lax.cond(
            jnp.any(uses_filters(temperature, top_k, top_p)),
            lambda: per_row_sampling(logits, keys, steps, temperature, top_k, top_p, filters=True),
            lambda: per_row_sampling(logits, keys, steps, temperature, top_k, top_p, filters=False))


_PER_ROW = _PerRow()
