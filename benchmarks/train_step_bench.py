"""Tokens/s, MFU and peak memory of one full training step (forward, backward, AdamW) of a preset.

Purpose: the core model's speed/memory figures: the real train step of `lwm.train` (lwm.training.compile:
  loss with metrics, AdamW with clipping, sharded state, donation) without the data pipeline (the entry point
  has its own benchmark, train_bench.py).
Hardware: any; defaults are for a 2-core CPU. Expected on 2 CPU cores, `debug` preset, batch 1, fp32:
  ~2200 / ~1700 / ~950 tok/s at 2K / 8K / 32K with chunk 512 (quiet; the original: 950 / 660 / 220), MFU
  ~67-72%, memory linear in sequence length (see docs/ring_attention.md and docs/train.md).
  (Measured with the benchmark's former hand-written step, loss and plain AdamW only; not yet re-measured
  with the real step, which adds clipping and the metrics.)
Usage: python benchmarks/train_step_bench.py --seq 2048,8192 [--devices 4 --mesh_dim 1,1,1,4 --impl ring]
Each row runs in a fresh subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.parallel import multihost
    from lwm.parallel.sharding import check_model_mesh, make_mesh
    from lwm.training import optimizer as optimizer_lib
    from lwm.training import steps as ts
    from lwm.training.compile import shard_train_step

    # Matmul rate of this machine, measured in the same process: fp32 (n x n) @ (n x n).
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        mm(a).block_until_ready()
        reps += 1
    matmul_flops = 2 * n**3 * reps / (time.perf_counter() - t0)

    seq = args.row
    updates = dict(attention_impl=args.impl, scan_query_chunk_size=args.chunk, scan_key_chunk_size=args.chunk,
                   max_sequence_length=max(seq, 2048), remat_block=args.remat, scan_mlp=args.scan_mlp,
                   scan_mlp_chunk_size=args.chunk)
    cfg = LLaMAConfig.load(args.preset).replace(**updates)
    mesh = make_mesh(args.mesh_dim)
    check_model_mesh(cfg, mesh, seq_len=seq, batch_size=args.batch)
    # The real step as lwm.train compiles it (lwm.training.compile): loss_fn with its metrics, AdamW with
    # clipping, the state sharded by the parameter table, state and RNG donated.
    task = ts.Task(LLaMAForCausalLM(cfg), "text", 1.0, 0.0, args.loss_chunk)
    tx, schedule = optimizer_lib.make_optimizer({"adamw_optimizer": {"lr": 1e-4, "lr_warmup_steps": 0,
                                                                     "lr_schedule_type": "warmup_constant"}})
    step = shard_train_step(task, tx, schedule, mesh)
    compiled = step.lower(args.batch, seq).compile()
    mem = compiled.memory_analysis()
    if args.compile_only:  # memory plan of the step without running it (for lengths too slow to time)
        temp = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        return dict(seq=seq, devices=len(jax.devices()), mesh=args.mesh_dim, impl=args.impl, step_s=float("nan"),
                    tokens_per_s=float("nan"), mfu=float("nan"), matmul_gflops=matmul_flops / 1e9,
                    compiled_gb=temp / 1e9, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                    loss=float("nan"))
    with jax.set_mesh(mesh):
        state = step.init(multihost.replicate(np.zeros(2, np.uint32), step.replicated))
        rng = multihost.replicate(np.ones(2, np.uint32), step.replicated)
        data = np.random.default_rng(0)
        tokens = data.integers(0, cfg.vocab_size, (args.batch, seq + 1)).astype(np.int32)
        batch = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:],
                     loss_masks=np.ones((args.batch, seq), np.float32),
                     target_vision_masks=np.zeros((args.batch, seq), bool))
        batch = multihost.global_batch(batch, mesh, None)
        state, rng, metrics = compiled(state, rng, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, rng, metrics = compiled(state, rng, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    loss = multihost.host_array(metrics["loss"])
    dt = float(np.median(times))
    tok_s = args.batch * seq / dt
    flops_per_token = ts.flops_per_token(step.state_shapes.params["params"], cfg, seq)
    temp = getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0) + \
        getattr(mem, "output_size_in_bytes", 0)
    return dict(seq=seq, devices=len(jax.devices()), mesh=args.mesh_dim, impl=args.impl, step_s=dt,
                tokens_per_s=tok_s, mfu=tok_s * flops_per_token / matmul_flops,
                matmul_gflops=matmul_flops / 1e9, compiled_gb=temp / 1e9,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, loss=float(loss))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq", default="2048,8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mesh_dim", default="1,-1,1,1")
    p.add_argument("--impl", default="blockwise")
    p.add_argument("--chunk", type=int, default=512, help="attention q/k chunk (512 is fastest on CPU)")
    p.add_argument("--loss_chunk", type=int, default=1024)
    p.add_argument("--remat", default="")
    p.add_argument("--scan_mlp", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile_only", action="store_true", help="report the compiled memory plan, do not run")
    p.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row is not None:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
               JAX_PLATFORMS="cpu")
    print(f"preset={args.preset} batch={args.batch} impl={args.impl} mesh={args.mesh_dim} "
          f"devices={args.devices} chunk={args.chunk} remat={args.remat or 'off'}")
    print("| seq | step s | tokens/s | MFU | matmul GFLOP/s | compiled GB | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seq in [int(s) for s in args.seq.split(",")]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row", str(seq)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            reason = (out.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:80]
            print(f"| {seq} | failed: {reason} | | | | | |")
            continue
        r = json.loads(lines[-1][7:])
        print(f"| {seq} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.0f}% | "
              f"{r['matmul_gflops']:.0f} | {r['compiled_gb']:.2f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
