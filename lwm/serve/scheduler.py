"""The batching scheduler: one thread owns the engine; requests wait in a bounded queue and share decode steps.

    sched = Scheduler(served, max_batch_size=8, max_queue=64); sched.start()
    sched.submit(job)              # from the event loop; APIError 429 when max_queue jobs already wait
    await sched.call(fn)           # run fn() on the engine thread between decode steps (image generation)

Continuous batching over the slot API of the one engine (`lwm.inference.engine.Engine`), as JetStream and
vLLM do. A step costs every row of its decode state, active or not, so the scheduler keeps a ladder of states
(1, 4, 16, ... rows up to max_batch_size, `_pools`: `Pool`s), all on the one engine (the engine is stateless:
everything per slot is in the decode state, so one engine's compiled calls serve every state and the moves
between them), and puts new jobs into the smallest one that holds the recent demand (`_targets`). Between
decode steps, the jobs admitted together are prefilled in batches (`_admit`: one prefill per ladder size of rows for jobs of the same
padded length) and inserted into free slots, which draws each job's first token from its prefill (handed to
the job before any decode step); every step draws one more token for every active slot; a slot is
freed as soon as its job ends (EOS, budget, a stop string, or its client left), and the next waiting job takes
it at the next step.
With a prefix cache or a prefill chunk (`prefix_cache=`, `prefill_chunk=`: `--prefix_cache_mb`, `--prefill_chunk`),
each admitted job is prefilled alone and in chunks instead (`_start_prefills`, `_prefill_work`: `ServedModel.
start_prefill`, `Engine.start_prefill`): its prompt at cache slots [0, n), the longest prefix the cache holds copied
in (`Job.cached_tokens`, the response's usage.prompt_tokens_details.cached_tokens), the rest prefilled one chunk at
a time. Its slot is held meanwhile (`prefilling`), and every scheduler step runs the decode step of the streams
already answering (one step while a prefill is part-way) and as many chunks as fit `max_step_tokens` less the
step's decode tokens (one chunk at least, so a prefill always advances; the prompt with the fewest tokens left
first; Sarathi-Serve's and vLLM's chunked prefill under a token budget): the streams keep answering while a long document arrives, each of their
tokens waiting for about one chunk. A finished prefill is inserted into its slot, which draws its first token.
A job whose client left before it started is dropped from the queue. While nothing decodes, the first
arrivals of a burst wait up to batch_wait_s for the rest (`_gather`); `warmup_prompt_lengths` compiles the
serving shapes of those prompt lengths before `start()` returns (`_warmup`).
Faults stay per request where they can be told apart: a batched prefill that fails is retried job by job
(`_insert`), so only the job that fails alone gets the error; a fault in feeding one job its tokens ends that
job alone (`_took`). A fault in a decode step itself (which serves every row at once, and may consume its
donated state) drops the decode states and resumes every running job from the tokens it has (`_recover`:
prefilled again, it goes on at its next draw, so its tokens equal an uninterrupted run's); a resumed job runs
alone until it makes a step, and a job that a fault follows (more than fault_retries in a row) ends alone with
one 500 whose message holds no internals (the traceback goes to the server's log). A job part-way through a
chunked prefill was in no decode call: it goes back to the front of the queue as it was. A fault in one job's
chunk ends that job alone.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
import traceback
from typing import Callable, Optional, Sequence

import numpy as np

from lwm.serve.errors import APIError
from lwm.serve.jobs import posts_batched



def _record(job) -> tuple:
    ttft = None if job.t_first is None else job.t_first - job.t_submit
    latency = None if job.t_done is None else job.t_done - job.t_submit
    return job.finish_reason, len(job.tokens), ttft, latency


def _infos(lp: list, row: int, emitted) -> Optional[list]:
    """Per token of decode row `row`, (logprob, top ids (K,), top log-probabilities (K,)) from an engine call's
    optional TokenLogprobs (`lp`: [] when not read, else [TokenLogprobs]); emitted: (n,) bool of a step's row,
    or None for `Engine.drawn`'s one token."""
    if not lp:
        return None
    x = lp[0]
    if emitted is None:
        return [(float(x.logprob[row]), x.top_ids[row], x.top_logprobs[row])]
    return [(float(a), b, c) for a, b, c in zip(x.logprob[row][emitted], x.top_ids[row][emitted],
                                                x.top_logprobs[row][emitted])]


@dataclasses.dataclass
class Pool:
    """One decode state of the ladder: the scheduler's decode slots [offset, offset + size) (indices into
    `Scheduler.running`) are rows [0, size) of `state`, a DecodeState of the one engine (None until first
    used, and after `_recover` dropped it)."""
    offset: int
    size: int
    state: Optional[object] = None

    def holds(self, slot: int) -> bool:
        return self.offset <= slot < self.offset + self.size


class Scheduler:
    def __init__(self, served, *, max_batch_size: int = 8, max_queue: int = 64, mesh=None,
                 steps_per_call: int = 16, warmup_prompt_lengths: Sequence[int] = (), batch_wait_s: float = 0.02,
                 fault_retries: int = 1, prefix_cache=None, prefill_chunk: Optional[int] = None,
                 max_step_tokens: Optional[int] = None):
        """prefix_cache: a `lwm.inference.prefix_cache.PrefixCache` of the served engine (None: none);
        prefill_chunk: tokens per prefill chunk (a multiple of sp; None: whole prompts without a prefix cache,
        `default_chunk` with one). Either one makes every prompt prefilled alone, in chunks (module docstring).
        max_step_tokens: tokens one scheduler step may run, decode rows x steps plus prefill chunk tokens
        (None: `default_max_step_tokens`). Raises ValueError naming the setting."""
        if max_batch_size < 1 or max_queue < 0 or steps_per_call < 1 or batch_wait_s < 0 or fault_retries < 0:
            raise ValueError(f"max_batch_size={max_batch_size} and steps_per_call={steps_per_call} (--decode_steps_per_"
                             f"call) must be >= 1, max_queue={max_queue}, batch_wait_s={batch_wait_s} and "
                             f"fault_retries={fault_retries} >= 0")
        self.prefix_cache = prefix_cache
        self.chunked = prefix_cache is not None or prefill_chunk is not None
        if prefill_chunk is not None and int(prefill_chunk) < 1:
            raise ValueError(f"--prefill_chunk={prefill_chunk}: must be >= 1 (0: whole prompts)")
        self.prefill_chunk = int(prefill_chunk) if prefill_chunk is not None else self.default_chunk(prefix_cache)
        if max_step_tokens is not None and int(max_step_tokens) < 1:
            raise ValueError(f"--max_step_tokens={max_step_tokens}: must be >= 1 (0: the default, one prefill "
                             "chunk + max_batch_size)")
        self.max_step_tokens = (int(max_step_tokens) if max_step_tokens else
                                self.default_max_step_tokens(self.prefill_chunk, max_batch_size))
        self.prefilling: dict = {}  # decode slot -> ChunkedPrefill of the job there
        self.prefill_chunks = 0     # chunks run
        self.decodes_amid_prefill = 0   # decode calls run while a prefill was part-way (between two of its chunks)
        self.fault_retries = int(fault_retries)   # decode faults in a row a job is resumed after (_recover)
        for n in warmup_prompt_lengths:
            if int(n) < 1 or int(n) + 1 > served.max_sequence_length:
                raise ValueError(f"--warmup_prompt_lengths: {n} is not a prompt length this model can serve (1 to "
                                 f"max_sequence_length - 1 = {served.max_sequence_length - 1})")
        self.served, self.max_batch_size, self.max_queue = served, max_batch_size, max_queue
        self.mesh, self.steps_per_call = mesh, int(steps_per_call)
        self.batch_wait_s = float(batch_wait_s)
        self.warmup_prompt_lengths = tuple(int(n) for n in warmup_prompt_lengths)
        self.warmup_s: Optional[float] = None       # how long the warmup took (None: no warmup)
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.pools: list = []      # the decode states (Pool), set by the engine thread
        self._recent: collections.deque = collections.deque()   # (time, jobs decoding or admitted at once)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.batches = 0            # decode calls made
        self.max_rows = 0           # the most jobs decoding at once (one round of steps)
        # (finish_reason, tokens, time to first token s, latency s) of recent jobs, newest last; timed from
        # submit(), so without HTTP (the benchmark prints them beside what its client sees)
        self.finished = collections.deque(maxlen=1024)

    @staticmethod
    def default_chunk(prefix_cache=None) -> int:
        """The chunk when only a prefix cache asks for chunking: the engine's (`default_prefill_chunk`, 2048 in
        whole blocks)."""
        from lwm.inference.engine import default_prefill_chunk

        return default_prefill_chunk(None if prefix_cache is None else prefix_cache.block_size)

    @staticmethod
    def default_max_step_tokens(chunk: int, max_batch_size: int) -> int:
        """--max_step_tokens=0: one prefill chunk plus one decode token per slot, so a step runs the streams'
        decode step and one chunk of a waiting prompt: each stream's next token waits for at most one chunk,
        and a long prompt still advances a chunk per step (a larger budget prefills faster and delays the
        streams' tokens more; vLLM's max_num_batched_tokens is the same knob)."""
        return int(chunk) + int(max_batch_size)

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
                    "prefilling": len(self.prefilling), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue}

    def start(self) -> "Scheduler":
        """Start the engine thread; returns once its warmup (if any) is done, and raises what the warmup
        raised."""
        self.stopping = False
        self._ready.clear()
        self._start_error = None
        self.thread = threading.Thread(target=self._loop, name="lwm-serve-engine", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
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
            try:
                data, _ = self.served.engine.mesh_sizes()
                pools = self.pools = self._pools(data)
                self.running = [None] * sum(p.size for p in pools)
                if self.warmup_prompt_lengths:
                    t0 = time.perf_counter()
                    self._warmup(pools)
                    self.warmup_s = time.perf_counter() - t0
            except BaseException as e:
                self._start_error = e
                return
            finally:
                self._ready.set()
            self._continuous(pools)

    def _warmup(self, pools) -> None:
        """Compile, before the first request, what serving a prompt of each length in warmup_prompt_lengths
        runs (as JetStream's model warmup and vLLM's start-up graph capture do), so no request waits for a
        compile: the batched prefill at every ladder size of rows, each decode state's insert of each size that
        fits it, its decode step at 1 and steps_per_call steps (one compiled step serves greedy and top-p
        slots; both are run), and the moves between states. Text prompts of a budget that fits their bucket
        (`ServedModel.prefill_key`); other shapes (vision prompts, a budget that forces sp-only padding) still
        compile on first use. With chunked prefills, each length's chunk of a prefix-cache miss (a hit's shorter
        remainder, and the block copies, compile on first use). Leaves every slot free."""
        from lwm.serve.jobs import Job, Sampling

        served, tok, engine = self.served, self.served.tokenizer, self.served.engine
        sizes = [p.size for p in pools]
        rules = (Sampling(max_tokens=2, temperature=0.0), Sampling(max_tokens=2, temperature=1.0, top_p=0.9))
        for pool in pools:
            if pool.state is None:
                pool.state = engine.init_state(pool.size, served.cache_length)

        def insert(state, job, rows):
            if not self.chunked:
                return served.insert_many(engine, state, [0], [job], rows)
            prefix = served.start_prefill(engine, job, None, self.prefill_chunk).run()
            return served.insert_prefilled(engine, state, 0, job, prefix)

        for n in self.warmup_prompt_lengths:
            prompt = [tok.bos_id] * n
            for pool in pools:
                for rows in (r for r in sizes if r <= pool.size and not (self.chunked and r != sizes[0])):
                    for sampling in rules:
                        job = Job(prompt, sampling, tok, None)
                        pool.state = insert(pool.state, job, rows)
                        engine.drawn(pool.state)
                        for k in sorted({1, self.steps_per_call}):
                            pool.state, _, _ = engine.step(pool.state, n_steps=k, keep=np.ones(pool.size, bool))
                        pool.state = engine.free(pool.state, 0)
            for src in pools:                                  # moves between every two states
                for dst in pools:
                    if src is dst:
                        continue
                    job = Job(prompt, rules[0], tok, None)
                    src.state = insert(src.state, job, sizes[0])
                    src.state, dst.state = engine.move(src.state, 0, dst.state, 0)
                    dst.state = engine.free(dst.state, 0)
                    engine.drawn(dst.state)

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
        """Decode states (`Pool`), a ladder of sizes data * (1, 4, 16, ...) up to max_batch_size (rounded up to
        whole data shards), all on the one engine. A step costs every row of its state whether active or
        not (debug preset on a CPU: about 4 ms at one row, 90 ms at 16), so requests go to the smallest state
        that holds the recent demand (`_targets`) and a step costs about the active rows."""
        big = data * math.ceil(self.max_batch_size / data)
        sizes, s = [], data
        while s < big:
            sizes.append(s)
            s *= 4
        sizes.append(big)
        pools, offset = [], 0
        for size in sizes:
            pools.append(Pool(offset, size))
            offset += size
        return pools

    def _targets(self, pools, n: int, demand: int) -> list:
        """Slots for n jobs admitted now. demand: the most jobs decoding or admitted at once over the last
        `demand_window_s` (this tick included). The jobs fill the smallest state of at least `demand` rows that
        has free rows (then the next larger ones, then any), so that requests that arrive one after another
        under a steady load of 16 share the 16-row state instead of scattering over small ones, and a lone
        request's step costs one row."""
        order = sorted(range(len(pools)), key=lambda i: (pools[i].size < min(demand, pools[-1].size), pools[i].size))
        out = []
        for i in order:
            for slot in range(pools[i].offset, pools[i].offset + pools[i].size):
                if len(out) < n and self.running[slot] is None:
                    out.append(slot)
        return out

    demand_window_s = 1.0

    def _demand(self, now: float, value: int) -> int:
        self._recent.append((now, value))
        return self._peak(now)

    def _peak(self, now: float) -> int:
        """The most jobs decoding or admitted at once over the last demand_window_s (0 when none)."""
        while self._recent and self._recent[0][0] < now - self.demand_window_s:
            self._recent.popleft()
        return max((v for _, v in self._recent), default=0)

    def _gather(self) -> None:
        """(Lock held.) When nothing is decoding and fewer jobs wait than the recent demand (`_peak`), wait
        up to batch_wait_s for the rest to arrive, so that they share one prefill and decode in step: under a
        steady load of N clients, a round of N answers ends at once and the N next requests come within a few
        milliseconds; admitting the first alone would put it a decode call ahead of the others for good
        (a dynamic batcher's queue delay, as Triton's max_queue_delay). A lone client (demand 1) never waits."""
        if self.batch_wait_s <= 0 or any(j is not None for j in self.running):
            return
        now = time.perf_counter()
        want, deadline = min(self._peak(now), self.max_batch_size), now + self.batch_wait_s
        while (not self.stopping and self.waiting and not isinstance(self.waiting[0], tuple)
               and len(self.waiting) < want and now < deadline):
            self.cond.wait(deadline - now)
            now = time.perf_counter()

    def _hold(self, now: float) -> bool:
        """(Lock held.) Whether the jobs waiting now stay in the queue for one more decode call, to start with
        the next round: when every job decoding ends within the next call (its max_tokens spent; an EOS or
        stop string only ends it sooner) and fewer jobs wait than the recent demand (`_peak`): the rest of the
        next round is still decoding.
        Under a steady load of N clients the rounds of N answers stay aligned: a request whose answer ended
        early (EOS, a stop string) comes back while its round still decodes; admitted at once, it would end a
        call after the others, the N - 1 next requests would wait for that call with one row active, and
        the split would repeat every round. Held, it waits at most one call and the next round shares one
        prefill (`_gather`)."""
        if self.batch_wait_s <= 0 or not self.waiting or isinstance(self.waiting[0], tuple):
            return False
        running = [j for j in self.running if j is not None and not j.finished]
        if not running or len(self.waiting) >= min(self._peak(now), self.max_batch_size):
            return False
        return all(j.sampling.max_tokens - len(j.tokens) <= self.steps_per_call for j in running)

    @staticmethod
    def _chunks(n: int, sizes: list) -> list:
        """Row counts of the batched prefills for n jobs, each one of the ladder's `sizes` (so the prefill
        compiles once per size): the smallest size >= n when that pads at most n rows, else the largest
        size <= n, repeated. E.g. with (1, 4, 16): 3 -> [4], 5 -> [4, 1], 9 -> [16]."""
        out = []
        while n > 0:
            up = min((s for s in sizes if s >= n), default=None)
            take = up if up is not None and up <= 2 * n else max(s for s in sizes if s <= n)
            out.append(take)
            n -= min(take, n)
        return out

    def _admit(self, pools, admit: list) -> None:
        """Prefill the admitted (slot, job) pairs, batched: jobs in the same state with the same prefill key
        share one prefill of a ladder size of rows; then insert them into their slots, which draws each job's
        first token from its prefill, and hand those tokens to the jobs at once (before any decode step: the
        time to first token is the prefill's). With chunked prefills, only starts each job's (`_start_prefills`)."""
        if self.chunked:
            self._start_prefills(admit)
            return
        engine = self.served.engine
        groups: dict = {}
        for slot, job in admit:
            p = next(k for k, q in enumerate(pools) if q.holds(slot))
            try:
                key = (p, self.served.prefill_key(engine, job))
            except APIError as e:
                job.finish("error", e)
                self._release(slot)
                continue
            groups.setdefault(key, []).append((slot, job))
        sizes = [q.size for q in pools]
        for (p, _), members in groups.items():
            pool = pools[p]
            if pool.state is None:
                pool.state = engine.init_state(pool.size, self.served.cache_length)
            start = 0
            for rows in self._chunks(len(members), sizes):
                part = members[start:start + rows]
                start += len(part)
                self._insert(pool, part, rows, sizes[0])
        self._first_tokens(pools, admit)

    def _first_tokens(self, pools, admit: list) -> None:
        """Hand the (slot, job) pairs just inserted their first tokens (drawn by the insert), at once."""
        engine = self.served.engine
        with posts_batched():                             # one event-loop wake-up for all first tokens
            for pool in pools:
                offset = pool.offset
                new = [(slot, job) for slot, job in admit if pool.holds(slot) and not job.finished]
                if not new:
                    continue
                want = any(job.logprobs for _, job in new)   # log-probabilities: read only when asked
                tokens, going, *lp = engine.drawn(pool.state, logprobs=want)
                ended = [slot - offset for slot, job in new
                         if self._took(slot, job, [int(tokens[slot - offset])], bool(going[slot - offset]),
                                       _infos(lp, slot - offset, None))]
                if ended:
                    pool.state = engine.free(pool.state, ended)

    def _failed_alone(self, slot: int, job, e: BaseException, what: str) -> None:
        """`job` (in `slot`) ends with its own error: an APIError as it is, anything else as one logged 500 whose
        message carries no internals."""
        if not isinstance(e, APIError):
            print(f"lwm.serve: the {what} of one request failed ({len(job.prompt)} prompt tokens):", flush=True)
            traceback.print_exception(e)
            e = APIError(500, f"the server failed to {what} this request (logged on the server)",
                         code="internal_error")
        job.finish("error", e)
        self._release(slot)

    def _start_prefills(self, admit: list) -> None:
        """Start the chunked prefill of each admitted (slot, job) (`ServedModel.start_prefill`: the prefix
        cache's blocks copied in, `Job.cached_tokens` set); `_prefill_work` runs their chunks."""
        for slot, job in admit:
            try:
                cp = self.served.start_prefill(self.served.engine, job, self.prefix_cache, self.prefill_chunk)
            except Exception as e:
                self._failed_alone(slot, job, e, "prefill")
                continue
            if not job.tokens:                      # a resumed job keeps what its first prefill found
                job.cached_tokens = int(cp.cached)
            self.prefilling[slot] = cp

    def _prefill_work(self, pools, decode_tokens: int) -> None:
        """Run prefill chunks, the job with the fewest tokens left first (a short prompt that arrives during a
        long one's prefill gets its first token after one chunk, not after the long prompt), while they fit
        max_step_tokens - decode_tokens (one chunk at least); insert each finished prefill into its slot and
        hand its job the first token.
        A job whose client left is dropped; a fault in one job's chunk ends that job alone; a fault in an
        insert that consumed its decode state raises (the caller resumes every job, `_recover`)."""
        budget, ran, done = self.max_step_tokens - decode_tokens, 0, []
        engine = self.served.engine
        for slot in sorted(self.prefilling, key=lambda s: self.prefilling[s].remaining):
            cp, job = self.prefilling[slot], self.running[slot]
            if job.finished:
                del self.prefilling[slot]
                if not job.done.is_set():
                    job.finish("cancelled")
                self._release(slot)
                continue
            try:
                while not cp.done and (ran == 0 or min(cp.chunk, cp.remaining) <= budget):
                    budget -= min(cp.chunk, cp.remaining)
                    cp.step()
                    ran += 1
                    self.prefill_chunks += 1
                prefix = cp.result() if cp.done else None
            except Exception as e:
                del self.prefilling[slot]
                self._failed_alone(slot, job, e, "prefill")
                continue
            if prefix is None:
                break                                       # the budget is spent
            del self.prefilling[slot]
            pool = next(q for q in pools if q.holds(slot))
            if pool.state is None:
                pool.state = engine.init_state(pool.size, self.served.cache_length)
            try:
                pool.state = self.served.insert_prefilled(engine, pool.state, slot - pool.offset, job, prefix)
            except Exception as e:
                import jax

                if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(pool.state)):
                    raise
                self._failed_alone(slot, job, e, "prefill")
                continue
            done.append((slot, job))
        if done:
            self._first_tokens(pools, done)

    def _insert(self, pool, part: list, rows: int, alone_rows: int) -> None:
        """Prefill and insert the (slot, job) pairs `part` as one batch of `rows` rows; when that fails, each
        job again alone (a batch of alone_rows rows, the ladder's smallest), so that a request that fails
        inside a batched prefill fails alone and its neighbours are served. A job that fails alone finishes
        with its error: an APIError as it is, anything else as one logged 500 whose message carries no
        internals. Raises (the caller fails every running job) only when the failed call consumed the decode
        state it was given (a fault inside the compiled insert, which donates the state)."""
        import jax

        def attempt(members, n_rows) -> Optional[BaseException]:
            try:
                pool.state = self.served.insert_many(self.served.engine, pool.state,
                                                     [s - pool.offset for s, _ in members], [j for _, j in members],
                                                     n_rows)
                return None
            except Exception as e:
                if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(pool.state)):
                    raise
                return e

        error = attempt(part, rows)
        if error is None:
            return
        tries = [(member, error) for member in part] if len(part) == 1 else \
                [(member, attempt([member], alone_rows)) for member in part]
        for (slot, job), e in tries:
            if e is None:
                continue
            if not isinstance(e, APIError):
                print(f"lwm.serve: the prefill of one request failed ({len(job.prompt)} prompt tokens):", flush=True)
                traceback.print_exception(e)
                e = APIError(500, "the server failed to prefill this request (logged on the server)",
                             code="internal_error")
            job.finish("error", e)
            self._release(slot)

    def _consolidate(self, pools) -> None:
        """Jobs decoding in smaller states move (`Engine.move`) into the largest state that is decoding, when
        it has free rows for all of them, so a round of decoding costs one step call: a step costs every row of
        its state, active or not. (A lone request starts in the one-row state; when others join in the
        16-row state it moves there instead of costing a one-row step every round.) A slot whose job is still
        prefilling (chunked) holds no row yet and stays."""
        busy = [p for p in pools if any(self._decoding(s) for s in range(p.offset, p.offset + p.size))]
        if len(busy) < 2:
            return
        engine = self.served.engine
        big = busy[-1]                                      # the ladder is ordered by size
        room = [s for s in range(big.offset, big.offset + big.size) if self.running[s] is None]
        for pool in busy[:-1]:
            slots = [s for s in range(pool.offset, pool.offset + pool.size) if self._decoding(s)]
            if len(slots) > len(room):
                continue
            for slot in slots:
                to = room.pop(0)
                pool.state, big.state = engine.move(pool.state, slot - pool.offset, big.state, to - big.offset)
                with self.cond:
                    self.running[to], self.running[slot] = self.running[slot], None

    def _decoding(self, slot: int) -> bool:
        """Whether decode slot `slot` holds a job that has a row in its decode state (not one still prefilling)."""
        return self.running[slot] is not None and slot not in self.prefilling

    def _took(self, slot: int, job, tokens: list, going: bool, infos=None) -> bool:
        """Feed `job` (in decode slot `slot`) the tokens its slot drew (infos: their log-probabilities, when
        read, `_infos`); going: whether the engine keeps the slot on. A job that ends here (EOS, a stop string,
        its budget, its client gone) gives up its slot;
        returns True then, and the caller frees the row in the engine's state (`Engine.free`, one call for
        all the rows that ended in a step). A fault in feeding the job (decoding its text) ends this job
        alone, as one logged 500."""
        try:
            job.feed_many(tokens, infos)
        except Exception as e:                          # this job's fault (its text, its stop strings): its own
            print("lwm.serve: one request failed while reading its tokens:", flush=True)
            traceback.print_exception(e)
            job.finish("error", APIError(500, "the server failed to read this request's tokens (logged on the "
                                              "server)", code="internal_error"))
        if not job.finished and not going:              # the engine ended it: budget spent
            job.finish("length")
        if job.finished:
            if not job.done.is_set():
                job.finish("cancelled")
            self._release(slot)
            return True
        return False

    def _continuous(self, pools) -> None:
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
                self._gather()
                if self.waiting and isinstance(self.waiting[0], tuple):
                    call = self.waiting.popleft()
                active = sum(j is not None for j in self.running)
                jobs = []
                held = self._hold(time.perf_counter()) or any(j is not None and j.suspect for j in self.running)
                while (call is None and not held and self.waiting and not isinstance(self.waiting[0], tuple)
                       and active + len(jobs) < self.max_batch_size):
                    if self.waiting[0].suspect and jobs:
                        break                             # a job resumed after a fault is admitted alone
                    jobs.append(self.waiting.popleft())
                    if jobs[-1].suspect:
                        break
                if jobs:
                    demand = self._demand(time.perf_counter(), active + len(jobs))
                    for slot, job in zip(self._targets(pools, len(jobs), demand), jobs):
                        self.running[slot] = job
                        admit.append((slot, job))
                many = bool(self.waiting) and not held
            if call is not None:
                self._run_call(call)
                continue
            try:
                self._admit(pools, admit)
                if self.prefilling:                       # chunks under the step's token budget
                    rows = sum(self._decoding(s) and not self.running[s].finished for s in range(len(self.running)))
                    self._prefill_work(pools, rows)
                self._consolidate(pools)
                n_steps = 1 if many or self.prefilling else self.steps_per_call
                self.max_rows = max(self.max_rows, sum(j is not None and not j.finished for j in self.running))
                engine = self.served.engine
                amid = bool(self.prefilling)              # a prefill is part-way: this step sits between chunks
                for pool in pools:
                    offset = pool.offset
                    jobs = [j if self._decoding(offset + row) else None
                            for row, j in enumerate(self.running[offset:offset + pool.size])]
                    if pool.state is None or all(j is None for j in jobs):
                        continue
                    keep = np.array([j is not None and not j.finished for j in jobs])
                    want = any(j is not None and j.logprobs for j in jobs)   # the log-probability step
                    pool.state, tokens, emitted, *lp = engine.step(pool.state, n_steps=n_steps, keep=keep,
                                                                   logprobs=want)
                    self.batches += 1
                    self.decodes_amid_prefill += amid
                    for job in jobs:                      # a step went through: a resumed job is cleared
                        if job is not None and job.suspect:
                            job.suspect, job.faults = False, 0
                    with posts_batched():                 # one event-loop wake-up per step
                        ended = [row for row, job in enumerate(jobs) if job is not None and self._took(
                            offset + row, job, [int(t) for t in tokens[row][emitted[row]]],
                            bool(emitted[row].any()) and bool(emitted[row, -1]), _infos(lp, row, emitted[row]))]
                    if ended:
                        pool.state = engine.free(pool.state, ended)
            except Exception as e:
                self._recover(pools, e)

    def _recover(self, pools, error: BaseException) -> None:
        """After a fault in a decode step or a compiled insert (either may have consumed its donated decode
        state), every decode state is dropped and each running job is resumed: put back at the front of the
        queue with the tokens it has, it is prefilled again with them (`ServedModel.insert_many`: recompute,
        as vLLM's preemption by recomputation) and goes on at its next draw, so its tokens equal an
        uninterrupted run's. A resumed job is admitted alone, with nothing else admitted until it has made a
        step (`suspect`); one that is part of more than `fault_retries` faults in a row (a fault that follows
        it) ends alone with one logged 500, and its neighbours, resumed again, are served. A job part-way
        through a chunked prefill (in no decode call) goes back to the queue as it was, ahead of the waiting."""
        print(f"lwm.serve: a decode call failed; resuming the {sum(j is not None for j in self.running)} running "
              f"requests from their tokens:", flush=True)
        traceback.print_exception(error)
        resumed, again = [], []
        for slot, job in enumerate(self.running):
            if job is None:
                continue
            if slot in self.prefilling:
                again.append(job)
                with self.cond:
                    self.running[slot] = None
                continue
            job.faults += 1
            if job.finished:
                self._release(slot)
            elif job.faults > self.fault_retries:
                job.finish("error", APIError(500, "the server failed while decoding this request (logged on the "
                                                  "server)", code="internal_error"))
                self._release(slot)
            else:
                job.suspect = True
                resumed.append(job)
                with self.cond:
                    self.running[slot] = None
        self.prefilling.clear()
        for pool in pools:
            pool.state = None
        with self.cond:
            self.waiting.extendleft(reversed(resumed + again))

    def _release(self, slot: int) -> None:
        with self.cond:
            job = self.running[slot]
            if job is not None:
                self.finished.append(_record(job))
            self.running[slot] = None
