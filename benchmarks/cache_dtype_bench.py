"""KV-cache dtypes side by side: the cache's bytes (values + int8/fp8 scales) and decode ms/token at a filled
length, for bf16 (the baseline), int8 and fp8 caches of one fp32 model (lwm.attention.decode.quantize).

Hardware: any; the defaults (`debug` preset, 32K filled, 1 device, 1 XLA thread) take ~5 minutes on 2 busy
CPU cores.
    python benchmarks/cache_dtype_bench.py                                  # debug, 32K filled
    python benchmarks/cache_dtype_bench.py --preset=tiny --filled=1024      # seconds
Expected (debug, CPU): int8 and fp8 hold 0.52x the bf16 cache's bytes (H = 128: 128 + 4 scale bytes against
256); decode ms/token depends on the backend's int8/fp8 -> float32 conversion (see docs/long_context.md).
Decode steps run on a state whose first `filled` slots are marked filled (their values do not change the
cost); each figure is the best of --iters timed calls of --steps steps, in this process's CPU time.
"""
from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--filled", type=int, default=32768)
    p.add_argument("--cache_dtypes", default="bf16,int8,fp8", help="the first is the baseline of the ratios")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    p.add_argument("--iters", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import time

    import jax
    import jax.numpy as jnp

    from lwm.inference.engine import Engine, parse_cache_dtype
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    names = [x for x in args.cache_dtypes.split(",") if x]
    for name in names:
        parse_cache_dtype(name)                                  # one line for a bad name, before any compile
    alloc = args.filled + args.steps * (args.iters + 2)
    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=alloc)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    print(f"preset {args.preset}: L={cfg.num_hidden_layers} K={cfg.kv_heads} H={cfg.head_dim} fp32 model, "
          f"{args.filled} tokens filled of {alloc}, decode chunk {cfg.decode_chunk_size}, batch 1, "
          f"backend={jax.default_backend()}, CPU time of 1 XLA thread")
    print(f"{'cache':>6} {'KV MiB':>8} {'bytes/base':>10} {'ms/token':>9} {'time/base':>9}")
    base = None
    for name in names:
        engine = Engine(model, params, eos_id=-1, pad_id=0, cache_dtype=name)
        state = engine.init_state(1, alloc)
        kv = sum(x.nbytes for n, x in state.cache.items() if n != "segment_ids")
        seg = jnp.zeros((1, alloc), jnp.int32).at[:, :args.filled].set(1)
        full = lambda value, dtype: jnp.full((1,), value, dtype)
        state = state._replace(cache=dict(state.cache, segment_ids=seg), index=full(args.filled, jnp.int32),
                               position=full(args.filled, jnp.int32), budget=full(1 << 30, jnp.int32),
                               active=jnp.ones((1,), bool))
        state, _, _ = engine.step(state, args.steps)            # compile
        times = []
        for _ in range(args.iters):
            t0 = time.process_time()
            state, _, _ = engine.step(state, args.steps)
            times.append(time.process_time() - t0)
        ms = 1e3 * min(times) / args.steps
        base = base or (kv, ms)
        print(f"{name:>6} {kv / 2**20:>8.1f} {kv / base[0]:>10.3f} {ms:>9.2f} {ms / base[1]:>9.2f}", flush=True)
        del state, engine


if __name__ == "__main__":
    main()
