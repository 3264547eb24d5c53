"""One generation request as the scheduler sees it: prompt, settings, and the tokens and text it has produced.

The scheduler's thread calls `Job.feed_many(tokens)` with each engine call's new tokens (`Job.feed(token)`
for one); the job decodes its text, applies the stop strings (the earliest match ends the answer, the stop
string itself is not returned, as in the OpenAI API), holds back text that may still become a stop string or
an incomplete character, and posts the new text to the request's asyncio queue. The HTTP side reads
`Job.events()` and may `cancel()` (client gone).

Usage counts: prompt_tokens = len(prompt), completion_tokens = tokens produced, the EOS that ends an answer
excluded (what `lwm.inference.sampling.Sampler.generate` returns); prompt_tokens_details.cached_tokens = the
prompt tokens whose KV cache came from the server's prefix cache (`Job.cached_tokens`, set by the scheduler
when it starts the job's prefill; OpenAI's field of the same name).

A job made with `logprobs=True` also keeps, per token of `tokens`, the engine's log-probability and its
alternatives (`lwm.inference.engine.TokenLogprobs` rows: logprob, top ids (K,), top log-probabilities (K,)),
in `token_logprobs`; the scheduler then steps its decode state with `Engine.step(..., logprobs=True)`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any, AsyncIterator, Optional, Sequence


_batch = threading.local()


def _deliver(posts) -> None:
    for job, event in posts:
        job.queue.put_nowait(event)


@contextlib.contextmanager
def posts_batched():
    """Within this block (on one thread), the jobs' posts to their event loops are held and handed over at its
    end with one `call_soon_threadsafe` per loop, in order: the scheduler wraps one decode step's tokens of
    all its jobs, so the event loop wakes once per step rather than once per job."""
    if getattr(_batch, "pending", None) is not None:
        yield
        return
    _batch.pending = []
    try:
        yield
    finally:
        pending, _batch.pending = _batch.pending, None
        by_loop: dict = {}
        for job, event in pending:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, posts in by_loop.items():
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_deliver, posts)
                except RuntimeError:    # the event loop has shut down
                    pass


@dataclasses.dataclass
class Sampling:
    """Per-request settings. temperature 0 = greedy; top_p 1 = off; seed None = the server's counter."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()


class Job:
    """prompt: token ids (list[int]) for a text model, or an `lwm` vision prompt (ids + vision mask) with len()."""

    def __init__(self, prompt: Any, sampling: Sampling, tokenizer, loop: Optional[asyncio.AbstractEventLoop],
                 every_token: bool = False, logprobs: bool = False):
        self.prompt, self.sampling, self.tokenizer = prompt, sampling, tokenizer
        self.logprobs = logprobs
        self.token_logprobs: list = []  # with logprobs: (logprob, top_ids (K,), top_logprobs (K,)) per token
        self.loop = loop
        self.every_token = every_token  # post each token as it comes, even while its text is held back
        self.queue: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self.tokens: list[int] = []
        self.text = ""                 # the answer so far (stop strings cut off)
        self.sent = 0                  # characters of `text` already posted
        self.sent_tokens = 0           # tokens already posted
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_first: Optional[float] = None
        self.t_done: Optional[float] = None
        # Scheduler's fault recovery: decode faults this job has been part of since its last good step, and
        # whether it was resumed after one and has not yet completed a step (then it is admitted alone).
        self.faults = 0
        self.suspect = False
        self.cached_tokens = 0          # prompt tokens taken from the prefix cache (the scheduler sets it)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: the scheduler frees the job's slot at its next step."""
        self.cancelled.set()

    # ---------------------------------------------------------------------------------- scheduler thread
    def feed(self, token: int, info=None) -> bool:
        """One new token (info: its (logprob, top ids, top log-probabilities) when the job keeps them);
        returns True when the job is finished (EOS, a stop string, max_tokens, cancelled)."""
        if self.finished:
            return True
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token == self.tokenizer.eos_id:
            return self.finish("stop")
        self.tokens.append(int(token))
        if self.logprobs:
            self.token_logprobs.append(info)
        text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.finish("stop")
        self.text = text
        if len(self.tokens) >= self.sampling.max_tokens:
            return self.finish("length")
        self._post_text(final=False)
        return False

    def feed_many(self, tokens: Sequence[int], infos: Optional[Sequence] = None) -> bool:
        """The tokens of one engine call, in order (infos: one `feed` info per token, or None); the same
        outcome as `feed` one by one (EOS, max_tokens and stop strings end the answer at the same token), with
        one text decode and one post for them all. Returns True when the job is finished."""
        if self.finished:
            return True
        infos = [None] * len(tokens) if infos is None else list(infos)
        if self.sampling.stop:             # where a stop string first appears needs the text token by token
            for token, info in zip(tokens, infos):
                if self.feed(token, info):
                    return True
            return False
        if not tokens:
            return False
        if self.t_first is None:
            self.t_first = time.perf_counter()
        tokens = [int(t) for t in tokens]
        eos = tokens.index(self.tokenizer.eos_id) if self.tokenizer.eos_id in tokens else None
        room = self.sampling.max_tokens - len(self.tokens)
        take = room if eos is None else min(eos, room)
        self.tokens.extend(tokens[:take])
        if self.logprobs:
            self.token_logprobs.extend(infos[:take])
        self.text = self.tokenizer.decode(self.tokens)
        if eos is not None and eos < room:
            return self.finish("stop")
        if len(self.tokens) >= self.sampling.max_tokens:
            return self.finish("length")
        self._post_text(final=False)
        return False

    def finish(self, reason: str, error: Optional[BaseException] = None) -> bool:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self.t_done = time.perf_counter()
            self._post_text(final=True)
            self._post(("done", reason))
            self.done.set()
        return True

    def _post_text(self, final: bool) -> None:
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))            # a character still incomplete
            for stop in self.sampling.stop:                   # a tail that may grow into a stop string
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:k]):
                        end -= k
                        break
        new_tokens = len(self.tokens) > self.sent_tokens
        if end > self.sent or (new_tokens and (final or self.every_token)):
            self._post(("text", (self.text[self.sent:end], self.tokens[self.sent_tokens:])))
            self.sent, self.sent_tokens = end, len(self.tokens)

    def _post(self, event) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        pending = getattr(_batch, "pending", None)
        if pending is not None:         # inside `posts_batched()`: sent with the others at its end
            pending.append((self, event))
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:            # the event loop has shut down
            pass

    # ------------------------------------------------------------------------------------- HTTP side
    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """('text', (str, [token ids])) pieces, then ('done', finish_reason). Pieces that queued up while the
        reader was busy come merged as one (fewer, larger chunks when the client lags). Raises the job's
        error, if any."""
        while True:
            kind, value = await self.queue.get()
            while kind == "text" and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if nxt[0] != "text":
                    yield kind, value
                    kind, value = nxt
                    break
                value = (value[0] + nxt[1][0], list(value[1]) + list(nxt[1][1]))
            if kind == "done":
                if self.error is not None:
                    raise self.error
                yield kind, value
                return
            yield kind, value

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": int(self.cached_tokens)}}
