"""Long-context inference with and without the prefix cache and the chunked prefill (issue 23): (a) a two-turn
conversation over one document, turn 2's time to first token over turn 1's; (b) XLA's compiled prefill memory,
whole against one chunk; (c) exactness, chunked prefill logits against whole prefill logits and turn 2's tokens
with the cache against without.

Hardware: any; the defaults (`debug` preset, fp32, 1 device, random weights, documents of random ids) took
10-13 minutes on this workplace's 2-core CPU under load ~15, most of it the 32K prefills; --quick (tiny preset)
is compile-bound: 24 s at load ~2, 96 s at load ~14.
    python benchmarks/long_context_bench.py                 # 16K and 32K documents; memory at 16K, 64K, 128K
    python benchmarks/long_context_bench.py --quick         # tiny preset: a 1K document; memory at 2K, 8K
    python benchmarks/long_context_bench.py --skip=memory,exactness     # (a) only
Expected (debug, CPU; docs/long_context.md "Benchmarks: prefix cache and chunked prefill"): turn 2 / turn 1
time to first token ~0.04 (16K) and ~0.03 (32K) with the prefix cache and the engine's default chunk (or turn 2
in chunks of one block, 128), ~0.2 / ~0.14 with an explicit --chunk=2048 (every chunk is computed at the full
width: turn 2's 36 new tokens cost a 2048-token chunk), ~1 without the cache; chunked prefill temporaries flat
in T (16 MiB; the cache, a donated argument, grows), whole prefill temporaries linear in T (137 MiB at 16K,
1090 MiB at 128K); chunked logits within 1e-6 of whole; turn 2's tokens identical with and without the cache.

(a) Turn 1 = document + question 1, `--new_tokens` greedy tokens (answer 1); turn 2 = document + question 1 +
answer 1 + question 2. "prefix cache" runs `Engine.generate(..., prefix_cache=pc, prefill_chunk=C)` with a fresh
prefix cache per conversation (turn 1 misses and stores the blocks, turn 2 reuses them), turn 1 with C =
--chunk (0: none given, the engine's default), turn 2 once with C = --chunk and once more with C =
--tail_chunk; "whole prefill" is the default (no cache, one whole prefill per turn). Time to first token is
generate's `stats['time_to_first_token_s']` (wall: prefill + drawing token 0); "cpu" is this process's CPU
seconds over each turn's whole generate call (prefill + token 0 + the other --new_tokens - 1 decode steps),
with XLA's Eigen multithreading off (--threads=1, the default; XLA still ran up to 2 threads here), less
sensitive than wall time to the other jobs on a shared machine. Compile time is excluded: each mode first runs
the whole conversation once over another random document of the same length (same shapes, so every compile
happens there; its times are printed as "warm-up", compile included), then the measured conversation over a
fresh document.
(b) `Engine.lower_prefill` (one prompt of T, cache of T slots) and `Engine.lower_prefill_chunk` (one chunk of
`--chunk` tokens, 2048 for 0, against a cache of T slots, the cache donated), compiled only, never run:
memory_analysis()'s temp, argument and output sizes and the bytes of the output aliased to an argument.
(c) Max |logit difference| of `Engine.prefill(prompt, chunk=C)` (C = --chunk, 2048 for 0) against
`Engine.prefill(prompt)` (turn 1's prompt, fp32) at each document length.
"""
from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--docs", default="16384,32768", help="document lengths (tokens) of the conversations")
    p.add_argument("--memory_lengths", default="16384,65536,131072", help="prompt lengths T of the memory table")
    p.add_argument("--chunk", type=int, default=0, help="--prefill_chunk of the chunked prefill; 0: (a) passes "
                   "none (the engine's default with a prefix cache), (b) and (c) use 2048")
    p.add_argument("--tail_chunk", type=int, default=0, help="(a) also runs turn 2 with this --prefill_chunk "
                   "(the tokens after the cached prefix are prefilled in chunks of it; 0: the prefix cache block)")
    p.add_argument("--question", type=int, default=16, help="tokens per question")
    p.add_argument("--new_tokens", type=int, default=4, help="greedy tokens per answer")
    p.add_argument("--budget_mb", type=float, default=1024, help="the prefix cache's budget")
    p.add_argument("--block", type=int, default=0, help="prefix cache block (slots; 0: the decode chunk)")
    p.add_argument("--threads", type=int, default=1, choices=(0, 1),
                   help="1: XLA's Eigen multithreading off (CPU seconds ~ work, robust to a shared machine's "
                   "load); 0: XLA's default")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: conversation, memory, exactness")
    p.add_argument("--quick", action="store_true", help="small sizes: --preset=tiny "
                   "--docs=1024 --memory_lengths=2048,8192 --chunk=256 (< 1 minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.docs, args.memory_lengths, args.chunk = "tiny", "1024", "2048,8192", 256
    try:
        args.docs = [int(x) for x in args.docs.split(",") if x]
        args.memory_lengths = [int(x) for x in args.memory_lengths.split(",") if x]
    except ValueError:
        p.error("--docs / --memory_lengths: comma-separated integers")
    if min(args.docs + args.memory_lengths + [args.question, args.new_tokens]) < 1 or args.chunk < 0:
        p.error("--docs, --memory_lengths, --question, --new_tokens: each must be >= 1; --chunk >= 0")
    args.skip = {x for x in args.skip.split(",") if x}
    if args.skip - {"conversation", "memory", "exactness"}:
        p.error(f"--skip={','.join(sorted(args.skip))}: choose among conversation, memory, exactness")
    return args


def conversation(engine, doc, questions, new_tokens, pc, chunks):
    """Two turns over `doc` (module docstring (a)); with a prefix cache `pc`, turn 1 is prefilled in chunks of
    chunks[0] and turn 2 once per entry of `chunks` (each reusing the blocks turn 1 stored). Returns (ttft of
    turn 1, [ttft of turn 2 per chunk], [cached tokens of turn 2 per chunk], [turn 2's answer per chunk], CPU
    seconds of turn 1's generate call, [the same of turn 2's per chunk])."""
    def turn(prompt, chunk):
        t0 = time.process_time()
        kw = dict(prefix_cache=pc, prefill_chunk=chunk) if pc is not None else {}
        r = engine.generate([prompt], new_tokens, **kw)
        return r, time.process_time() - t0

    turn1 = doc + questions[0]
    r1, cpu1 = turn(turn1, chunks[0])
    turn2 = turn1 + r1.tokens[0] + questions[1]
    r2 = [turn(turn2, c) for c in (chunks if pc is not None else chunks[:1])]
    return (r1.stats["time_to_first_token_s"], [r.stats["time_to_first_token_s"] for r, _ in r2],
            [r.stats["cached_tokens"] for r, _ in r2], [r.tokens[0] for r, _ in r2], cpu1, [c for _, c in r2])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm.inference.engine import Engine
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    longest = max(args.docs + args.memory_lengths) + 3 * args.question + 2 * args.new_tokens + 4096
    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=longest)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    engine = Engine(model, params, eos_id=-1, pad_id=0)          # eos -1: a random model never stops early
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(3, cfg.vocab_size, n)]
    block = args.block or cfg.decode_chunk_size
    print(f"preset {args.preset}: L={cfg.num_hidden_layers} D={cfg.hidden_size} N={cfg.num_attention_heads} "
          f"K={cfg.kv_heads} H={cfg.head_dim}, fp32, {jax.device_count()} {jax.default_backend()} device(s), "
          f"attention {cfg.attention_impl}, prefill chunk {args.chunk or 'default'}, prefix cache block {block}, "
          f"{args.question}-token questions, {args.new_tokens}-token answers, "
          f"{'Eigen threads off' if args.threads else 'XLA default threads'}", flush=True)

    exact_prompts = {}
    if "conversation" not in args.skip:
        print("\n(a) two-turn conversation: time to first token (s, wall); warm-up = the same conversation over "
              "another document, compiles included")
        print(f"{'doc':>7} {'mode':>24} {'warm-up 1':>9} {'warm-up 2':>9} {'turn 1':>8} {'turn 2':>8} "
              f"{'2 / 1':>7} {'cpu 1':>7} {'cpu 2':>7} {'2 / 1':>6} {'cached':>7} {'turn-2 tokens':>14}")
        tail = args.tail_chunk or block
        for n in args.docs:
            doc, warm = ids(n), ids(n)
            questions = [ids(args.question), ids(args.question)]
            exact_prompts[n] = doc + questions[0]
            ref = None
            for mode in ("no cache", "cache"):
                make = (lambda: engine.prefix_cache(int(args.budget_mb * 2**20), block)) if mode == "cache" else None
                chunks = [args.chunk or None, tail]
                w1, w2, *_ = conversation(engine, warm, questions, args.new_tokens, make and make(), chunks)
                t1, t2, cached, answers, c1, c2 = conversation(engine, doc, questions, args.new_tokens,
                                                               make and make(), chunks)
                ref = ref or answers[0]
                names = ["whole prefill"] if mode == "no cache" else [f"prefix cache, chunk {c or 'default'}"
                                                                      for c in chunks]
                for i, name in enumerate(names):
                    same = "" if mode == "no cache" else ("identical" if answers[i] == ref else "DIFFER")
                    print(f"{n:>7} {name:>24} {w1:>9.2f} {w2[i]:>9.2f} {t1:>8.3f} {t2[i]:>8.3f} "
                          f"{t2[i] / t1:>7.3f} {c1:>7.2f} {c2[i]:>7.2f} {c2[i] / c1:>6.3f} {cached[i]:>7} {same:>14}",
                          flush=True)

    args.chunk = args.chunk or 2048
    if "memory" not in args.skip:
        print(f"\n(b) compiled prefill memory (MiB, XLA memory_analysis, nothing run): whole prompt of T against "
              f"one chunk of {args.chunk} with a T-slot cache")
        print(f"{'T':>7} {'KV cache':>9} {'whole temp':>10} {'args':>7} {'out':>7} {'chunk temp':>10} {'args':>7} "
              f"{'out':>7} {'aliased':>8}")
        mib = lambda b: b / 2**20
        per_token = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * 4
        for t in args.memory_lengths:
            row = f"{t:>7} {mib(per_token * t):>9.1f} "
            try:
                m = engine.lower_prefill(jax.ShapeDtypeStruct((1, t), jnp.int32), t).compile().memory_analysis()
                row += (f"{mib(m.temp_size_in_bytes):>10.1f} {mib(m.argument_size_in_bytes):>7.1f} "
                        f"{mib(m.output_size_in_bytes):>7.1f} ")
            except Exception as e:   # noqa: BLE001 -- report a compile that fails (e.g. host memory), go on
                row += f"{'failed: ' + type(e).__name__:>27} "
            m = engine.lower_prefill_chunk(1, args.chunk, t).compile().memory_analysis()
            row += (f"{mib(m.temp_size_in_bytes):>10.1f} {mib(m.argument_size_in_bytes):>7.1f} "
                    f"{mib(m.output_size_in_bytes):>7.1f} {mib(m.alias_size_in_bytes):>8.1f}")
            print(row, flush=True)

    if "exactness" not in args.skip:
        print(f"\n(c) chunked (chunk {args.chunk}) against whole prefill, fp32: max |logit difference| of turn 1's "
              "next-token logits")
        print(f"{'prompt':>7} {'max |diff|':>11} {'max |logit|':>11} {'same argmax':>11}")
        for n in args.docs:
            prompt = exact_prompts.get(n) or ids(n + args.question)
            whole = np.asarray(engine.prefill(prompt).logits[0])
            chunked = np.asarray(engine.prefill(prompt, chunk=args.chunk).logits[0])
            print(f"{len(prompt):>7} {np.abs(whole - chunked).max():>11.2e} {np.abs(whole).max():>11.2f} "
                  f"{str(whole.argmax() == chunked.argmax()):>11}", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
