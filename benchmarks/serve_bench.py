"""`lwm.serve` under load beside the engine it serves, in one run: requests/s, output tokens/s, p50/p95
time-to-first-token (TTFT) and latency at concurrency 1, 4 and 16, and the engine's direct rates.

    python benchmarks/serve_bench.py                       # debug preset, 64-token prompts, 32 new tokens
    python benchmarks/serve_bench.py --preset=tiny --new_tokens=16 --levels=1,4

Setup: the preset with random weights and a small sentencepiece tokenizer; the server (`create_app` +
uvicorn, continuous batching, max_batch_size = the highest level, its shapes compiled at start-up by
--warmup_prompt_lengths) runs in this process; the load comes from a separate process, so client and server do
not share a Python interpreter: `--client=aiohttp` (default; its HTTP parser is C, as in vLLM's serving
benchmark) streams the server-sent events; `--client=httpx` uses httpx2 (pure Python), `--client=openai` the
official `openai` client (AsyncOpenAI), whose per-chunk parsing costs the 2-core machine CPU time that the
server then lacks. The client process's CPU share is printed per level. Every request is greedy on its own
prompt of --prompt_tokens token ids (/v1/completions), so the server and the direct engine produce the same
tokens. Each level runs twice untimed, then --requests_per_slot requests per client (at least --min_requests)
are timed, as --blocks blocks one after another from one client process.

Direct references, same prompts, same engine (the server idle meanwhile), after a compile run, --repeats
times each before the first block of a level, between its blocks and after the last. The machine's speed
drifts within a run (the range is printed), so each block's output tok/s is compared with the direct
batched runs right before and after it, and a level's ratio is the median of its blocks' (all printed). The
pause between blocks (the direct runs, about half a second) is shorter than the scheduler's demand window, so
the server keeps the level's demand as under a steady load; before the first block it forgets the last level.
  direct batched   `Engine.generate` of the top level's prompts at once (no streaming): new tokens / wall time
  direct first     `Engine.generate` of 1 prompt with max_new_tokens=2: the prefill plus one decode step
                   (the engine draws token 0 from the prefill's logits and token 1 in its first step); the
                   TTFT ratio uses the p50 over all of a level's requests and the median of its direct runs
Targets: at 16, server output tok/s >= 0.8x direct batched; at 1, p50 TTFT <= 1.2x direct first.
Print the load average beside the figures: the machine may be shared.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    p.add_argument("--requests_per_slot", type=int, default=16, help="requests per level = this x concurrency, "
                   "at least --min_requests")
    p.add_argument("--min_requests", type=int, default=32,
                   help="timed requests per level at least (percentiles of a low level need samples)")
    p.add_argument("--steps_per_call", type=int, default=16,
                   help="the server's --decode_steps_per_call (decode steps per engine call while no request waits)")
    p.add_argument("--batch_wait_ms", type=float, default=20.0, help="the server's --batch_wait_ms")
    p.add_argument("--prefix_cache_mb", type=int, default=0,
                   help="the server's --prefix_cache_mb (0: off, prompts prefilled whole and batched, as the figures "
                        "of docs/serve.md up to issue 23; -1: `python -m lwm.serve`'s default, every prompt "
                        "prefilled alone, in chunks, through a prefix cache)")
    p.add_argument("--blocks", type=int, default=4,
                   help="each level's timed requests run as this many blocks, one after another, with the direct "
                        "references timed before the first, between blocks and after the last")
    p.add_argument("--repeats", type=int, default=2,
                   help="direct references: timed runs of each at every point between blocks")
    p.add_argument("--client", choices=("aiohttp", "httpx", "openai"), default="aiohttp",
                   help="the load's client: aiohttp (C HTTP parser; pip install -e '.[bench]'), httpx2 (pure "
                        "Python) or the official openai client")
    return p.parse_args(argv)


def _percentile(xs, q):
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _load(url: str, blocks: list, new_tokens: int, concurrency: int, kind: str, go: "mp.Queue",
          out: "mp.Queue") -> None:
    """Client process: the streamed completions of each block of prompts, `concurrency` at a time, a block
    when `go` says so. Puts ("floor", http_s) first, http_s the median of 10 GET /v1/models round trips (what
    HTTP and the two processes cost without the model); then per block (wall_s, rows, cpu_s) with rows =
    [(ttft_s, latency_s, tokens)] and cpu_s this process's CPU seconds over the block."""
    import asyncio
    import json

    body = lambda prompt: dict(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True)

    async def stream_openai(client, prompt):               # yields the token ids of each chunk
        stream = await client.completions.create(**body(prompt), extra_body={"return_token_ids": True})
        async for chunk in stream:
            for c in chunk.choices:
                yield (c.model_extra or {}).get("token_ids") or []

    async def stream_httpx(client, prompt):
        async with client.stream("POST", url + "/v1/completions", json={**body(prompt), "return_token_ids": True}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:]).get("choices", ()):
                        yield c.get("token_ids") or []

    async def stream_aiohttp(client, prompt):
        async with client.post(url + "/v1/completions", json={**body(prompt), "return_token_ids": True}) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    for c in json.loads(line[6:]).get("choices", ()):
                        yield c.get("token_ids") or []

    async def run():
        if kind == "aiohttp":
            try:
                import aiohttp
            except ImportError:
                raise SystemExit("serve_bench --client=aiohttp needs aiohttp: pip install -e '.[bench]' (or pass "
                                 "--client=httpx)") from None

            client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 1),
                                           timeout=aiohttp.ClientTimeout(total=600))

            async def models():
                async with client.get(url + "/v1/models") as r:
                    await r.read()
            stream, close = stream_aiohttp, client.close
        elif kind == "openai":
            import openai

            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            stream, models, close = stream_openai, client.models.list, client.close
        else:
            import httpx2

            client = httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=concurrency + 1))
            stream, close = stream_httpx, client.aclose
            models = lambda: client.get(url + "/v1/models")
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt, rows):
            async with gate:
                t0 = time.perf_counter()
                ttft, tokens = None, 0
                async for ids in stream(client, prompt):
                    if ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += len(ids)
                rows.append((ttft, time.perf_counter() - t0, tokens))

        floor = []                                         # API round trips that run no model
        for _ in range(10):
            t0 = time.perf_counter()
            await models()
            floor.append(time.perf_counter() - t0)
        out.put(("floor", sorted(floor)[len(floor) // 2]))
        for prompts in blocks:
            await asyncio.get_running_loop().run_in_executor(None, go.get)
            rows = []
            t0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(p, rows) for p in prompts))
            out.put((time.perf_counter() - t0, rows, time.process_time() - cpu0))
        await close()

    asyncio.run(run())


def main(argv=None):
    args = parse_args(argv)
    import tempfile

    import jax
    import numpy as np

    from lwm.inference.engine import Engine
    from lwm.inference.loader import random_params
    from lwm.model.shapes import param_shapes
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.serve import create_app
    from lwm.text.tokenizer import train_sentencepiece

    levels = [int(x) for x in args.levels.split(",")]
    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=args.prompt_tokens + args.new_tokens + 64)
    model = LLaMAForCausalLM(cfg)
    params = random_params(param_shapes(cfg), cfg)                 # host-drawn: nothing to compile
    words = ("the quick brown fox jumps over a lazy dog while world models read long videos and text in one "
             "million token context with ring attention packing").split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_sentencepiece([" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(400)],
                                  f"{tmp}/t.model", 400)
    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    # Token-id prompts (BOS first), different for every request; ids avoid BOS/EOS.
    per_level = {c: max(c * args.requests_per_slot, args.min_requests) for c in levels}
    n_max = max(per_level.values())
    if not 1 <= args.blocks <= min(per_level.values()):
        raise SystemExit(f"--blocks={args.blocks}: give 1 to {min(per_level.values())} (the fewest timed requests of a "
                         f"level: --requests_per_slot x concurrency, at least --min_requests)")
    prompts = [[tok.bos_id] + rng.integers(3, tok.vocab_size, args.prompt_tokens - 1).tolist() for _ in range(n_max)]

    # ---- direct references (after a compile run each), timed before, between and after the blocks of each level:
    # the machine's speed drifts over a run, so each block is compared with the runs right around it
    top = max(levels)
    direct_runs = {"batched": [], "first": [], "ttft": []}
    direct_fns = (("batched", lambda: engine.generate(prompts[:top], args.new_tokens)),
                  ("first", lambda: engine.generate(prompts[:1], 2)),       # prefill + one decode step
                  ("ttft", lambda: engine.generate(prompts[:1], 1)))        # prefill + drawing token 0
    for name, fn in direct_fns:                                             # compile runs
        out = fn()
        if name == "batched":
            direct_tokens = sum(len(t) for t in out.tokens)

    def measure_direct() -> dict:
        """--repeats timed runs of each direct reference (the server idle); returns {name: [seconds]}."""
        got = {}
        for name, fn in direct_fns:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                got.setdefault(name, []).append(time.perf_counter() - t0)
            direct_runs[name] += got[name]
        return got

    # ---- the server
    import threading

    import uvicorn

    cache = None
    if args.prefix_cache_mb:
        from ml_collections import ConfigDict

        from lwm.inference.runtime import prefix_cache_from_flags

        cache = prefix_cache_from_flags(engine, ConfigDict(dict(prefix_cache_mb=args.prefix_cache_mb,
                                                                prefix_cache_block=0)))
    app = create_app(engine, tok, model_name="bench", max_batch_size=top, max_queue=4 * n_max, prefix_cache=cache,
                     default_max_tokens=args.new_tokens, decode_steps_per_call=args.steps_per_call,
                     warmup_prompt_lengths=[args.prompt_tokens], batch_wait_ms=args.batch_wait_ms)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")

    def load(blocks, concurrency, between=lambda k: None):
        """One client process over `blocks` (lists of prompts), one after another; between(k) runs right
        before block k starts, and between(len(blocks)) after the last. Returns (http floor s, [(wall s,
        rows, client cpu s) per block])."""
        go, q = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_load, args=(url, blocks, args.new_tokens, concurrency, args.client, go, q))
        proc.start()
        _, http_s = q.get()
        got = []
        for k in range(len(blocks)):
            between(k)
            go.put(True)
            got.append(q.get())
        between(len(blocks))
        proc.join()
        return http_s, got

    window = app.state.scheduler.demand_window_s + 0.2        # the scheduler forgets the previous level
    for _ in range(2):                                        # runs of every level before the timed ones (the
        for c in levels:                                      # server compiled its shapes at start: warmup)
            load([prompts[:c]], c)
            time.sleep(window)
    rows, inside, floors, cpus, around, block_x = [], [], [], [], [], []
    med = lambda xs: float(np.median(xs))
    for c in levels:
        n = per_level[c]
        blocks = [prompts[k * n // args.blocks:(k + 1) * n // args.blocks] for k in range(args.blocks)]
        sets = []

        def between(k):
            sets.append(measure_direct())
            if k == 0:
                time.sleep(window)
                app.state.scheduler.finished.clear()

        http_s, got = load(blocks, c, between)
        around.append({name: med([x for d in sets for x in d[name]]) for name in sets[0]})
        rate_around = [direct_tokens / med(before["batched"] + after["batched"])      # each block's direct rate
                       for before, after in zip(sets, sets[1:])]
        block_x.append([sum(r[2] for r in res) / wall / rate for (wall, res, _), rate in zip(got, rate_around)])
        floors.append(http_s)
        wall = sum(g[0] for g in got)
        cpus.append(sum(g[2] for g in got) / wall)
        server_side = list(app.state.scheduler.finished)
        inside.append((c, _percentile([r[2] for r in server_side if r[2] is not None], 50),
                       _percentile([r[3] for r in server_side if r[3] is not None], 50)))
        res = [r for g in got for r in g[1]]
        ttft = [r[0] for r in res if r[0] is not None]
        lat = [r[1] for r in res]
        toks = sum(r[2] for r in res)
        rows.append((c, n, n / wall, toks / wall, _percentile(ttft, 50), _percentile(ttft, 95),
                     _percentile(lat, 50), _percentile(lat, 95)))
    server.should_exit = True
    thread.join(timeout=30)
    batched_s, first_s, ttft_s = med(direct_runs["batched"]), med(direct_runs["first"]), med(direct_runs["ttft"])
    direct_rate = direct_tokens / batched_s
    spread = [direct_tokens / t for t in (max(direct_runs["batched"]), min(direct_runs["batched"]))]

    load_avg = os.getloadavg()
    print(f"lwm.serve on {args.preset} (random weights), prompts {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens greedy, {os.cpu_count()} CPUs, JAX {jax.__version__} {jax.default_backend()}, load average "
          f"{load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")
    print(f"direct batched ({top} rows): {direct_rate:8.1f} output tok/s ({direct_tokens} tokens in {batched_s:.3f} s; "
          f"median of all {len(direct_runs['batched'])} runs, range {spread[0]:.1f}-{spread[1]:.1f}; each block is "
          f"compared with the {2 * args.repeats} runs right before and after it)")
    print(f"direct first (prefill + 1 decode step, 1 row): {first_s * 1e3:8.1f} ms; the engine's own time to first "
          f"token (prefill + drawing token 0): {ttft_s * 1e3:.1f} ms")
    print(f"client: {args.client}; server warmup (compiles at start-up): {app.state.scheduler.warmup_s:.1f} s")
    print()
    print("| concurrency | requests | req/s | output tok/s | direct batched tok/s around | x direct batched "
          "(median of blocks) | blocks' x direct batched | TTFT p50 ms | TTFT p95 ms | direct first ms around "
          "| x direct first | latency p50 ms | latency p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (c, n, rps, tps, t50, t95, l50, l95), ref, xs in zip(rows, around, block_x):
        rate = direct_tokens / ref["batched"]
        print(f"| {c} | {n} | {rps:.2f} | {tps:.1f} | {rate:.1f} | {med(xs):.2f} | {' '.join(f'{x:.2f}' for x in xs)} "
              f"| {t50 * 1e3:.1f} | {t95 * 1e3:.1f} | {ref['first'] * 1e3:.1f} | {t50 / ref['first']:.2f} | "
              f"{l50 * 1e3:.1f} | {l95 * 1e3:.1f} |")
    print(f"\nHTTP floor: GET /v1/models round trip ({args.client} client) from the client process, median of 10 before "
          f"each level: {', '.join(f'{f * 1e3:.1f}' for f in floors)} ms")
    print(f"client process CPU, share of one core while timed: {', '.join(f'{c:.2f}' for c in cpus)}")
    print("\nthe same requests timed inside the server (from submit to the scheduler, no HTTP, no client):")
    print("| concurrency | TTFT p50 ms | x direct first | latency p50 ms |")
    print("|---|---|---|---|")
    for (c, t50, l50), ref in zip(inside, around):
        print(f"| {c} | {t50 * 1e3:.1f} | {t50 / ref['first']:.2f} | {l50 * 1e3:.1f} |")
    by = {r[0]: (r, ref, xs) for r, ref, xs in zip(rows, around, block_x)}
    if top in by:
        x = med(by[top][2])
        print(f"\ntarget at {top}: output tok/s >= 0.8x direct batched (median of the {args.blocks} blocks' ratios): "
              f"{x:.2f}x ({'met' if x >= 0.8 else 'NOT met'})")
    if 1 in by:
        x = by[1][0][4] / by[1][1]["first"]
        print(f"target at 1: TTFT p50 <= 1.2x direct first: {x:.2f}x ({'met' if x <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
