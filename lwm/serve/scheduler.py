"""The batching scheduler: one thread owns the engine; requests wait in a bounded queue and are decoded together.

    sched = Scheduler(served, max_batch_size=8, max_queue=64); sched.start()
    sched.submit(job)              # from the event loop; APIError 429 when max_queue jobs already wait
    await sched.call(fn)           # run fn() on the engine thread between batches (image generation)

Policy, batching at arrival: when the engine is free it takes the jobs waiting (up to max_batch_size, those
with the same sampling settings as the oldest, in arrival order) and runs them as one batch; jobs that arrive
meanwhile wait for the next batch. A job whose client left (`Job.cancel`) before its batch starts is dropped;
during the batch it stops receiving tokens. With an engine that has the slot API, `ContinuousScheduler`
(below) admits waiting jobs into free slots between decode steps instead.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import traceback
from typing import Callable

from lwm.serve.errors import APIError


class Scheduler:
    def __init__(self, served, *, max_batch_size: int = 8, max_queue: int = 64, mesh=None):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_queue={max_queue} >= 0")
        self.served, self.max_batch_size, self.max_queue = served, max_batch_size, max_queue
        self.mesh = mesh
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.batches = 0                     # batches run (tests check that concurrent requests shared one)
        self.max_rows = 0                    # the largest batch run

    # ---------------------------------------------------------------------------------- any thread
    def _full(self) -> bool:
        return len(self.waiting) >= self.max_queue

    def submit(self, job) -> None:
        with self.cond:
            if self._full():
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (--max_queue="
                                    f"{self.max_queue}); retry later", code="queue_full")
            self.waiting.append(job)
            self.cond.notify_all()

    async def call(self, fn: Callable):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self._full():
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting (--max_queue="
                                    f"{self.max_queue}); retry later", code="queue_full")
            self.waiting.append((fn, future))
            self.cond.notify_all()
        return await asyncio.wrap_future(future)

    def stats(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running": len(self.running), "batches": self.batches,
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
            self.thread.join(timeout=30)

    # ------------------------------------------------------------------------------- engine thread
    def _take(self):
        """The next call, or the next batch of jobs (oldest first, same settings); None when stopping."""
        with self.cond:
            while True:
                while self.waiting and getattr(self.waiting[0], "cancelled", None) is not None \
                        and self.waiting[0].cancelled.is_set():
                    self.waiting.popleft().finish("cancelled")
                if self.stopping:
                    return None
                if self.waiting:
                    break
                self.cond.wait()
            head = self.waiting[0]
            if isinstance(head, tuple):
                return self.waiting.popleft()
            key = self.served.batch_key(head)
            batch = []
            for item in list(self.waiting):
                if len(batch) == self.max_batch_size:
                    break
                if not isinstance(item, tuple) and not item.cancelled.is_set() \
                        and self.served.batch_key(item) == key:
                    batch.append(item)
                    self.waiting.remove(item)
            self.running = batch
            return batch

    def _loop(self) -> None:
        import contextlib

        import jax

        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            self._serve()

    def _serve(self) -> None:
        while True:
            work = self._take()
            if work is None:
                return
            if isinstance(work, tuple):
                fn, future = work
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:          # handed to the awaiting request
                        future.set_exception(e)
                continue
            try:
                self.served.generate_batch(work)
            except Exception as e:
                traceback.print_exc()
                for job in work:
                    job.finish("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self.cond:
                    self.batches += 1
                    self.max_rows = max(self.max_rows, len(work))
                    self.running = []
