"""Vision pieces of inference shared by the vision entry points and the server: the vision-id layout of a
prompt's frames (`vision_tokens`), the frame sampling settings and token rule (`FrameSampling`, `FrameRule`,
`guided_logits`), text-to-frames generation over the engine (`generate_frames`) with its prompts
(`generation_prompts`), the answer to a question about frames (`answer`), several questions about one image or
video as one conversation (`VisionChat`, its frames encoded once by `CodesCache`, their KV blocks prefilled once
through the prefix cache), and the clock of the seconds JAX spends compiling inside a call (`CompileClock`), so
that speeds are reported without them.

Used by lwm.vision_chat, lwm.vision_generation and lwm.serve. Letters: B prompts, R rows (2B with guidance),
T padded prompt length, W vision vocabulary, F tokens per frame (h*w + 1).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwm.text.chat_template import Prompt, user_turn_ids, vision_chat_prompt, vision_generation_prompts
from lwm.inference.engine import Engine, mesh_sizes, seed_of
from lwm.inference.runtime import check_budget
from lwm.inference.sampling import SamplingConfig, sample_rows
from lwm.model.vision_llama import END_OF_FRAME, END_OF_VISION, NUM_VISION_CODES, VisionLLaMAForCausalLM


# jax.monitoring events that every jit compile records (jax._src.dispatch / pxla / compiler): tracing to a jaxpr,
# lowering it to MLIR, and the backend (XLA) compile. A persistent-cache hit records none of the last.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """`with CompileClock() as clock: ...` -> clock.seconds, the seconds JAX spent tracing, lowering and compiling
    (COMPILE_EVENTS) while the block ran, measured by JAX itself through jax.monitoring. The listener is
    process-wide: compiles of other threads in that time count too (the command-line front-ends run one)."""

    def __enter__(self) -> "CompileClock":
        self.seconds, self.compiles = 0.0, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.compiles += event == COMPILE_EVENTS[-1]

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def speed_stats(new_tokens: int, generate_s: float, compile_s: float) -> dict:
    """{compile_s, run_s = generate_s - compile_s, tokens_per_s = new_tokens / run_s}: the speed without
    compiling (seconds; run_s floored at 1 microsecond)."""
    run_s = max(generate_s - compile_s, 1e-6)
    return dict(compile_s=compile_s, run_s=run_s, tokens_per_s=new_tokens / run_s)


def vision_tokens(codes: np.ndarray) -> np.ndarray:
    """Codes (T, h, w) -> vision ids (T * (h*w + 1),): each frame's codes row by row, then END_OF_FRAME,
    END_OF_VISION closing the last frame. E.g. two 1x2 frames [[a, b]], [[c, d]] -> a b 8192 c d 8193."""
    codes = np.asarray(codes, np.int32)
    t = codes.shape[0]
    ends = np.full((t, 1), END_OF_FRAME, np.int32)
    ends[-1] = END_OF_VISION
    return np.concatenate([codes.reshape(t, -1), ends], axis=1).reshape(-1)


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """temperature 0 = greedy; top_k 0 = every code; cfg_scale: guidance strength s (s = 1 is the
    conditional distribution itself, so the entry point then runs no unconditional rows)."""
    temperature: float = 1.0
    top_k: int = 0
    cfg_scale: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = all codes)")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale={self.cfg_scale}: must be finite")


def guided_logits(logits: jax.Array, cfg_scale: float) -> jax.Array:
    """(2B, W) rows [cond; uncond] -> (B, W) = uncond + s * (cond - uncond), written as
    cond + (s - 1) * (cond - uncond) so that s = 1 gives the conditional logits exactly."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return cond + (cfg_scale - 1.0) * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class FrameRule:
    """The engine's token rule for frames (`lwm.inference.engine.TokenRule`): with `guided`, rows are
    [conditional; unconditional] halves whose logits are mixed (`guided_logits`) and whose one drawn code
    is fed to both; codes are drawn among ids [0, num_codes) with the rows' temperature / top-k; every
    frame's last token (step % tokens_per_frame == tokens_per_frame - 1) is END_OF_FRAME, forced."""
    tokens_per_frame: int
    num_codes: int
    cfg_scale: float
    guided: bool

    def __call__(self, logits, keys, steps, temperature, top_k, top_p):      # (R, W) -> (R,)
        b = logits.shape[0] // 2 if self.guided else logits.shape[0]
        if self.guided:
            logits = guided_logits(logits, self.cfg_scale)
        tok = sample_rows(logits[:, :self.num_codes], keys[:b], temperature[:b], top_k[:b], top_p[:b],
                          filters=True)
        tok = jnp.where((steps[:b] + 1) % self.tokens_per_frame == 0, END_OF_FRAME, tok)
        return jnp.concatenate([tok, tok]) if self.guided else tok


def generate_frames(model: Optional[VisionLLaMAForCausalLM], params, cond: Sequence[Prompt],
                    uncond: Optional[Sequence[Prompt]], *, n_frames: int, tokens_per_frame: int,
                    sampling: FrameSampling, rng, pad_id: int, num_codes: int = NUM_VISION_CODES,
                    stats: Optional[dict] = None, cache_dtype=None, engine: Optional[Engine] = None) -> np.ndarray:
    """Draw `n_frames` frames after each conditional prompt: with classifier-free guidance (scale
    sampling.cfg_scale) against `uncond` (one per cond prompt), or plain sampling when `uncond` is None,
    through the generation engine with a `FrameRule`, sampling its vision head (`head='vision'` of the call,
    whatever the model config's sample_mode says).
    rng: a PRNG key, or an int seed; row r draws with seed `seed_of(rng)` + r (the unconditional rows' draws
    are unused). engine: the `Engine` to run on (then model and params may be None and cache_dtype does not
    apply), so that its compiled calls serve several callers (the server passes its one engine, the same
    that answers its text requests); default a new one over (model, params) per call.

    Returns (B, n_frames, F) int32 vision ids: F - 1 codes in [0, num_codes), then END_OF_FRAME. Raises
    PromptTooLongError before compiling when a prompt + n_frames * F exceeds max_sequence_length. With an
    ambient mesh the rows are padded (with copies) to a multiple of dp*fsdp and T to a multiple of sp.
    `stats` (optional) receives first_token_s (prefill and the first draw: on a new engine this includes
    compiling), generate_s (the whole call, s), compile_s (the seconds of it JAX spent compiling, CompileClock),
    run_s (generate_s - compile_s), tokens_per_s (new_tokens / run_s), new_tokens (B * n_frames * F) and rows."""
    config = (engine or model).config
    if not 0 < num_codes <= NUM_VISION_CODES:
        raise ValueError(f"num_codes={num_codes} must be in [1, {NUM_VISION_CODES}]")
    cond, guided = list(cond), uncond is not None
    if guided and len(uncond) != len(cond):
        raise ValueError(f"{len(cond)} conditional but {len(uncond)} unconditional prompts; give one of each")
    halves = [cond] + ([list(uncond)] if guided else [])
    n_new = n_frames * tokens_per_frame
    longest = max(len(p) for half in halves for p in half)
    check_budget(longest, n_new, config.max_sequence_length, f"{n_frames} frame(s) of {tokens_per_frame} tokens")

    data, _ = mesh_sizes()
    b = len(cond)
    per_half = data // math.gcd(data, len(halves))             # rows per half must make R divisible by data
    b_pad = per_half * math.ceil(b / per_half)
    rows = [p for half in halves for p in half + [half[0]] * (b_pad - b)]
    if engine is None:
        engine = Engine(model, params, eos_id=-1, pad_id=pad_id, cache_dtype=cache_dtype, head="vision")
    seed0 = rng if isinstance(rng, int) else seed_of(rng)
    rule = FrameRule(tokens_per_frame, num_codes, float(sampling.cfg_scale), guided)
    t0 = time.perf_counter()
    with CompileClock() as clock:
        result = engine.generate([p.ids for p in rows], n_new, vision=[p.vision for p in rows], rule=rule,
                                 sampling=SamplingConfig(sampling.temperature, sampling.top_k),
                                 seeds=[seed0 + r % b_pad for r in range(len(rows))], stop_ids=(), head="vision")
    t1 = time.perf_counter()
    if stats is not None:
        stats.update(first_token_s=result.stats["time_to_first_token_s"], generate_s=t1 - t0, new_tokens=b * n_new,
                     rows=len(rows), **speed_stats(b * n_new, t1 - t0, clock.seconds))
    tokens = np.asarray(result.tokens[:b], np.int32)
    return tokens.reshape(b, n_frames, tokens_per_frame)


def generation_prompts(tokenizer, caption: str, kind: str) -> tuple[Prompt, Prompt]:
    """(conditional, unconditional) prompts for kind 'image' (the first frame) or 'video' (the rest):
    "Generate an image of {caption}" / "Generate a video of {caption}" in the original's template
    (lwm.text.chat_template.vision_generation_prompts). Raises KeyError for another kind."""
    what = {"image": "an image", "video": "a video"}[kind]
    return vision_generation_prompts(tokenizer, f"Generate {what} of {caption}")


def answer(model: Optional[VisionLLaMAForCausalLM], params, prompt: Prompt, *, max_new_tokens: int,
           temperature: float, rng: jax.Array, eos_id: int, pad_id: int, num_text: Optional[int] = None,
           stats: Optional[dict] = None, cache_dtype=None, engine: Optional[Engine] = None,
           prefix_cache=None, prefill_chunk: Optional[int] = None) -> list[int]:
    """New text ids after `prompt`, up to and without EOS, sampled from the text head (`head='text'` of the
    call, whatever the model config's sample_mode says) among the first `num_text` ids (the tokenizer's
    vocabulary when the model's is padded; default all), through the generation engine (the prompt's vision
    mask routes its embeddings). engine: the `Engine` to run on, so that several questions share its compiled
    calls (then model, params, eos_id, pad_id, num_text and cache_dtype are the engine's: its `vocab_size`
    bounds a text head that is its default); default a new one per call. Raises ValueError for a bad budget,
    PromptTooLongError before compiling when len(prompt) + max_new_tokens > max_sequence_length. `stats` (optional) receives first_token_s (prefill and the first draw, compiling
    included: the engine compiles inside this call), generate_s (s), compile_s (the seconds of it JAX spent
    compiling, CompileClock), run_s and tokens_per_s (new tokens / run_s: without compiling), prompt_tokens,
    new_tokens and cached_tokens (prompt tokens whose KV came from `prefix_cache`, a PrefixCache of the engine:
    its blocks are keyed on the ids and the vision mask, so the same frames map to the same blocks;
    prefill_chunk: tokens per prefill chunk; both as `Engine.generate`)."""
    config = (engine or model).config
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and temperature={temperature} >= 0")
    check_budget(len(prompt), max_new_tokens, config.max_sequence_length, f"--max_new_tokens={max_new_tokens}")
    if engine is None:
        engine = Engine(model, params, eos_id=eos_id, pad_id=pad_id, vocab_size=num_text, cache_dtype=cache_dtype,
                        head="text")
    with CompileClock() as clock:
        result = engine.generate([prompt.ids.tolist()], max_new_tokens, vision=[prompt.vision],
                                 sampling=SamplingConfig(temperature=float(temperature)), seeds=seed_of(rng),
                                 head="text", prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
    (row,) = result.tokens
    if stats is not None:
        s = result.stats
        generate_s, new_tokens = s["time_to_first_token_s"] + s["decode_s"], s["new_tokens"] + (result.finish[0] == "stop")
        stats.update(first_token_s=s["time_to_first_token_s"], generate_s=generate_s, prompt_tokens=len(prompt),
                     new_tokens=new_tokens, cached_tokens=s.get("cached_tokens", 0),
                     **speed_stats(new_tokens, generate_s, clock.seconds))
    return row


class CodesCache:
    """VQGAN codes of frames already encoded, so several questions (or requests) about one image or video
    encode it once: `codes(vqgan, frames)` -> numpy (T, h, w) int32. Keyed by the VQGAN object and a BLAKE2b
    hash of the frames' dtype, shape and bytes (the pixels themselves, not the file name: an edited file is a
    miss); the `size` most recently used entries are kept. `hits` / `misses` count the calls."""

    def __init__(self, size: int = 8):
        self.size, self.hits, self.misses = int(size), 0, 0
        self._codes: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()

    @staticmethod
    def key(vqgan, frames: np.ndarray) -> tuple:
        frames = np.ascontiguousarray(frames)
        h = hashlib.blake2b(f"{frames.dtype.str}{frames.shape}".encode(), digest_size=16)
        h.update(frames.tobytes())
        return id(vqgan), h.digest()

    def codes(self, vqgan, frames) -> np.ndarray:
        """frames (T, S, S, 3) in [-1, 1] (lwm.utils.vision_io.load_frames) -> codes (T, h, w) int32."""
        key = self.key(vqgan, np.asarray(frames))
        if key in self._codes:
            self.hits += 1
            self._codes.move_to_end(key)
            return self._codes[key]
        self.misses += 1
        _, codes = vqgan.encode(frames)
        self._codes[key] = np.asarray(codes, np.int32)
        while len(self._codes) > self.size:
            self._codes.popitem(last=False)
        return self._codes[key]


class VisionChat:
    """Several questions about one image or video, as one conversation over the engine.

    The first question is the original's vision chat prompt (lwm.text.chat_template.vision_chat_prompt: the
    question, then the frames' vision ids); each later one is a follow-up turn appended to it, as the text
    chat appends turns: previous prompt + previous answer + EOS + "USER: {question} ASSISTANT:". So every
    prompt begins with the one before it, and with a prefix cache (`prefix_cache`, keyed on the ids and the
    vision mask) the frames' KV blocks are prefilled once: question 2 copies them and prefills only the
    first answer and the new question (plus the tail of question 1's prompt short of a whole block).
    (The template puts the question before the frames, so independent questions, each alone with the frames,
    would share no block after the question: the conversation is what lets them share the video.)

    vision_ids (N,): the frames' vision tokens (`vision_tokens`); question i draws with seed + i at
    `temperature` (0: greedy). `ask(question, stats)` -> the answer's text ids (no EOS); raises
    PromptTooLongError (naming --max_new_tokens and max_sequence_length) before compiling when the
    conversation + max_new_tokens no longer fits, leaving the conversation as it was. `prompt`: the last
    question's prompt (a chat_template.Prompt), `answers`: the answers so far."""

    def __init__(self, engine: Engine, tokenizer, vision_ids, *, max_new_tokens: int, temperature: float,
                 seed: int = 0, prefix_cache=None, prefill_chunk: Optional[int] = None):
        self.engine, self.tokenizer, self.vision_ids = engine, tokenizer, np.asarray(vision_ids, np.int32)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.prefix_cache, self.prefill_chunk = prefix_cache, prefill_chunk
        self.prompt: Optional[Prompt] = None
        self.answers: list[list[int]] = []

    def prompt_for(self, question: str) -> Prompt:
        """The prompt that asks `question` next (changes nothing)."""
        if self.prompt is None:
            return vision_chat_prompt(self.tokenizer, question, self.vision_ids)
        return (self.prompt.extend(self.answers[-1] + [self.tokenizer.eos_id], False)
                .extend(user_turn_ids(self.tokenizer, question, first=False), False))

    def ask(self, question: str, stats: Optional[dict] = None) -> list[int]:
        prompt = self.prompt_for(question)
        ids = answer(None, None, prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                     rng=jax.random.PRNGKey(self.seed + len(self.answers)), eos_id=self.engine.eos_id,
                     pad_id=self.engine.pad_id, stats=stats, engine=self.engine, prefix_cache=self.prefix_cache,
                     prefill_chunk=self.prefill_chunk)
        self.prompt = prompt
        self.answers.append(list(ids))
        return ids
