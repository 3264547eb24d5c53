"""Attention forward+backward time and peak memory vs sequence length: dense, blockwise, ring (4 devices).

Hardware: any CPU (the ring runs on 4 simulated host devices that share the cores); numbers are for
comparing memory scaling, not speed. Expect dense memory to grow as T^2 and be skipped past ~16K on a
24 GiB machine, blockwise/ring memory to grow linearly, ring per-device memory to be ~1/4 of blockwise.

    python benchmarks/attention_bench.py --lengths 1024,2048,4096 --iters 2
    python benchmarks/attention_bench.py            # 1K .. 64K, batch 1, 2 heads of 128 (the debug model)

Every row runs in a fresh subprocess, so its peak RSS is its own. "compiled peak" is the XLA executable's
memory_analysis() temp + argument + output bytes (per device for the ring). Rows whose estimated memory
exceeds --mem_fraction of the available memory are skipped with the estimate, and so are rows that run
past --row_timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RING_DEVICES = 4
RSS_OVERHEAD = 1.7  # measured: dense at 16K had a 12.2 GiB compiled peak and a 20.4 GiB process RSS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--lengths",
        default=",".join(str(1024 * 2**i) for i in range(7)),
        help="comma-separated sequence lengths (default 1K..64K)",
    )
    p.add_argument("--impls", default="dense,blockwise,ring", help="subset of dense,blockwise,ring")
    p.add_argument("--heads", type=int, default=2, help="query heads N (debug model: 2)")
    p.add_argument("--kv_heads", type=int, default=0, help="kv heads K (0: same as --heads)")
    p.add_argument("--head_dim", type=int, default=128, help="head dim H (debug model: 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q_chunk", type=int, default=512)
    p.add_argument("--k_chunk", type=int, default=512)
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (median)")
    p.add_argument(
        "--mem_fraction",
        type=float,
        default=0.5,
        help="skip rows whose estimated bytes (or compiled peak x RSS_OVERHEAD) exceed this "
        "fraction of the available memory",
    )
    p.add_argument("--row_timeout", type=float, default=1800.0, help="seconds per row before it is skipped")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    bad = set(args.impls.split(",")) - {"dense", "blockwise", "ring"}
    if bad:
        p.error(f"--impls: unknown {sorted(bad)}; allowed: dense, blockwise, ring")
    return args


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (falls back to total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_bytes(impl: str, T: int, args) -> int:
    """Rough peak bytes of one forward+backward (float32), used to skip rows before running them."""
    B, N, K, H = args.batch, args.heads, args.kv_heads, args.head_dim
    io = 4 * B * T * H * (3 * N + 3 * K + 2 * N)  # q, do, out, dq, lse ... plus k, v, dk, dv
    if impl == "dense":
        return io + 6 * 4 * B * N * T * T  # scores, mask, probs and cotangents: ~6 live (B, N, T, T) f32
    chunk = 4 * 4 * B * N * args.q_chunk * args.k_chunk
    return 3 * io + chunk  # the ring holds extra rotating kv blocks but splits T over devices per device


def run_worker(spec: dict) -> dict:
    """Runs one row in this (fresh) process: compile, memory analysis, warm-up, timed iterations."""
    if spec["impl"] == "ring":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={RING_DEVICES}"
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lwm.attention import attention

    B, T, N, K, H = spec["batch"], spec["T"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    impl = spec["impl"]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32)
    do = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(
            lambda q, k, v: attention(q, k, v, impl=impl, q_chunk=spec["q_chunk"], k_chunk=spec["k_chunk"]),
            q,
            k,
            v,
        )
        return (out, *vjp(do))

    mesh = None
    if impl == "ring":
        mesh = Mesh(
            np.array(jax.devices()[:RING_DEVICES]).reshape(1, 1, 1, RING_DEVICES), ("dp", "fsdp", "tp", "sp")
        )
        shard = NamedSharding(mesh, P(None, "sp", None, None))
        q, k, v, do = (jax.device_put(x, shard) for x in (q, k, v, do))

    def timed():
        fn = jax.jit(fwd_bwd)
        compiled = fn.lower(q, k, v, do).compile()
        mem = compiled.memory_analysis()
        peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        if peak * RSS_OVERHEAD > spec["budget_bytes"]:
            return dict(
                status="skipped",
                peak=peak,
                note=f"skipped: compiled peak {peak / 2**30:.1f} GiB x {RSS_OVERHEAD} > budget",
            )
        jax.block_until_ready(compiled(q, k, v, do))  # warm-up
        times = []
        for _ in range(spec["iters"]):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, do))
            times.append(time.perf_counter() - t0)
        return dict(status="ok", time=float(np.median(times)), peak=peak)

    if mesh is not None:
        with jax.set_mesh(mesh):
            row = timed()
    else:
        row = timed()
    row["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["devices"] = len(mesh.devices.flat) if mesh is not None else 1
    return row


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(run_worker(json.loads(args.worker))))
        return
    budget = int(available_bytes() * args.mem_fraction)
    header = (
        f"batch {args.batch}, heads {args.heads} (kv {args.kv_heads}) x {args.head_dim}, chunks "
        f"{args.q_chunk}/{args.k_chunk}, float32, forward+backward, budget {gib(budget)}"
    )
    print(f"# attention_bench: {header}\n")
    print("| impl | T | devices | fwd+bwd time (s) | compiled peak (temp+arg+out) | process peak RSS | note |")
    print("|---|---|---|---|---|---|---|")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for T in (int(x) for x in args.lengths.split(",")):
        for impl in args.impls.split(","):
            devices = RING_DEVICES if impl == "ring" else 1
            est = estimate_bytes(impl, T, args)
            if est > budget:
                print(
                    f"| {impl} | {T} | {devices} | - | - | - | skipped: estimated {gib(est)} > budget |",
                    flush=True,
                )
                continue
            spec = dict(
                impl=impl,
                T=T,
                batch=args.batch,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                q_chunk=args.q_chunk,
                k_chunk=args.k_chunk,
                iters=args.iters,
                budget_bytes=budget,
            )
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout, env=env)
            except subprocess.TimeoutExpired:
                print(
                    f"| {impl} | {T} | {devices} | - | - | - | skipped: over {args.row_timeout:.0f} s |",
                    flush=True,
                )
                continue
            lines = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
                print(
                    f"| {impl} | {T} | {devices} | - | - | - | failed (rc {proc.returncode}): {err} |", flush=True
                )
                continue
            row = json.loads(lines[-1][4:])
            time_s = f"{row['time']:.3f}" if row["status"] == "ok" else "-"
            print(
                f"| {impl} | {T} | {row['devices']} | {time_s} | {gib(row.get('peak'))} | {gib(row['rss'])} "
                f"| {row.get('note', '')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
