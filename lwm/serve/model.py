"""What the server knows of its model: how requests become token ids and the length rule.

`ServedModel(engine, tokenizer, name, vqgan=...)`:
  chat_prompt(messages)        chat messages -> prompt ids (`lwm.chat_template.conversation_ids`), or for a
                               vision model with media parts a vision prompt (ids + vision mask)
  completion_prompt(prompt)    text -> [BOS] + ids; token ids as given
  check_length(n, max_tokens)  400 'context_length_exceeded' naming max_sequence_length
  generate_images(...)         vision models: text -> (n, R, R, 3) uint8 frames
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from lwm.serve.errors import APIError, bad_request


class ServedModel:
    def __init__(self, engine, tokenizer, name: str, *, vqgan=None, allow_local_media: bool = False,
                 max_n_frames: int = 8):
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
    def check_length(self, prompt_len: int, max_tokens: Optional[int]) -> None:
        limit = self.max_sequence_length
        need = prompt_len + (max_tokens or 1)
        if need > limit:
            asked = f" + max_tokens {max_tokens}" if max_tokens else " + 1 new token"
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len} "
                                f"tokens{asked} = {need}; shorten the messages or lower max_tokens",
                           param="messages", code="context_length_exceeded")

    # ------------------------------------------------------------------------------------------ prompts
    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return [self.tokenizer.bos_id] + list(self.tokenizer.encode(prompt))
        vocab = self.tokenizer.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return list(prompt)

    def chat_prompt(self, messages: Sequence) -> object:
        """Pydantic ChatMessages -> prompt. Text parts of one message are joined with newlines; media parts
        need a vision model and may sit in the last user message only."""
        from lwm.chat_template import conversation_ids

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

    def vision_prompt(self, plain: list[dict], media) -> object:
        raise NotImplementedError("vision prompts come with the engine's vision support")

    def check_image_request(self, req) -> None:
        if not self.is_vision or self.vqgan is None:
            raise bad_request(f"model {self.name!r} cannot generate images: start the server with a vision model "
                              "(--modality=vision) and its VQGAN", "model", "images_not_supported")
        side = self.vqgan.config.resolution
        if req.size is not None and req.size != f"{side}x{side}":
            raise bad_request(f"size: this model makes {side}x{side} images, not {req.size}", "size")

    def generate_images(self, prompt: str, n: int, *, seed: int, temperature: float, top_k: int,
                        cfg_scale: float) -> list[np.ndarray]:
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- generation
    def batch_key(self, job) -> tuple:
        """Jobs with equal keys may share a batch."""
        s = job.sampling
        return (s.temperature, s.top_p, s.seed if s.temperature > 0 else None, type(job.prompt).__name__)

    def generate_batch(self, jobs) -> None:
        """Run jobs as one batch on the engine (interim: `lwm.sampling.Sampler.generate`), feeding each job its
        tokens in order as the decode loop produces them."""
        import jax

        from lwm.sampling import SamplingConfig

        s = jobs[0].sampling
        budget = max(j.sampling.max_tokens for j in jobs)
        fed = [0] * len(jobs)
        arrived: dict[int, np.ndarray] = {}

        def stream(step, tokens):                        # host callback; calls may come out of order
            arrived[int(step)] = np.asarray(tokens)
            while min(fed) in arrived:
                step = min(fed)
                row_tokens = arrived.pop(step)
                for r, job in enumerate(jobs):
                    if fed[r] == step:
                        if not job.finished:
                            job.feed(int(row_tokens[r]))
                        fed[r] += 1

        outs = self.engine.generate([j.prompt for j in jobs], budget, SamplingConfig(s.temperature, 0, s.top_p),
                                    jax.random.PRNGKey(s.seed or 0), stream=stream)
        for job, out in zip(jobs, outs):                 # whatever the stream did not deliver
            for tok in out[len(job.tokens):]:
                if job.finished:
                    break
                job.feed(int(tok))
            if not job.finished:
                job.finish("stop" if len(out) < budget else "length")
