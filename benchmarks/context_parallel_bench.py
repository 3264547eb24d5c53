"""Context parallelism over sp: work balance, communication and memory of every strategy x load balance,
and `lwm.train` tokens/s under each strategy ('ulysses_ring' as ulysses_ring(u=U): inner groups of U devices).

Purpose: the figures of docs/context_parallel.md. Hardware: any; the compiled memory and the train rows run
on simulated CPU devices. Expected: plain causal ring ~(2 - 1/sp)x the even split; zigzag and striped
within 1.10x of even at sp=4 and 8; all-gather and Ulysses balanced by construction; ulysses_ring
balanced like the ring over sp/U groups, with the ring's bytes divided by about U.
Usage:
  python benchmarks/context_parallel_bench.py --part work            # seconds: FLOPs, critical path, bytes
  python benchmarks/context_parallel_bench.py --part memory --seq 8192   # compiles 27 programs
  python benchmarks/context_parallel_bench.py --part train --seq 8192,32768 --steps 3
  python benchmarks/context_parallel_bench.py --part train --devices 8 --seq 8192 --only "ring (today),..."
Part `work` counts the attention tiles every device executes, with the kernel's own skip rules (run pairs
wholly in the future skipped, key chunks past the diagonal skipped; lwm/attention/{ring,blockwise}.py), so
FLOPs are those executed, not the ideal. Bytes are counted from what each strategy sends (analytic).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from lwm.attention.layout import runs as _runs   # (num_runs, stride, run_len, starts(d)); group: 'ulysses_ring'

STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")
GROUPS = (2, 4)   # ulysses_ring's inner group sizes U benchmarked (those dividing sp with U < sp)


def variants(sp):
    """(name, strategy, U) of every strategy at this sp; ulysses_ring once per inner group size."""
    return [(s, s, 0) for s in STRATEGIES] + [(f"ulysses_ring(u={u})", "ulysses_ring", u) for u in GROUPS
                                              if u < sp and sp % u == 0]


# ------------------------------------------------------------------------------------ work (analytic)


def _tiles(n, k_offset, chunk, causal=True):
    """(forward tiles, backward tiles) the blockwise kernel runs for a run pair of n queries x n keys, the
    key shifted by k_offset (causal mask j <= i - k_offset over local indices)."""
    c = min(chunk, n)
    nq = nk = math.ceil(n / c)
    if not causal:
        return nq * nk, nq * nk
    fwd = sum(int(np.clip(((i + 1) * c - 1 - k_offset) // c + 1, 0, nk)) for i in range(nq))
    bwd = sum(nq - int(np.clip((k_offset + j * c) // c, 0, nq)) for j in range(nk))  # q chunks from the first visible
    return fwd, bwd


def block_work(balance, sp, local, d, e, chunk, group=1):
    """Tiles (fwd, bwd) device d's queries spend on device e's key/value block (group > 1: inner group d's
    queries on group e's block, `local` tokens each, as the ulysses_ring strategy's ring sees them)."""
    R, stride, n, starts = _runs(balance, sp, local, group)
    fwd = bwd = 0
    for a in starts(d):
        for b in starts(e):
            if b > a + stride * (n - 1):  # wholly masked run pair: skipped
                continue
            f, g = _tiles(n, -((a - b) // stride), chunk)
            fwd, bwd = fwd + f, bwd + g
    return fwd, bwd


def work_table(T, sp, N, K, H, chunk, dtype_bytes):
    """One row per strategy x balance: executed FLOPs per device, critical path, ratio to even, bytes."""
    local = T // sp
    rows = []
    tile = lambda c, n: 4 * c * c * H * n, lambda c, n: 10 * c * c * H * n  # fwd 2 matmuls, bwd 5
    for name, strategy, u in variants(sp):
        for balance in BALANCES:
            if strategy == "ulysses_ring":  # the ring over R = sp/u groups of T/R tokens, N/u heads per device
                R, r = sp // u, u // math.gcd(K, u)  # kv heads repeated r times to divide by u
                c = min(chunk, _runs(balance, sp, T // R, u)[2])
                w = [[block_work(balance, sp, T // R, g, e, chunk, u) for e in range(R)] for g in range(R)]
                flops = lambda fb: tile[0](c, N // u) * fb[0] + tile[1](c, N // u) * fb[1]
                per_group = [sum(flops(w[g][e]) for e in range(R)) for g in range(R)]
                per_dev = [per_group[d // u] for d in range(sp)]
                critical = sum(max(flops(w[g][(g - s) % R]) for g in range(R)) for s in range(R))
            elif strategy == "ulysses":  # every device: the whole causal sequence for N/sp heads
                c = min(chunk, T)
                f, g = _tiles(T, 0, chunk)
                per_dev = [(tile[0](c, N // sp) * f + tile[1](c, N // sp) * g)] * sp
                critical = per_dev[0]
            else:
                c = min(chunk, _runs(balance, sp, local)[2])
                w = [[block_work(balance, sp, local, d, e, chunk) for e in range(sp)] for d in range(sp)]
                flops = lambda fb: tile[0](c, N) * fb[0] + tile[1](c, N) * fb[1]
                per_dev = [sum(flops(w[d][e]) for e in range(sp)) for d in range(sp)]
                if strategy == "ring":  # lockstep: step s, device d holds block (d - s) mod sp
                    critical = sum(max(flops(w[d][(d - s) % sp]) for d in range(sp)) for s in range(sp))
                else:  # all-gather: one step, each device its own sum
                    critical = max(per_dev)
            even = sum(per_dev) / sp  # the same executed work split evenly
            ideal = 14 * N * H * T * (T + 1) / 2 / sp  # the causal triangle exactly, fwd (4) + bwd (10), over sp
            kv = 2 * local * K * H * dtype_bytes  # one device's K and V
            seg = local * 4
            if strategy == "ring":  # fwd: sp-1 hops of K, V, segment ids; bwd: the same plus f32 dK, dV, one more hop
                sent = (sp - 1) * (kv + seg) + (sp - 1) * (kv + seg) + sp * 2 * local * K * H * 4
            elif strategy == "all_gather":  # all-gather K, V, segment ids; reduce-scatter dK, dV
                sent = (sp - 1) * (kv + seg) + (sp - 1) * kv
            elif strategy == "ulysses":  # 4 all-to-alls fwd (q, k, v, out) and 4 bwd; kv heads repeated to divide sp
                r = sp // math.gcd(K, sp)
                a2a = (sp - 1) / sp * local * H * dtype_bytes * (2 * N + 2 * K * r)
                sent = 2 * a2a + (sp - 1) * seg
            else:  # ulysses_ring: the group all-to-alls as Ulysses over u, then the ring of R groups on blocks
                a2a = (u - 1) / u * local * H * dtype_bytes * (2 * N + 2 * K * r)   # of T/R tokens, K r / u heads
                blk, blk_seg = 2 * (T // R) * (K * r // u) * H * dtype_bytes, (T // R) * 4
                sent = (2 * a2a + (u - 1) * seg + 2 * (R - 1) * (blk + blk_seg)
                        + R * 2 * (T // R) * (K * r // u) * H * 4)
            rows.append(dict(sp=sp, strategy=name, balance=balance, flops_dev_max=max(per_dev),
                             critical=critical, even=even, ratio=critical / even, ideal=critical / ideal, bytes_dev=sent))
    return rows


def part_work(args):
    print(f"T={args.total} tokens, N={args.heads} K={args.kv_heads} H={args.head_dim}, chunk {args.chunk}, "
          f"{args.dtype_bytes}-byte K/V; forward + backward attention of one layer")
    print("| sp | strategy | balance | TFLOP executed / device (max) | critical path TFLOP | even split TFLOP "
          "| critical / even | critical / ideal | MB sent / device |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for sp in (2, 4, 8):
        for r in work_table(args.total, sp, args.heads, args.kv_heads, args.head_dim, args.chunk, args.dtype_bytes):
            print(f"| {sp} | {r['strategy']} | {r['balance']} | {r['flops_dev_max'] / 1e12:.3f} | "
                  f"{r['critical'] / 1e12:.3f} | {r['even'] / 1e12:.3f} | {r['ratio']:.3f} | "
                  f"{r['ideal']:.3f} | {r['bytes_dev'] / 1e6:.1f} |")
    print("even: the row's own executed work split evenly over sp (balance); ideal: the causal triangle "
          "T(T+1)/2 exactly, over sp (balance and the kernel's tile waste on the diagonal together)")
    print(f"(plain ring, analytic: 2 - 1/sp = {', '.join(f'{2 - 1 / s:.3f}' for s in (2, 4, 8))} for sp = 2, 4, 8)")


# --------------------------------------------------------------------------------- compiled memory

def _memory_child(args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from lwm.attention.context_parallel import context_parallel_attention

    sp, T = args.sp_row, args.total
    mesh = Mesh(np.array(jax.devices()[:sp]).reshape(1, 1, 1, sp), ("dp", "fsdp", "tp", "sp"))
    q = jax.ShapeDtypeStruct((1, T, args.heads, args.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, args.kv_heads, args.head_dim), jnp.float32)
    out = {}
    with jax.set_mesh(mesh):
        for name, strategy, u in _chosen(variants(sp), args):
            for balance in BALANCES:
                f = lambda q, k, v: context_parallel_attention(q, k, v, strategy=strategy, load_balance=balance,
                                                               ulysses_size=u, q_chunk=args.chunk,
                                                               k_chunk=args.chunk).sum()
                compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
                m = compiled.memory_analysis()
                out[f"{name}/{balance}"] = (m.temp_size_in_bytes + m.argument_size_in_bytes
                                            + m.output_size_in_bytes)
    return out


def _chosen(rows, args):
    """The rows whose name (first field) --only lists (all without --only)."""
    only = [x for x in args.only.split(",") if x]
    return [r for r in rows if not only or r[0] in only]


def part_memory(args):
    print(f"compiled memory per device (XLA memory analysis: arguments + outputs + temporaries) of one "
          f"attention fwd+bwd, T={args.total}, N={args.heads} K={args.kv_heads} H={args.head_dim}, float32, "
          f"chunk {args.chunk}")
    print("| sp | strategy | " + " | ".join(f"{b} MB" for b in BALANCES) + " |")
    print("|---:|---|" + "---:|" * len(BALANCES))
    for sp in (2, 4, 8):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--sp_row", str(sp)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"| {sp} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:100]} |")
            continue
        r = json.loads(lines[-1][7:])
        for name, _, _ in _chosen(variants(sp), args):
            print(f"| {sp} | {name} | " + " | ".join(f"{r[f'{name}/{b}'] / 1e6:.1f}" for b in BALANCES) + " |",
                  flush=True)


# ------------------------------------------------------------------------------------ lwm.train tok/s

def part_train(args):
    import tempfile

    from lwm.text.tokenizer import train_sentencepiece

    tmp = tempfile.mkdtemp(prefix="cp_bench_")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    sentence = lambda: " ".join(rng.choice(words, rng.integers(20, 200)))
    train_sentencepiece([sentence() for _ in range(300)], f"{tmp}/tok.model", vocab_size=300)
    with open(f"{tmp}/data.jsonl", "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"text": sentence()}) + "\n")
    sp = args.devices
    configs = [("ring (today)", "ring", "none", 0)] + [
        (f"{name}/{b}", s, b, u) for name, s, u in variants(sp) for b in BALANCES if (s, b) != ("ring", "none")
        and (s != "ulysses" or 4 % sp == 0)]   # plain Ulysses needs sp | 4 heads
    configs = _chosen(configs, args)
    print(f"lwm.train, preset {args.preset} (num_attention_heads=4), batch 1, mesh 1,1,1,{sp} on {sp} simulated "
          f"CPU devices, chunk {args.chunk}, {args.steps} timed steps (median; step 0 compiles); load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print("| seq | strategy/balance | tokens/s | vs ring (today) |")
    print("|---:|---|---:|---:|")
    for seq in [int(s) for s in args.seq.split(",")]:
        base = None
        for name, strategy, balance, u in configs:
            out = f"{tmp}/{seq}_{strategy}{u}_{balance}"
            flags = ["--modality=text", f"--load_llama_config={args.preset}", f"--tokenizer={tmp}/tok.model",
                     "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
                     f"--train_dataset.json_dataset.path={tmp}/data.jsonl", "--train_dataset.json_dataset.mode=pack",
                     f"--train_dataset.json_dataset.seq_length={seq}", "--train_dataset.json_dataset.batch_size=1",
                     f"--mesh_dim=1,1,1,{sp}", f"--total_steps={args.steps + 1}", "--log_freq=1", "--peak_flops=1e11",
                     f"--logger.output_dir={out}", "--logger.experiment_id=run", "--logger.append_uuid=False",
                     "--llama.attention_impl=ring", f"--llama.scan_query_chunk_size={args.chunk}",
                     f"--llama.scan_key_chunk_size={args.chunk}", f"--llama.max_sequence_length={seq}",
                     "--llama.num_attention_heads=4", f"--llama.context_parallel_strategy={strategy}",
                     f"--llama.context_parallel_load_balance={balance}", f"--llama.context_parallel_ulysses_size={u}"]
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={sp}", JAX_PLATFORMS="cpu",
                       NPROC="32")
            t0 = time.time()
            res = subprocess.run([sys.executable, "-m", "lwm.train", *flags], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {seq} | {name} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:80]} | |")
                continue
            from lwm.training.metrics import read_metrics

            rows = [r for r in read_metrics(f"{out}/run") if r["step"] >= 1]
            tps = float(np.median([r["tokens_per_second"] for r in rows]))
            base = tps if name == "ring (today)" else base
            ratio = f"{tps / base:.2f}" if base else "n/a"
            print(f"| {seq} | {name} | {tps:.0f} | {ratio} |  ({time.time() - t0:.0f} s wall)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("work", "memory", "train"), default="work")
    p.add_argument("--total", type=int, default=32768, help="total sequence length (work, memory)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--dtype_bytes", type=int, default=2, help="bytes per K/V element sent (2: bf16)")
    p.add_argument("--seq", default="8192,32768", help="train: sequence lengths")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--preset", default="debug")
    p.add_argument("--only", default="", help="memory: comma-separated strategy names (e.g. ulysses_ring(u=2)); "
                   "train: strategy/balance names (e.g. 'ring (today),ulysses_ring(u=2)/zigzag')")
    p.add_argument("--devices", type=int, default=4, help="train: simulated devices = sp (mesh 1,1,1,devices)")
    p.add_argument("--sp_row", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sp_row is not None:
        print("RESULT " + json.dumps(_memory_child(args)), flush=True)
        return
    {"work": part_work, "memory": part_memory, "train": part_train}[args.part](args)


if __name__ == "__main__":
    main()
