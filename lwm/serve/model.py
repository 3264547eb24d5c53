"""What the server knows of its model: how requests become token ids and the length rule.

`ServedModel(engine, tokenizer, name, vqgan=...)`:
  chat_prompt(messages)        chat messages -> prompt ids (`lwm.text.chat_template.conversation_ids`), or for a
                               vision model with media parts a vision prompt (ids + vision mask)
  completion_prompt(prompt)    text -> [BOS] + ids; token ids as given
  check_length(n, max_tokens)  400 'context_length_exceeded' naming max_sequence_length
  check_chars(n_chars, param)  the same refusal from a text's length in characters, before tokenizing it
  check_image_request(req)     vision models: the request's (cond, uncond) prompt ids, or a 400
  generate_images(...)         vision models: text -> (n, R, R, 3) uint8 frames
  tokenizer_info(), tokenize(text, add_special_tokens), detokenize(ids)   vLLM's tokenizer endpoints

Tokenizing is the caller's thread's work: the app runs `chat_prompt`, `completion_prompt` and
`check_image_request` in a worker thread (sentencepiece releases the GIL while it encodes), never on the event
loop nor on the engine thread, and a text too long for the context by its character count alone is refused
before it is tokenized (`check_chars`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np

from lwm.serve.errors import APIError, bad_request


@dataclasses.dataclass(frozen=True)
class MediaPrompt:
    """A vision-model prompt: token ids and, per id, whether it is a vision id (VQGAN code or marker)."""
    ids: tuple
    vision: tuple

    def __len__(self) -> int:
        return len(self.ids)


class ServedModel:
    """max_chars_per_token: a text of more than max_chars_per_token * max_sequence_length characters is refused
    without tokenizing it (`check_chars`). A token covers at most its vocabulary piece's characters (LLaMA's
    longest pieces are 16 characters; byte-fallback tokens cover less than one), so the default 32 refuses
    only texts that could not fit, unless the tokenizer's normalizer shrinks text (collapsing whitespace:
    not LLaMA's)."""

    def __init__(self, engine, tokenizer, name: str, *, vqgan=None, allow_local_media: bool = False,
                 max_n_frames: int = 8, max_image_bytes: int = 1 << 27, max_video_pixels: int = 1 << 30,
                 max_chars_per_token: int = 32):
        self.max_chars_per_token = max_chars_per_token
        self.media_budgets = dict(max_image_bytes=max_image_bytes, max_video_pixels=max_video_pixels)
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.vqgan, self.allow_local_media, self.max_n_frames = vqgan, allow_local_media, max_n_frames
        self.config = engine.config
        self.is_vision = hasattr(self.config, "vision_vocab_size")
        self.max_sequence_length = int(self.config.max_sequence_length)
        self.created = int(time.time())

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lwm",
                "max_model_len": self.max_sequence_length, "vision": self.is_vision}

    # ------------------------------------------------------------------------------------------- length
    def check_length(self, prompt_len: int, max_tokens: Optional[int], param: str = "messages") -> None:
        """400 'context_length_exceeded' when prompt_len + max_tokens (or + 1 without a budget) exceeds the
        model's max_sequence_length; param: the request field to name ('messages', 'prompt')."""
        limit = self.max_sequence_length
        need = prompt_len + (max_tokens or 1)
        if need > limit:
            asked = f" + max_tokens {max_tokens}" if max_tokens else " + 1 new token"
            raise APIError(400, f"this model's maximum context length (max_sequence_length) is {limit} tokens; the "
                                f"prompt has {prompt_len} tokens{asked} = {need}; shorten the {param} or lower "
                                f"max_tokens", param=param, code="context_length_exceeded")

    def check_chars(self, n_chars: int, param: str = "messages") -> None:
        """400 'context_length_exceeded' when a text of n_chars characters cannot fit the context however it
        tokenizes (more than max_chars_per_token characters per token of max_sequence_length): the cheap bound
        checked before tokenizing, so a 20 MB prompt costs its length, not its tokenization."""
        limit = self.max_chars_per_token * self.max_sequence_length
        if n_chars > limit:
            raise APIError(400, f"this model's maximum context length (max_sequence_length) is "
                                f"{self.max_sequence_length} tokens; the {param} has {n_chars} characters, more than "
                                f"{limit} ({self.max_chars_per_token} per token) could ever fit; shorten the {param}",
                           param=param, code="context_length_exceeded")

    # ---------------------------------------------------------------------------------------- tokenizer
    SPECIAL = ("<s>", "</s>")          # LLaMA's names of BOS and EOS, read as their ids by `tokenize`

    def tokenizer_info(self) -> dict:
        """vLLM's GET /tokenizer_info: the special tokens' texts and the context length."""
        return {"tokenizer_class": type(self.tokenizer).__name__, "bos_token": self.SPECIAL[0],
                "eos_token": self.SPECIAL[1], "pad_token": None, "model_max_length": self.max_sequence_length,
                "vocab_size": int(self.tokenizer.vocab_size)}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """vLLM's POST /tokenize: the ids of `text`, with '<s>' and '</s>' read as BOS and EOS (as Hugging Face
        tokenizers read their special tokens; `completion_prompt` does not), BOS first when
        add_special_tokens. Refused by length first (`check_chars`)."""
        import re

        self.check_chars(len(text), "prompt")
        tok, ids = self.tokenizer, []
        special = dict(zip(self.SPECIAL, (self.tokenizer.bos_id, self.tokenizer.eos_id)))
        for piece in re.split("(" + "|".join(map(re.escape, self.SPECIAL)) + ")", text):
            if piece in special:
                ids.append(int(special[piece]))
            elif piece:
                ids += [int(i) for i in tok.encode(piece)]
        return ([int(tok.bos_id)] if add_special_tokens else []) + ids

    def detokenize(self, ids) -> str:
        """vLLM's POST /detokenize: the text of `ids` (400 for an id outside the vocabulary)."""
        vocab = self.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------------------------------ prompts
    def completion_prompt(self, prompt) -> list[int]:
        """Text -> [BOS] + ids (refused by its length first, `check_chars`); token ids are checked against
        the vocabulary and returned as given. Tokenizes on the calling thread."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            return [self.tokenizer.bos_id] + list(self.tokenizer.encode(prompt))
        vocab = self.tokenizer.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return list(prompt)

    def chat_prompt(self, messages: Sequence) -> object:
        """Pydantic ChatMessages -> prompt. Text parts of one message are joined with newlines; media parts
        need a vision model and may sit in the last user message only. Refused by the texts' total length
        before anything is tokenized (`check_chars`). Tokenizes on the calling thread."""
        from lwm.text.chat_template import conversation_ids

        self.check_chars(sum(len(m.content) if isinstance(m.content, str) else
                             sum(len(p.text) for p in m.content if p.type == "text") for m in messages))
        plain, media = [], []
        for i, m in enumerate(messages):
            if isinstance(m.content, str):
                plain.append({"role": m.role, "content": m.content})
                continue
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    texts.append(part.text)
                    continue
                if not self.is_vision:
                    raise bad_request(f"{where}: model {self.name!r} is a text model; {part.type} parts need a "
                                      "vision model (LWM-Chat)", where, "media_not_supported")
                if m.role != "user" or i != len(messages) - 1:
                    raise bad_request(f"{where}: images and videos are read in the last user message only", where)
                url = part.image_url.url if part.type == "image_url" else part.video_url.url
                media.append(("image" if part.type == "image_url" else "video", url, where))
            plain.append({"role": m.role, "content": "\n".join(texts)})
        if not media:
            try:
                return conversation_ids(self.tokenizer, plain)
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
        return self.vision_prompt(plain, media)

    def vision_prompt(self, plain: list[dict], media) -> "MediaPrompt":
        """The conversation's ids (`lwm.text.chat_template`) with the last user turn carrying the media, as the
        original LWM-Chat lays it out: "{system} USER: {text}\\n" + "<vision>" + vision ids + "</vision>" +
        " ASSISTANT:" (each text piece tokenized on its own; vision ids: each frame's VQGAN codes, then the
        end-of-frame / end-of-vision marker)."""
        from lwm.text.chat_template import SYSTEM_PROMPT, USER_TURN, conversation_ids, user_turn_ids, user_turn_text
        from lwm.serve.media import frames_from_parts
        from lwm.inference.vision import vision_tokens

        if self.vqgan is None:
            raise bad_request(f"model {self.name!r} has no VQGAN loaded; image input is unavailable", "messages")
        tok = self.tokenizer
        try:
            text_ids = conversation_ids(tok, plain)               # validates the turns
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        system = plain[0]["content"] if plain[0]["role"] == "system" else SYSTEM_PROMPT
        first = sum(m["role"] == "user" for m in plain) == 1
        last = plain[-1]["content"]
        head = text_ids[:len(text_ids) - len(user_turn_ids(tok, last, first, system))]
        suffix = USER_TURN.split("{message}")[1]                  # " ASSISTANT:", the template's turn end
        turn = user_turn_text(last + "\n", first, system)
        if not turn.endswith(suffix):
            raise RuntimeError(f"lwm.text.chat_template's user turn no longer ends with {suffix!r}")
        frames = frames_from_parts(media, self.vqgan.config.resolution, self.max_n_frames, self.allow_local_media,
                                   **self.media_budgets)
        self.check_length(len(head) + 2 + len(frames) * (self.vqgan.config.codes_per_side ** 2 + 1), 1)
        _, codes = self.vqgan.encode(frames)
        vision = [int(v) for v in vision_tokens(np.asarray(codes))]
        pieces = [(head + ([tok.bos_id] if first else []) + list(tok.encode(turn[:-len(suffix)])), False),
                  (list(tok.encode("<vision>")), False), (vision, True), (list(tok.encode("</vision>")), False),
                  (list(tok.encode(suffix)), False)]
        return MediaPrompt(tuple(i for ids, _ in pieces for i in ids),
                           tuple(v for ids, v in pieces for _ in ids))

    def check_image_request(self, req) -> tuple:
        """The (cond, uncond) prompt ids of an image request (`image_prompts`), or a 400: not a vision model,
        a size other than the VQGAN's, a prompt too long. Tokenizes on the calling thread (the app calls it in
        a worker thread, so the engine thread that runs `generate_images` never tokenizes)."""
        if not self.is_vision or self.vqgan is None:
            raise bad_request(f"model {self.name!r} cannot generate images: start the server with a vision model "
                              "(--modality=vision) and its VQGAN", "model", "images_not_supported")
        side = self.vqgan.config.resolution
        if req.size is not None and req.size != f"{side}x{side}":
            raise bad_request(f"size: this model makes {side}x{side} images, not {req.size}", "size")
        return self.image_prompts(req.prompt)

    def image_prompts(self, prompt: str) -> tuple:
        """(cond, uncond) ids of the original's text-to-image recipe (`lwm.text.chat_template.
        vision_generation_prompts` of "Generate an image of {prompt}"), refused first by the prompt's length
        in characters (`check_chars`), then by its tokens plus one frame (`check_length`)."""
        from lwm.text.chat_template import vision_generation_prompts

        self.check_chars(len(prompt), "prompt")
        cond, uncond = vision_generation_prompts(self.tokenizer, f"Generate an image of {prompt}")
        self.check_length(max(len(cond), len(uncond)), self.vqgan.config.codes_per_side ** 2 + 1, "prompt")
        return cond, uncond

    def generate_images(self, prompt, n: int, *, seed: int, temperature: float, top_k: int,
                        cfg_scale: float) -> list[np.ndarray]:
        """prompt: the (cond, uncond) ids of `image_prompts` (or a text, tokenized here). n images for it by the original's text-to-image recipe (`lwm.inference.vision.generate_frames`:
        "Generate an image of {prompt}" against "<vision>", classifier-free guidance when cfg_scale != 1,
        forced end-of-frame), then the VQGAN decode, on the server's one engine (the same model and parameters
        that answer text; the vision head is an argument of the call), so requests after the first reuse its
        compiled calls. Returns n uint8 (R, R, 3) frames. Runs on the engine thread."""
        from lwm.inference.vision import FrameSampling, generate_frames
        from lwm.utils.vision_io import to_uint8

        side = self.vqgan.config.codes_per_side
        per_frame = side * side + 1
        cond, uncond = self.image_prompts(prompt) if isinstance(prompt, str) else prompt
        guided = cfg_scale != 1
        codes = generate_frames(None, None, [cond] * n,
                                [uncond] * n if guided else None, n_frames=1, tokens_per_frame=per_frame,
                                sampling=FrameSampling(temperature, top_k, float(cfg_scale)), rng=int(seed),
                                pad_id=self.tokenizer.pad_id, num_codes=self.vqgan.config.num_embeddings,
                                engine=self.engine)
        codes = np.asarray(codes, np.int32)[:, 0, :-1].reshape(n, side, side)
        return list(to_uint8(self.vqgan.decode(codes)))

    # --------------------------------------------------------------------------------------- generation
    @property
    def cache_length(self) -> int:
        """Cache slots per decode slot: the model's context plus the most padding a prompt's bucket adds
        (`Engine.padded_length`, lwm.inference.sampling.bucket_length: under sp*block tokens a power of two times sp,
        less than twice the prompt; above, whole sp*block), rounded up to whole sp chunks. A prompt whose
        bucket would still not leave room for its budget is padded to sp only (`prefill_key`). A decode step
        costs a few percent more per doubling of this length (debug preset, CPU), so it is kept tight."""
        _, sp = self.engine.mesh_sizes()
        block = max(self.config.scan_query_chunk_size, self.config.scan_key_chunk_size)
        slack = min(self.max_sequence_length, sp * block) + sp
        return sp * math.ceil((self.max_sequence_length + slack) / sp)

    @staticmethod
    def _split(prompt):
        """(ids, vision mask or None) of a job's prompt."""
        if isinstance(prompt, MediaPrompt):
            return list(prompt.ids), list(prompt.vision)
        return list(prompt), None

    def _sampling(self, job):
        from lwm.inference.sampling import SamplingConfig

        s = job.sampling
        return SamplingConfig(temperature=s.temperature, top_k=0, top_p=s.top_p)

    @classmethod
    def _prefill_input(cls, job):
        """(ids, vision mask or None) to prefill for `job`: its prompt, followed by the tokens it has drawn
        when it is resumed after a lost decode state (Scheduler: `job.tokens` non-empty at admission)."""
        ids, vision = cls._split(job.prompt)
        if job.tokens:
            ids = ids + [int(t) for t in job.tokens]
            vision = None if vision is None else vision + [False] * len(job.tokens)
        return ids, vision

    def prefill_key(self, engine, job) -> tuple:
        """Jobs with equal keys can share one batched prefill: (padded length T, whether a vision mask)."""
        ids, vision = self._prefill_input(job)
        _, sp = engine.mesh_sizes()
        t = engine.padded_length(len(ids))
        if t + job.sampling.max_tokens - len(job.tokens) > self.cache_length:   # no room left: pad to sp only
            t = sp * math.ceil(len(ids) / sp)
        return t, vision is not None

    def start_prefill(self, engine, job, prefix_cache=None, chunk: int = 2048):
        """`Engine.start_prefill` of `job`'s prefill input (`_prefill_input`: its prompt, and the tokens it drew
        when resumed), its prompt at cache slots [0, n), the longest run of `prefix_cache`'s blocks that starts
        it copied in: a `ChunkedPrefill` whose `step()` prefills one chunk of `chunk` tokens (a multiple of sp;
        the engine runs a shorter rest as one chunk of its own bucket, so a 20-token prompt runs a 32-wide
        chunk, not a 2048-wide one)."""
        ids, vision = self._prefill_input(job)
        return engine.start_prefill(ids, vision, prefix_cache=prefix_cache, chunk=chunk)

    def insert_prefilled(self, engine, state, slot: int, job, prefix):
        """Put `job`'s finished chunked prefill (`prefix`, from `ChunkedPrefill.result()`) into decode slot
        `slot` of `state` (`Engine.insert`, drawing its first token, or its next one when resumed). Returns the
        state."""
        return engine.insert(prefix, state, slot, max_new_tokens=job.sampling.max_tokens,
                             sampling=self._sampling(job), seed=job.sampling.seed or 0, drawn=len(job.tokens))

    def insert_many(self, engine, state, slots: list, jobs: list, rows: int):
        """Prefill `jobs` (equal `prefill_key`) as one batch of `rows` rows (>= len(jobs), a multiple of the
        mesh's dp*fsdp; the extra rows repeat the first prompt) and put job i into decode slot slots[i] of
        `state` with one `Engine.insert` (continuous batching; one engine serves every decode state, so one
        compiled prefill per shape serves them all). Each row is padded to the same length as a lone prefill of it, so a row's numbers do not
        depend on its neighbours'. A job that already drew tokens (resumed after a lost decode state) prefills
        its prompt and those tokens and goes on at its next draw (`Engine.insert(drawn=...)`). Returns the
        state."""
        from lwm.inference.engine import Prefix

        t, has_vision = self.prefill_key(engine, jobs[0])
        split = [self._prefill_input(job) for job in jobs]
        split += [split[0]] * (rows - len(jobs))
        logits, cache = engine.prefill_batch([ids for ids, _ in split], t, t,
                                             [v for _, v in split] if has_vision else None)
        pad = rows - len(jobs)                             # the repeated rows are left out (slot -1)
        state = engine.insert(Prefix(cache=cache, logits=logits, length=t, position=[len(ids) for ids, _ in split]),
                              state, list(slots) + [-1] * pad,
                              max_new_tokens=[j.sampling.max_tokens for j in jobs] + [1] * pad,
                              sampling=[self._sampling(j) for j in jobs] + [self._sampling(jobs[0])] * pad,
                              seed=[j.sampling.seed or 0 for j in jobs] + [0] * pad,
                              drawn=[len(j.tokens) for j in jobs] + [0] * pad)
        return state
