"""Tokens/s, MFU and peak memory of `python -m lwm.train` itself on the `debug` preset, batch 1, fp32.

Purpose: the training entry point's end-to-end speed (data pipeline, sharded step, logging included), to set
  against the original LWM on the same machine. Each row is a fresh `python -m lwm.train` subprocess:
  tokens/s and MFU are the ones it logs (timed with block_until_ready around each step; the median over the
  steps after the first, which compiles), MFU against the fp32 matmul rate that run measures at start-up
  (best of ~1 s of 2048^3 matmuls, shown as matmul GFLOP/s),
  and the peak memory is that subprocess's max RSS (os.wait4).
Hardware: any; defaults are for CPU (1 device, and 4 simulated devices with sp=4 and the ring).
Expected (the original on a 2-core CPU, batch 1, fp32): ~950 tok/s at 2K (1.9 GB), 660 at 8K (5.2 GB), 220 at
  32K (17.7 GB), 640 at 8K with sp=4 (5.4 GB). Targets: 2x those tokens/s, MFU >= 60% at 2K, memory at 8K and
  32K at most a third of the original's.

    python benchmarks/train_bench.py                                  # 2K, 8K, 32K x (1 device, sp=4)
    python benchmarks/train_bench.py --seqs 512,1024 --devices 1      # a quick check
    python benchmarks/train_bench.py --extra="--llama.remat_block=nothing_saveable --llama.scan_mlp=True"

MFU = (6 * matmul params + 6 * L * T * D) * tokens/s / measured matmul FLOP/s; matmul params are all
parameters but the embeddings and norm scales (lm_head included); 6 * L * T * D is causal attention
(forward + backward over half the T x T square). See lwm.training.steps.flops_per_token.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

ANCHOR = {(2048, 1): (950, 1.9), (8192, 1): (660, 5.2), (32768, 1): (220, 17.7), (8192, 4): (640, 5.4)}
WORDS = ("the quick brown fox jumps over a lazy dog while world models read long videos and text in one "
         "million token context with ring attention packing across many devices").split()


def make_data(folder: str, tokens: int) -> tuple[str, str]:
    """A sentencepiece tokenizer and a JSON-lines corpus of about `tokens` tokens (random words)."""
    from lwm.text.tokenizer import train_sentencepiece

    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
    tok = os.path.join(folder, "tokenizer.model")
    train_sentencepiece([sentence() for _ in range(300)], tok, vocab_size=400)
    data = os.path.join(folder, "bench.jsonl")
    with open(data, "w") as f:
        written = 0
        while written < tokens:
            text = sentence()
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text.split())          # about one token per word with this tokenizer
    return tok, data


def run_row(seq: int, devices: int, steps: int, tok: str, data: str, out: str, extra: list[str]) -> dict:
    sp = devices
    flags = [
        "--modality=text", "--load_llama_config=debug", "--dtype=fp32", f"--total_steps={steps}", "--log_freq=1",
        f"--mesh_dim=1,1,1,{sp}", f"--llama.max_sequence_length={max(seq, 2048)}",
        f"--llama.attention_impl={'ring' if sp > 1 else 'blockwise'}", f"--tokenizer={tok}",
        "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
        f"--train_dataset.json_dataset.path={data}", f"--train_dataset.json_dataset.seq_length={seq}",
        "--train_dataset.json_dataset.batch_size=1", "--optimizer.adamw_optimizer.lr_warmup_steps=1",
        "--optimizer.adamw_optimizer.lr_decay_steps=1000", f"--logger.output_dir={out}",
        f"--logger.experiment_id=seq{seq}_dev{devices}", "--logger.append_uuid=False", "--peak_flops=0", *extra]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.Popen([sys.executable, "-m", "lwm.train", *flags], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        errors = [ln for ln in err.splitlines() if "Error" in ln or "error:" in ln]
        return {"error": (errors or [f"exit {proc.returncode} (killed: out of memory?)"])[-1][:100]}
    peak = re.search(r"peak ([0-9.e+]+) FLOP/s", err)
    with open(os.path.join(out, f"seq{seq}_dev{devices}", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:]                               # row 0 is the compiling step

    def median(key):  # --steps 1 (e.g. 128K, where a step takes minutes): only the compiling step, no median
        return statistics.median(r[key] for r in timed) if timed else float("nan")

    return {"tokens_per_second": median("tokens_per_second"), "mfu": median("mfu"), "step_time": median("step_time"),
            "compile_step_time": rows[0]["step_time"],
            "matmul_gflops": float(peak.group(1)) / 1e9 if peak else float("nan"),
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,          # ru_maxrss is in KiB on Linux
            "loss": rows[-1]["loss"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="2048,8192,32768")
    p.add_argument("--devices", default="1,4", help="comma list; n > 1 runs sp=n with the ring")
    p.add_argument("--steps", type=int, default=0, help="steps per row (0: 6 up to 4K, 4 up to 16K, else 3)")
    p.add_argument("--extra", default="", help="more lwm.train flags for every row, e.g. --llama.* settings")
    args = p.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    device_counts = [int(d) for d in args.devices.split(",")]
    extra = shlex.split(args.extra)
    with tempfile.TemporaryDirectory(prefix="lwm_train_bench_") as tmp:
        steps_for = lambda seq: args.steps or (6 if seq <= 4096 else 4 if seq <= 16384 else 3)
        tok, data = make_data(tmp, max(seq * (steps_for(seq) + 1) for seq in seqs) + 10_000)
        print(f"lwm.train, debug preset, batch 1, fp32, {os.cpu_count()} CPUs; extra flags: {args.extra or 'none'}")
        print("| seq | devices | tokens/s | anchor tok/s | x anchor | MFU | matmul GFLOP/s | step s | compile step s "
              "| peak RSS GB | anchor GB | loss |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for seq in seqs:
            for devices in device_counts:
                r = run_row(seq, devices, steps_for(seq), tok, data, os.path.join(tmp, "runs"), extra)
                anchor_tps, anchor_gb = ANCHOR.get((seq, devices), (None, None))
                if "error" in r:
                    print(f"| {seq} | {devices} | failed: {r['error']} | | | | | | | | | |", flush=True)
                    continue
                ratio = f"{r['tokens_per_second'] / anchor_tps:.2f}" if anchor_tps else "-"
                print(f"| {seq} | {devices} | {r['tokens_per_second']:.0f} | {anchor_tps or '-'} | {ratio} | "
                      f"{100 * r['mfu']:.1f}% | {r['matmul_gflops']:.0f} | {r['step_time']:.3f} | {r['compile_step_time']:.1f} | "
                      f"{r['peak_rss_gb']:.2f} | {anchor_gb or '-'} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
