"""Decode and prefill speed of the generation engine (lwm.inference.engine) beside the physical limits
measured in the same run: decode ms/token against the read-once floor (KV-cache bytes + weight bytes over
the memory bandwidth measured in the same run), prefill tokens/s against the measured matmul rate (MFU).

Hardware: any; the defaults (`debug` preset, fp32, 1 device) take ~10 minutes on 2 busy CPU cores.
    python benchmarks/sampling_bench.py                                       # the three tables
    python benchmarks/sampling_bench.py --preset=tiny --filled=1024 --allocated=2048 --prefill=1024   # seconds
    python benchmarks/sampling_bench.py --dtype=bf16 --cache_dtype=bf16       # e.g. on a GPU
Expected (debug, fp32, 1 CPU thread): decode at 1K filled flat within 1.2x from 2K to 32K allocated; decode
at 32K filled within ~3x of the read-once floor. Decode steps run on a state whose first `filled` slots are
marked filled (their values do not change the cost); each figure is the best of --iters timed calls.

Timing: on a shared machine wall time measures the neighbours, so every figure (the memory bandwidth and
the matmul rate too) is this process's CPU time (time.process_time), with XLA held to one thread (--threads=1,
the default) so that CPU time and work agree; --threads=0 keeps XLA's thread pool and times wall-clock.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--cache_dtype", default="", help="KV cache dtype (default: the model's)")
    p.add_argument("--filled", default="4096,16384,32768,65536", help="decode: filled lengths (allocated = filled + steps)")
    p.add_argument("--allocated", default="2048,4096,8192,16384,32768", help="decode at --fixed_filled tokens")
    p.add_argument("--fixed_filled", type=int, default=1024)
    p.add_argument("--rows", default="1,16", help="decode: batch rows of the greedy-against-sampled table")
    p.add_argument("--prefill", default="4096,16384,65536", help="prefill lengths")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed call")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (set before JAX starts)")
    p.add_argument("--threads", type=int, default=1, choices=(0, 1),
                   help="1: one XLA CPU thread, CPU-time figures; 0: XLA's thread pool, wall-clock figures")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if args.devices > 1:
        flags += f" --xla_force_host_platform_device_count={args.devices}"
    if args.threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm.checkpoint.formats import parse_float_dtype
    from lwm.inference.engine import Engine
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.inference.sampling import cast_params

    filled = [int(x) for x in args.filled.split(",") if x]
    allocated = [int(x) for x in args.allocated.split(",") if x]
    prefill = [int(x) for x in args.prefill.split(",") if x]
    dtype = jnp.dtype(parse_float_dtype(args.dtype))
    cache_dtype = jnp.dtype(parse_float_dtype(args.cache_dtype)) if args.cache_dtype else dtype
    longest = max(filled + allocated + prefill) + args.steps * (args.iters + 2)
    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=longest)
    params = LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = cast_params(params, dtype)
    engine = Engine(LLaMAForCausalLM(cfg, dtype=dtype, param_dtype=dtype), params, eos_id=-1, pad_id=0,
                    cache_dtype=cache_dtype)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * cache_dtype.itemsize

    clock = time.process_time if args.threads == 1 else time.perf_counter

    def best(fn, iters):
        times = []
        for _ in range(iters):
            t0 = clock()
            jax.block_until_ready(fn())
            times.append(clock() - t0)
        return min(times)

    # Physical limits, measured now: memory bandwidth (the better of a read-only pass, a sum, and an in-place
    # update, read + write, of a 256 MiB array) and the matmul rate.
    def measure_bandwidth():
        big = jnp.ones((64 * 1024 * 1024,), jnp.float32)
        total = jax.jit(jnp.sum)
        total(big).block_until_ready()
        read_bw = big.nbytes / best(lambda: total(big), 5)
        bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)
        holder = [bump(big)]

        def bump_once():
            holder[0] = bump(holder[0])
            return holder[0]

        return max(read_bw, 2 * holder[0].nbytes / best(bump_once, 5)), read_bw

    bandwidth, read_bw = measure_bandwidth()
    n = 2048
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    matmul_rate = 2 * n ** 3 / best(lambda: mm(a), 5)

    print(f"preset {args.preset}: D={cfg.hidden_size} L={cfg.num_hidden_layers} N={cfg.num_attention_heads} "
          f"K={cfg.kv_heads} H={cfg.head_dim} V={cfg.vocab_size} chunk={cfg.scan_key_chunk_size} dtype={args.dtype} "
          f"cache={cache_dtype.name} backend={jax.default_backend()} ({jax.device_count()} devices)")
    print(f"clock: {'CPU time, 1 XLA thread' if args.threads == 1 else 'wall, XLA thread pool'}; measured: memory "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s (read-only {read_bw / 1e9:.1f}), {dtype.name} matmul {matmul_rate / 1e9:.1f} "
          f"GFLOP/s; weights {weight_bytes / 2**20:.1f} MiB, KV cache {kv_bytes_per_token} B/token", flush=True)

    def decode_ms(fill: int, alloc: int, rows: int = 1, temperature: float = 0.0) -> float:
        """ms per step of `args.steps` decode steps for `rows` slots with `fill` tokens each in a cache of
        `alloc`, every row greedy (temperature 0) or sampling at `temperature`."""
        state = engine.init_state(rows, alloc)
        seg = jnp.zeros((rows, alloc), jnp.int32).at[:, :fill].set(1)
        full = lambda value, dtype: jnp.full((rows,), value, dtype)
        state = state._replace(cache=dict(state.cache, segment_ids=seg), index=full(fill, jnp.int32),
                               position=full(fill, jnp.int32), budget=full(1 << 30, jnp.int32),
                               active=jnp.ones((rows,), bool), temperature=full(temperature, jnp.float32))
        state, _, _ = engine.step(state, args.steps)                               # compile
        times = []
        for _ in range(args.iters):
            t0 = clock()
            state, toks, _ = engine.step(state, args.steps)                        # host read-back included
            times.append(clock() - t0)
        return 1e3 * min(times) / args.steps

    print(f"\ndecode, {args.fixed_filled} tokens filled, by allocated length ({args.steps} steps per call, batch 1)")
    print(f"{'allocated':>9} {'ms/token':>9} {'vs first':>8}")
    first = None
    for alloc in allocated:
        ms = decode_ms(args.fixed_filled, alloc)
        first = first or ms
        print(f"{alloc:>9} {ms:>9.2f} {ms / first:>8.2f}", flush=True)

    print(f"\ndecode, {args.fixed_filled} tokens filled, greedy rows against sampling rows (temperature 1): the "
          f"random draw (Gumbel noise over V={cfg.vocab_size} logits per row) runs only when some row samples")
    print(f"{'rows':>9} {'greedy ms':>10} {'sampled ms':>11} {'sampled/greedy':>15}")
    for rows in [int(x) for x in args.rows.split(",") if x]:
        alloc = args.fixed_filled + args.steps * (args.iters + 2)
        greedy, sampled = decode_ms(args.fixed_filled, alloc, rows), decode_ms(args.fixed_filled, alloc, rows, 1.0)
        print(f"{rows:>9} {greedy:>10.2f} {sampled:>11.2f} {sampled / greedy:>15.2f}", flush=True)

    print("\ndecode by filled length beside the read-once floor ((KV bytes + weight bytes) / memory bandwidth)")
    print(f"{'filled':>9} {'KV MiB':>7} {'ms/token':>9} {'floor ms':>9} {'ratio':>6}")
    for fill in filled:
        ms = decode_ms(fill, fill + args.steps * (args.iters + 2))
        kv = kv_bytes_per_token * fill
        floor = 1e3 * (kv + weight_bytes) / bandwidth
        print(f"{fill:>9} {kv / 2**20:>7.0f} {ms:>9.2f} {floor:>9.2f} {ms / floor:>6.1f}", flush=True)

    print("\nprefill (one prompt, batch 1): tokens/s and MFU against the measured matmul rate")
    print(f"{'tokens':>9} {'first s':>8} {'s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
    rng = np.random.default_rng(0)
    per_token = 2 * (weight_bytes // dtype.itemsize - 2 * cfg.vocab_size * cfg.hidden_size)   # matmul weights
    for t in prefill:
        prompt = rng.integers(3, cfg.vocab_size, size=t).tolist()
        run = lambda: engine.prefill_batch([prompt], t, t)[0]
        t0 = clock()
        jax.block_until_ready(run())
        first_s = clock() - t0
        s = best(run, 1 if t > 32768 else 2)
        # matmuls of the layers for every token, causal attention (QK^T and PV over half the square),
        # the output head for the last token only (lwm.inference.engine prefill)
        flops = per_token * t + 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t * t / 2 \
            + 2 * cfg.hidden_size * cfg.vocab_size
        print(f"{t:>9} {first_s:>8.2f} {s:>8.2f} {t / s:>9.0f} {flops / s / 1e9:>8.1f} "
              f"{flops / s / matmul_rate:>6.2f}", flush=True)
    print(f"\nuptime: {os.popen('uptime').read().strip()}", file=sys.stderr)


if __name__ == "__main__":
    main()
