"""The server's chunked prefill: 8 streams decoding while a long prompt arrives, their p95 time between tokens
against the same streams alone, with the long prompt prefilled whole (one call) and in chunks.

    python benchmarks/serve_chunked_bench.py                          # debug preset, a 32K-token prompt
    python benchmarks/serve_chunked_bench.py --preset=tiny --long_tokens=2048 --chunks=256   # seconds, any CPU

Setup: the preset with random weights (host-drawn) and a small sentencepiece tokenizer; the server's scheduler
(`lwm.serve.scheduler.Scheduler`, the one `python -m lwm.serve` runs, without HTTP: this measures the
scheduling, not the sockets) with max_batch_size 9, one decode step per call (--decode_steps_per_call=1, so
each token is its own event and the time between tokens is a step's), no prefix cache. 8 greedy streams of
--stream_prompt tokens each decode; once every one has its first token, a prompt of --long_tokens ids arrives.
Time between tokens: the gaps between a stream's consecutive tokens (its job's token arrivals on the scheduler
thread); 'amid' counts the gaps that overlap the long prompt's prefill (from its arrival to its first token),
'alone' every gap of the same 8 streams with no long prompt. Modes:
  whole     --prefill_chunk=0: the long prompt in one prefill call (the server's batched whole prefill)
  chunks    --prefill_chunk=each of --chunks, --max_step_tokens default (one chunk + 9 decode tokens a step)
Each mode runs once untimed (compiles) and then --repeats times timed. Target: chunked p95 amid <= 2x alone.
Print the load average beside the figures: the machine may be shared.
"""
from __future__ import annotations

import argparse
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--long_tokens", type=int, default=32768)
    p.add_argument("--chunks", default="128,512", help="--prefill_chunk of each chunked mode")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream_prompt", type=int, default=64)
    p.add_argument("--stream_tokens", type=int, default=0,
                   help="tokens per stream (0: enough to outlast the chunked prefill: long_tokens / smallest chunk "
                        "+ 48)")
    p.add_argument("--repeats", type=int, default=1)
    return p.parse_args(argv)


def _p(xs, q):
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def main(argv=None):
    args = parse_args(argv)
    import os
    import tempfile

    import numpy as np

    from lwm.inference.engine import Engine
    from lwm.inference.loader import random_params
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.model.shapes import param_shapes
    from lwm.serve.jobs import Job, Sampling
    from lwm.serve.model import ServedModel
    from lwm.serve.scheduler import Scheduler
    from lwm.text.tokenizer import train_sentencepiece

    chunks = [int(c) for c in args.chunks.split(",")]
    new = args.stream_tokens or args.long_tokens // min(chunks) + 48
    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=args.long_tokens + 64)
    model = LLaMAForCausalLM(cfg)
    params = random_params(param_shapes(cfg), cfg)
    words = "the quick brown fox jumps over a lazy dog while world models read long videos".split()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_sentencepiece([" ".join(rng.choice(words, rng.integers(2, 30))) for _ in range(400)],
                                  f"{tmp}/t.model", 400)
    engine = Engine(model, params, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    served = ServedModel(engine, tok, "bench")

    class Timed(Job):
        """A job that keeps (time, tokens) of each delivery."""
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.arrivals = []

        def feed_many(self, tokens, infos=None):
            self.arrivals += [time.perf_counter()] * len(tokens)
            return super().feed_many(tokens, infos)

    streams = [[tok.bos_id] + rng.integers(3, tok.vocab_size, args.stream_prompt - 1).tolist()
               for _ in range(args.streams)]
    long = [tok.bos_id] + rng.integers(3, tok.vocab_size, args.long_tokens - 1).tolist()
    never = Sampling(max_tokens=new, temperature=0.0)

    def run(chunk, with_long: bool):
        sched = Scheduler(served, max_batch_size=args.streams + 1, batch_wait_s=0, steps_per_call=1,
                          prefill_chunk=chunk)
        jobs = [Timed(p, never, tok, None) for p in streams]
        for j in jobs:
            sched.submit(j)
        sched.start()
        try:
            while not all(j.tokens for j in jobs):
                time.sleep(0.0005)
            window = None
            if with_long:
                lj = Timed(long, Sampling(max_tokens=1, temperature=0.0), tok, None)
                t0 = time.perf_counter()
                sched.submit(lj)
                assert lj.done.wait(3600)
                window = (t0, lj.arrivals[0] if lj.arrivals else lj.t_done)
                while not all(j.finished or (j.arrivals and j.arrivals[-1] > window[1]) for j in jobs):
                    time.sleep(0.0005)                    # every stream's gap over the prefill has closed
            if with_long:                                 # the streams' later tokens are not measured
                for j in jobs:
                    j.cancel()
            assert all(j.done.wait(3600) for j in jobs)
        finally:
            sched.stop()
        gaps = []
        for j in jobs:
            t = np.asarray(j.arrivals)
            d = np.diff(t)
            if window is not None:                        # gaps that overlap the long prefill
                d = d[(t[1:] > window[0]) & (t[:-1] < window[1])]
            gaps += d.tolist()
        return gaps, window, sched

    rows = []
    for chunk in [None] + chunks:
        mode = "whole" if chunk is None else f"chunks of {chunk}"
        run(chunk, True)                                     # compiles: the streams' steps and the long prefill
        for _ in range(args.repeats):
            alone, _, _ = run(chunk, False)
            amid, window, sched = run(chunk, True)
            rows.append((mode, _p(alone, 95), _p(amid, 95), max(amid) if amid else float("nan"), len(amid),
                         window[1] - window[0], sched.decodes_amid_prefill))
    print(f"preset {args.preset}, long prompt {args.long_tokens} tokens, {args.streams} streams of "
          f"{args.stream_prompt}-token prompts, load average at the end {os.getloadavg()[0]:.1f}")
    print("| prefill | p95 between tokens, alone (ms) | p95 amid the long prefill (ms) | ratio | max gap (ms) "
          "| gaps amid | long prompt's first token (s) | decode calls amid its chunks |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, a, b, mx, n, ttft, amid in rows:
        print(f"| {mode} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.1f}x | {mx * 1e3:.0f} | {n} | {ttft:.1f} "
              f"| {amid} |")


if __name__ == "__main__":
    main()
