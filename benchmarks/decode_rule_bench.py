"""ms per decode step of the stateless engine's one compiled step (lwm.inference.engine, docstring (f)): 8 slots all
greedy (the top-k/top-p sort skipped by the step's lax.cond) and 8 slots of which one samples with top-p (the sort
taken), each the best of 3 timed runs of --reps calls x 16 steps after a compile.

Hardware: any; the default (`debug` preset, fp32, random weights, 1 device) takes ~1 minute on 2 busy CPU cores.
    python benchmarks/decode_rule_bench.py                  # debug
    python benchmarks/decode_rule_bench.py --preset=tiny    # seconds
Expected (debug, this workplace's 2-core CPU): greedy ~4-8 ms/step depending on the neighbours' load, the same as
the engine before it became stateless (one compiled step per rule); one top-p row ~65 ms/step (a sort of 32K logits
per row). Wall-clock time: on a shared machine run it twice and read the best figures.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--reps", type=int, default=8, help="timed calls of 16 steps per run (greedy; top-p: a quarter)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from lwm.inference.engine import Engine
    from lwm.inference.sampling import SamplingConfig
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    cfg = LLaMAConfig.load(args.preset).replace(max_sequence_length=1024)
    model = LLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    engine = Engine(model, params, eos_id=-1, pad_id=0)
    rows, n, prompt = 8, 16, list(range(1, 100))
    cases = (("greedy", [SamplingConfig()] * rows, args.reps),
             ("one top-p row", [SamplingConfig(1.0, 0, 0.9)] + [SamplingConfig()] * (rows - 1), max(1, args.reps // 4)))
    for name, sampling, reps in cases:
        best = []
        for _ in range(3):
            state = engine.init_state(rows, 1024)
            prefix = engine.prefill(prompt)
            for s in range(rows):
                state = engine.insert(prefix, state, s, max_new_tokens=n * (reps + 2), sampling=sampling[s], seed=s)
            state, _, _ = engine.step(state, n)                       # compile (once) and warm
            jax.block_until_ready(state.token)
            t0 = time.perf_counter()
            for _ in range(reps):
                state, _, _ = engine.step(state, n)
            best.append((time.perf_counter() - t0) / (reps * n) * 1e3)
        print(f"{args.preset}, {rows} slots, {name}: {min(best):.2f} ms/step (best of 3 runs of {reps} x {n} steps)",
              flush=True)


if __name__ == "__main__":
    main()
