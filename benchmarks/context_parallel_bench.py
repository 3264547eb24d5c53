"""Context parallelism over sp: work balance, communication and memory of every strategy x load balance,
and `lwm.train` tokens/s under each strategy.

Purpose: the figures of docs/context_parallel.md. Hardware: any; the compiled memory and the train rows run
on simulated CPU devices. Expected: plain causal ring ~(2 - 1/sp)x the even split; zigzag and striped
within 1.10x of even at sp=4 and 8; all-gather and Ulysses balanced by construction.
Usage:
  python benchmarks/context_parallel_bench.py --part work            # seconds: FLOPs, critical path, bytes
  python benchmarks/context_parallel_bench.py --part memory --seq 8192   # compiles 27 programs
  python benchmarks/context_parallel_bench.py --part train --seq 8192,32768 --steps 3
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

STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")


# ------------------------------------------------------------------------------------ work (analytic)

def _runs(balance, sp, local):
    """(num_runs, stride, run_len, starts(d)) as lwm.attention.layout.runs (kept numpy-only here)."""
    if balance == "none" or sp == 1:
        return 1, 1, local, lambda d: [d * local]
    if balance == "striped":
        return 1, sp, local, lambda d: [d]
    c = local // 2
    return 2, 1, c, lambda d: [d * c, (2 * sp - 1 - d) * c]


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


def block_work(balance, sp, local, d, e, chunk):
    """Tiles (fwd, bwd) device d's queries spend on device e's key/value block."""
    R, stride, n, starts = _runs(balance, sp, local)
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
    for strategy in STRATEGIES:
        for balance in BALANCES:
            if strategy == "ulysses":  # every device: the whole causal sequence for N/sp heads
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
            else:  # 4 all-to-alls forward (q, k, v, out) and 4 backward; kv heads repeated to divide by sp
                r = sp // math.gcd(K, sp)
                a2a = (sp - 1) / sp * local * H * dtype_bytes * (2 * N + 2 * K * r)
                sent = 2 * a2a + (sp - 1) * seg
            rows.append(dict(sp=sp, strategy=strategy, balance=balance, flops_dev_max=max(per_dev),
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
        for strategy in STRATEGIES:
            for balance in BALANCES:
                f = lambda q, k, v: context_parallel_attention(q, k, v, strategy=strategy, load_balance=balance,
                                                               q_chunk=args.chunk, k_chunk=args.chunk).sum()
                compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
                m = compiled.memory_analysis()
                out[f"{strategy}/{balance}"] = (m.temp_size_in_bytes + m.argument_size_in_bytes
                                                + m.output_size_in_bytes)
    return out


def part_memory(args):
    print(f"compiled memory per device (XLA memory analysis: arguments + outputs + temporaries) of one "
          f"attention fwd+bwd, T={args.total}, N={args.heads} K={args.kv_heads} H={args.head_dim}, float32, "
          f"chunk {args.chunk}")
    print("| sp | " + " | ".join(f"{s}/{b} MB" for s in STRATEGIES for b in BALANCES) + " |")
    print("|---:|" + "---:|" * 9)
    for sp in (2, 4, 8):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--sp_row", str(sp)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"| {sp} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:100]} |")
            continue
        r = json.loads(lines[-1][7:])
        print(f"| {sp} | " + " | ".join(f"{r[f'{s}/{b}'] / 1e6:.1f}" for s in STRATEGIES for b in BALANCES) + " |",
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
    configs = [("ring (today)", "ring", "none")] + [(f"{s}/{b}", s, b) for s in STRATEGIES for b in BALANCES
                                                    if (s, b) != ("ring", "none")]
    configs = [c for c in configs if not args.only or c[0] in args.only.split(",")]
    print(f"lwm.train, preset {args.preset} (num_attention_heads=4), batch 1, mesh 1,1,1,4 on 4 simulated CPU "
          f"devices, chunk {args.chunk}, {args.steps} timed steps (median; step 0 compiles); load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print("| seq | strategy/balance | tokens/s | vs ring (today) |")
    print("|---:|---|---:|---:|")
    for seq in [int(s) for s in args.seq.split(",")]:
        base = None
        for name, strategy, balance in configs:
            out = f"{tmp}/{seq}_{strategy}_{balance}"
            flags = ["--modality=text", f"--load_llama_config={args.preset}", f"--tokenizer={tmp}/tok.model",
                     "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
                     f"--train_dataset.json_dataset.path={tmp}/data.jsonl", "--train_dataset.json_dataset.mode=pack",
                     f"--train_dataset.json_dataset.seq_length={seq}", "--train_dataset.json_dataset.batch_size=1",
                     "--mesh_dim=1,1,1,4", f"--total_steps={args.steps + 1}", "--log_freq=1", "--peak_flops=1e11",
                     f"--logger.output_dir={out}", "--logger.experiment_id=run", "--logger.append_uuid=False",
                     "--llama.attention_impl=ring", f"--llama.scan_query_chunk_size={args.chunk}",
                     f"--llama.scan_key_chunk_size={args.chunk}", f"--llama.max_sequence_length={seq}",
                     "--llama.num_attention_heads=4", f"--llama.context_parallel_strategy={strategy}",
                     f"--llama.context_parallel_load_balance={balance}"]
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
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
    p.add_argument("--only", default="", help="train: comma-separated subset of strategy/balance names")
    p.add_argument("--sp_row", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sp_row is not None:
        print("RESULT " + json.dumps(_memory_child(args)), flush=True)
        return
    {"work": part_work, "memory": part_memory, "train": part_train}[args.part](args)


if __name__ == "__main__":
    main()
