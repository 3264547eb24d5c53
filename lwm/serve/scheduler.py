"""The batching scheduler: one thread owns the engine; requests wait in a bounded queue and share decode steps.

    sched = Scheduler(served, max_batch_size=8, max_queue=64); sched.start()
    sched.submit(job)              # from the event loop; APIError 429 when max_queue jobs already wait
    await sched.call(fn)           # run fn() on the engine thread between decode steps (image generation)

Continuous batching over the slot API of the one engine (`lwm.inference.engine.Engine`), as JetStream and
vLLM do: the engine keeps `max_batch_size` decode slots
  (plus one small state, below). Between decode steps, waiting jobs are prefilled one by one and inserted into
  free slots; every step draws one token for every active slot; a slot is freed as soon as its job ends (EOS,
  budget, a stop string, or its client left), and the next waiting job takes it at the next step. A step costs
  every slot of its state, active or not, so a request that runs alone is decoded in a one-row state (`_pools`).
A job whose client left before it started is dropped from the queue.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import math
import threading
import traceback
from typing import Callable

import numpy as np

from lwm.serve.errors import APIError



def _record(job) -> tuple:
    ttft = None if job.t_first is None else job.t_first - job.t_submit
    latency = None if job.t_done is None else job.t_done - job.t_submit
    return job.finish_reason, len(job.tokens), ttft, latency


def _twin(engine):
    """A second engine over the same model and parameters: the slot API keeps per-slot sampling flags for the
    state an engine last initialised, so each decode state gets its own engine (and compiled steps)."""
    return type(engine)(engine.model, engine.params, eos_id=engine.eos_id, pad_id=engine.pad_id,
                        vocab_size=engine.vocab_size, cache_dtype=engine.cache_dtype)


class Scheduler:
    def __init__(self, served, *, max_batch_size: int = 8, max_queue: int = 64, mesh=None,
                 steps_per_call: int = 1):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_queue={max_queue} >= 0")
        self.served, self.max_batch_size, self.max_queue = served, max_batch_size, max_queue
        self.mesh, self.steps_per_call = mesh, max(1, int(steps_per_call))
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.batches = 0            # decode calls made
        self.max_rows = 0           # the most jobs decoding at once (one round of steps)
        # (finish_reason, tokens, time to first token s, latency s) of recent jobs, newest last; timed from
        # submit(), so without HTTP (the benchmark prints them beside what its client sees)
        self.finished = collections.deque(maxlen=1024)

    # ---------------------------------------------------------------------------------- any thread
    def _check_room(self) -> None:
        if len(self.waiting) >= self.max_queue:
            raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (--max_queue="
                                f"{self.max_queue}); retry later", code="queue_full")

    def submit(self, job) -> None:
        with self.cond:
            self._check_room()
            self.waiting.append(job)
            self.cond.notify_all()

    async def call(self, fn: Callable):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self._check_room()
            self.waiting.append((fn, future))
            self.cond.notify_all()
        return await asyncio.wrap_future(future)

    def stats(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running": sum(j is not None for j in self.running),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue}

    def start(self) -> "Scheduler":
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lwm-serve-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=60)

    # ------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        import jax

        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            self._continuous()

    def _drop_cancelled(self) -> None:
        kept = collections.deque()
        for item in self.waiting:
            if not isinstance(item, tuple) and item.cancelled.is_set():
                item.finish("cancelled")
            else:
                kept.append(item)
        self.waiting = kept

    @staticmethod
    def _run_call(item) -> None:
        fn, future = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:                  # handed to the awaiting request
                future.set_exception(e)

    def _pools(self, data: int) -> list:
        """Decode states as [offset, slots, state, engine]: a small one (one row per data shard) for a request that
        runs alone, and one of max_batch_size rows. A step costs every row of its state whether active or
        not (about 20x one row's cost at 16 rows on a CPU), so a lone request must not pay for 16."""
        big = data * math.ceil(self.max_batch_size / data)
        if big <= data:
            return [[0, big, None, self.served.engine]]
        return [[0, data, None, self.served.engine], [data, big, None, _twin(self.served.engine)]]

    def _pick_slot(self, pools, free: list, arriving: int) -> int:
        """The small state's row for a request that arrives alone while the big state is idle, else the big
        state's first free row (`arriving`: requests admitted in this round, this one included)."""
        big_busy = len(pools) > 1 and any(self.running[i] is not None
                                          for i in range(pools[1][0], pools[1][0] + pools[1][1]))
        small = [i for i in free if i < pools[0][1]]
        large = [i for i in free if i >= pools[0][1]]
        if small and (not large or (not big_busy and arriving == 1)):
            return small[0]
        return large[0]

    def _continuous(self) -> None:
        engine = self.served.engine
        data, _ = engine.mesh_sizes()
        pools = self._pools(data)
        self.running = [None] * sum(p[1] for p in pools)
        while True:
            admit, call = [], None
            with self.cond:
                while True:
                    self._drop_cancelled()
                    if self.stopping:
                        return
                    if self.waiting or any(j is not None for j in self.running):
                        break
                    self.cond.wait()
                if self.waiting and isinstance(self.waiting[0], tuple):
                    call = self.waiting.popleft()
                active = sum(j is not None for j in self.running)
                arriving = sum(1 for w in self.waiting if not isinstance(w, tuple))
                while (call is None and self.waiting and not isinstance(self.waiting[0], tuple)
                       and active < self.max_batch_size):
                    slot = self._pick_slot(pools, [i for i, j in enumerate(self.running) if j is None], arriving)
                    job = self.waiting.popleft()
                    self.running[slot] = job
                    admit.append((slot, job))
                    active += 1
                many = bool(self.waiting)
            if call is not None:
                self._run_call(call)
                continue
            try:
                for slot, job in admit:
                    pool = next(p for p in pools if p[0] <= slot < p[0] + p[1])
                    try:
                        if pool[2] is None:
                            pool[2] = pool[3].init_state(pool[1], self.served.cache_length)
                        pool[2] = self.served.insert(pool[3], pool[2], slot - pool[0], job)
                    except APIError as e:
                        job.finish("error", e)
                        self._release(slot)
                    except Exception as e:
                        traceback.print_exc()
                        job.finish("error", APIError(500, f"prefill failed: {type(e).__name__}: {e}"))
                        self._release(slot)
                n_steps = 1 if many else self.steps_per_call
                self.max_rows = max(self.max_rows, sum(j is not None and not j.finished for j in self.running))
                for pool in pools:
                    offset, size, state, engine = pool
                    jobs = self.running[offset:offset + size]
                    if state is None or all(j is None for j in jobs):
                        continue
                    keep = np.array([j is not None and not j.finished for j in jobs])
                    state, tokens, emitted = engine.step(state, n_steps=n_steps, keep=keep)
                    self.batches += 1
                    for row, job in enumerate(jobs):
                        if job is None:
                            continue
                        for i in range(tokens.shape[1]):
                            if emitted[row, i] and job.feed(int(tokens[row, i])):
                                break
                        if not job.finished and not emitted[row].any():   # the engine ended it: budget spent
                            job.finish("length")
                        if job.finished:
                            if not job.done.is_set():
                                job.finish("cancelled")
                            state = engine.free(state, row)
                            self._release(offset + row)
                    pool[2] = state
            except Exception as e:
                traceback.print_exc()
                for slot, job in enumerate(self.running):
                    if job is not None:
                        job.finish("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
                        self._release(slot)
                for pool in pools:
                    pool[2] = None

    def _release(self, slot: int) -> None:
        with self.cond:
            job = self.running[slot]
            if job is not None:
                self.finished.append(_record(job))
            self.running[slot] = None
