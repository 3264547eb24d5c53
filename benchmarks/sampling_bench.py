"""Prefill and decode throughput of `lwm.sampling.Sampler` for a preset (random weights), one row per
(context length, batch): prefill tokens/s over the whole prompt, decode tokens/s over the new tokens.

Hardware: any; the defaults (`debug` preset, 4K and 16K tokens, 1 device) take ~1 minute on 2 CPU cores.
    python benchmarks/sampling_bench.py                                   # debug, 4096 and 16384, batch 1
    python benchmarks/sampling_bench.py --preset=tiny --lengths=1024 --new_tokens=16    # seconds
    python benchmarks/sampling_bench.py --devices=4 --mesh_dim=1,1,1,4 --attention_impl=ring
Each row is the best of --iters runs after one compile run.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--lengths", default="4096,16384", help="prompt lengths (tokens), comma-separated")
    p.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--attention_impl", default="blockwise")
    p.add_argument("--chunk", type=int, default=0, help="scan_query/key_chunk_size; 0 keeps the preset's")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (set before JAX starts)")
    p.add_argument("--mesh_dim", default="1,-1,1,1")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
        os.environ.setdefault("NPROC", str(4 * args.devices))   # room for concurrent CPU collectives
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm.checkpoint import parse_float_dtype
    from lwm.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.sampling import Sampler, cast_params
    from lwm.sharding import make_mesh, match_partition_rules, named_shardings

    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    dtype = parse_float_dtype(args.dtype)
    cfg = LLaMAConfig.load(args.preset).replace(
        attention_impl=args.attention_impl, max_sequence_length=max(lengths) + args.new_tokens)
    if args.chunk:
        cfg = cfg.replace(scan_query_chunk_size=args.chunk, scan_key_chunk_size=args.chunk)
    mesh = make_mesh(args.mesh_dim)
    init_model = LLaMAForCausalLM(cfg.replace(attention_impl="blockwise"))
    params = init_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = cast_params(params, dtype)
    model = LLaMAForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    rows = []
    print(f"preset {args.preset}: D={cfg.hidden_size} L={cfg.num_hidden_layers} N={cfg.num_attention_heads} "
          f"V={cfg.vocab_size} chunk={cfg.scan_query_chunk_size} impl={cfg.attention_impl} mesh={dict(mesh.shape)} "
          f"dtype={args.dtype} backend={jax.default_backend()} ({jax.device_count()} devices)", flush=True)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, named_shardings(match_partition_rules(params, cfg), mesh))
        sampler = Sampler(model, params, eos_id=-1, pad_id=0)       # eos -1: every row runs the full budget
        rng = np.random.default_rng(0)
        for t in lengths:
            for b in batches:
                prompts = [rng.integers(3, cfg.vocab_size, size=t).tolist() for _ in range(b)]
                t0 = time.perf_counter()
                sampler.generate(prompts, args.new_tokens)
                compile_s = time.perf_counter() - t0
                best = None
                for _ in range(args.iters):
                    sampler.generate(prompts, args.new_tokens)
                    s = sampler.last_stats
                    if best is None or s["prefill_s"] + s["decode_s"] < best["prefill_s"] + best["decode_s"]:
                        best = dict(s)
                rows.append((t, b, best["padded_length"], compile_s, best["prefill_s"], b * t / best["prefill_s"],
                             best["decode_steps"], best["decode_s"], best["new_tokens"] / best["decode_s"]))
                print(f"  done T={t} B={b}", file=sys.stderr, flush=True)
    header = (f"{'tokens':>7} {'batch':>5} {'padded':>7} {'first_s':>8} {'prefill_s':>9} {'prefill_tok/s':>13} "
              f"{'new':>4} {'decode_s':>8} {'decode_tok/s':>12}")
    print(header)
    for t, b, padded, c, ps, ptps, steps, ds, dtps in rows:
        print(f"{t:>7} {b:>5} {padded:>7} {c:>8.2f} {ps:>9.3f} {ptps:>13.0f} {steps:>4} {ds:>8.3f} {dtps:>12.1f}")
    return rows


if __name__ == "__main__":
    main()
