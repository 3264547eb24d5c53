"""Seconds per needle-eval prompt at several context lengths, through the real harness (the `needle` task of
lwm.evals.needle on the one runner, lwm.evals.runner: placement, template, batching, greedy decode of the
answer budget), with a randomly initialised preset.

Hardware: any; defaults (`debug` preset, 2K/5K/8K tokens, 1 device) take a few minutes on 2 CPU cores.
Reference: the original LWM eval (scripts/eval_needle.py), debug preset, on a 2-core CPU: about 14, 23 and
34 s per prompt at 2K, 5K and 8K tokens (it decodes up to a whole block of new tokens per prompt).
    python benchmarks/needle_bench.py
    python benchmarks/needle_bench.py --preset=tiny --lengths=1000,2000 --prompts=4      # seconds
A random model never stops early, so every prompt runs the full --max_new_tokens budget.
"""
from __future__ import annotations

import argparse
import os
import random
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--lengths", default="2000,5000,8000")
    p.add_argument("--prompts", type=int, default=4, help="prompts per length (depths spread over 0..100)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--max_tokens_per_batch", type=int, default=40000)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mesh_dim", default="1,-1,1,1")
    p.add_argument("--attention_impl", default="blockwise")
    return p.parse_args(argv)


def synthetic_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ("the a startup market idea people money work time company question answer city river house world "
             "school friend letter garden window paper night reason problem number").split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(words))
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("NPROC", str(4 * args.devices))
    import tempfile
    import time

    import jax
    import jax.numpy as jnp

    import dataclasses

    from lwm.evals import needle, runner
    from lwm.evals.backends import JaxBackend
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.inference.engine import Engine
    from lwm.parallel.sharding import make_mesh, match_partition_rules, named_shardings
    from lwm.text.tokenizer import train_sentencepiece

    lengths = [int(x) for x in args.lengths.split(",")]
    text = synthetic_text(6 * max(lengths))
    with tempfile.TemporaryDirectory() as d:
        tok = train_sentencepiece([text[i:i + 4000] for i in range(0, len(text), 4000)] +
                                  [needle.TEMPLATE + needle.NEEDLE + " 0123456789?"], os.path.join(d, "t.model"), 400)
    cfg = LLaMAConfig.load(args.preset).replace(attention_impl=args.attention_impl,
                                                max_sequence_length=max(lengths) + 1024)
    mesh = make_mesh(args.mesh_dim)
    params = LLaMAForCausalLM(cfg.replace(attention_impl="blockwise")).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    model = LLaMAForCausalLM(cfg)
    haystacks = [tok.encode(text)]
    depths = [round(100 * i / max(1, args.prompts - 1)) for i in range(args.prompts)]
    rows = []
    print(f"preset {args.preset}, impl {cfg.attention_impl}, mesh {dict(mesh.shape)}, "
          f"{jax.device_count()} {jax.default_backend()} devices, budget {args.max_new_tokens} new tokens", flush=True)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, named_shardings(match_partition_rules(params, cfg), mesh))
        sampler = Engine(model, params, eos_id=-1, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
        backend = JaxBackend(sampler, tok, mesh, f"random {args.preset}")
        task = dataclasses.replace(needle.SINGLE, max_new_tokens=args.max_new_tokens)
        for length in lengths:
            trials = needle.single_needle_trials(haystacks, tok, [length], depths, random.Random(0))
            warm = runner.run(trials[:1], backend, task, max_tokens_per_batch=args.max_tokens_per_batch,
                              progress=False)   # compiles
            for _ in range(2):  # the first run compiles the batched shapes; the second is timed
                t0 = time.perf_counter()
                runner.run(trials, backend, task, max_tokens_per_batch=args.max_tokens_per_batch, progress=False)
            batched = (time.perf_counter() - t0) / len(trials)
            t0 = time.perf_counter()
            sampler.generate([trials[0]["prompt"]], args.max_new_tokens)
            single = time.perf_counter() - t0
            stats = sampler.last_stats
            rows.append((length, len(trials[0]["prompt"]), warm[0]["seconds"], single, stats["prefill_s"],
                         stats["decode_s"], batched))
            print(f"  done {length}", file=sys.stderr, flush=True)
    print(f"{'context':>7} {'prompt_tok':>10} {'first_s':>8} {'1-prompt_s':>10} {'prefill_s':>9} {'decode_s':>8} "
          f"{'batched_s/prompt':>16}")
    for length, n, first, single, ps, ds, batched in rows:
        print(f"{length:>7} {n:>10} {first:>8.2f} {single:>10.3f} {ps:>9.3f} {ds:>8.3f} {batched:>16.3f}")
    return rows


if __name__ == "__main__":
    main()
