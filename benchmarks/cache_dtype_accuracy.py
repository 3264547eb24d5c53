"""The main job's checkpoint with an fp32, int8 and fp8 KV cache: single-needle accuracy (the demo's own eval) and
the long-context suite average (docs/evals.md's 1K-4K run), in points, and each dtype's difference from fp32.

Hardware: CPU (4 simulated devices, ring attention over sp = 4, as the demo); 3.5 minutes per cache dtype on a
quiet 2-core CPU. Run it after `bash scripts/run_demo.sh` (it reads the demo's summary.json):
    python benchmarks/cache_dtype_accuracy.py                          # outputs/demo, fp32,int8,fp8
    python benchmarks/cache_dtype_accuracy.py --cache_dtypes=fp32,int8 --skip_suite     # needle only
Expected (the demo's checkpoint, docs/long_context.md): needle 98.9 with fp32 and int8, 79.5 with fp8; suite
average 0 with all three. The table also counts the answers that differ from the first dtype's, record by
record, a finer measure than the scores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's model settings (lwm.demo.MODEL_UPDATES) and its ring-attention eval.
UPDATES = ("dict(theta=1000000,max_sequence_length=16384,scan_query_chunk_size=128,scan_key_chunk_size=128,"
           "attention_impl='ring')")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="outputs/demo", help="the demo's --workdir (holds summary.json)")
    p.add_argument("--output_dir", default="", help="default: <workdir>/cache_dtype_accuracy")
    p.add_argument("--cache_dtypes", default="fp32,int8,fp8", help="the first is the baseline of the differences")
    p.add_argument("--skip_needle", action="store_true")
    p.add_argument("--skip_suite", action="store_true")
    p.add_argument("--reuse", action="store_true", help="read results already in --output_dir instead of re-running")
    return p.parse_args(argv)


def needle_cmd(summary: dict, workdir: str, out: str, cache_dtype: str) -> list[str]:
    """lwm.demo.evaluate's command (its defaults: 500:4000:8 lengths, 11 depths, 2 rounds, seed 1234)."""
    return [sys.executable, "-m", "lwm.eval_needle", "--load_llama_config=tiny", f"--update_llama_config={UPDATES}",
            f"--load_checkpoint={summary['checkpoint']}", f"--tokenizer={summary['tokenizer']}",
            f"--haystack_file={os.path.join(workdir, 'eval_haystack.jsonl')}", f"--output_file={out}",
            "--context_lengths_min=500", "--context_lengths_max=4000", "--n_context_length_intervals=8",
            "--n_document_depth_intervals=11", "--n_rounds=2", "--max_new_tokens=12", "--max_tokens_per_batch=50000",
            "--mesh_dim=1,1,1,-1", "--final_context_length_buffer=200", "--seed=1234", f"--cache_dtype={cache_dtype}"]


def suite_cmd(summary: dict, workdir: str, out_dir: str, cache_dtype: str) -> list[str]:
    """docs/evals.md's command for the main job's model at 1K-4K."""
    return [sys.executable, "-m", "lwm.eval_long", "--load_llama_config=tiny", f"--update_llama_config={UPDATES}",
            f"--load_checkpoint={summary['checkpoint']}", f"--tokenizer={summary['tokenizer']}",
            f"--haystack_file={os.path.join(workdir, 'eval_haystack.jsonl')}", "--lengths=1024,2048,4096",
            "--depths=0,25,50,75,100", "--n_samples=1", "--mesh_dim=1,1,1,4", f"--output_dir={out_dir}",
            f"--cache_dtype={cache_dtype}"]


def run(cmd: list[str], what: str) -> float:
    """Runs cmd in the repository root with 4 simulated CPU devices; its wall seconds. SystemExit on failure."""
    from lwm.tools.jobs import cpu_env

    print(f"\n== {what}\n   {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=cpu_env(4), cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"cache_dtype_accuracy: {what} failed with exit code {proc.returncode}")
    return time.time() - start


def needle_scores(path: str) -> tuple[float, dict]:
    """(accuracy in points, {(length, depth, seed): response})."""
    from lwm.evals import report

    records = report.load_results(path)
    answers = {(r["context_length"], r["depth_percent"], r["seed"]): r["response"] for r in records}
    return 100.0 * report.mean_accuracy(records), answers


def suite_scores(out_dir: str) -> tuple[float, dict]:
    """(the suite's average over tasks and lengths in points, {(task, length, depth, seed): response})."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    averages = list(results["summary"]["average"].values())
    answers = {(r["task"], r["length"], r["depth"], r["seed"]): r["response"] for r in results["records"]}
    return sum(averages) / len(averages), answers


def differing(answers: dict, base: dict) -> str:
    return f"{sum(answers[k] != base.get(k) for k in answers)}/{len(answers)}"


def demo_summary(workdir: str) -> tuple[dict, str]:
    """(the demo's summary.json, the absolute workdir); SystemExit in one line when the demo has not run."""
    sys.path.insert(0, ROOT)
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(summary_path):
        raise SystemExit(f"--workdir={workdir}: no summary.json; run `bash scripts/run_demo.sh` first")
    with open(summary_path) as f:
        return json.load(f), os.path.abspath(workdir)


def main(argv=None):
    args = parse_args(argv)
    summary, workdir = demo_summary(args.workdir)
    out_root = os.path.abspath(args.output_dir or os.path.join(workdir, "cache_dtype_accuracy"))
    dtypes = [d.strip() for d in args.cache_dtypes.split(",") if d.strip()]
    rows = []
    for dtype in dtypes:
        row = dict(dtype=dtype)
        if not args.skip_needle:
            out = os.path.join(out_root, dtype, "needle_results.json")
            if not args.reuse:
                if os.path.exists(out):
                    os.remove(out)           # a fresh eval, not lwm.eval_needle's resume
                os.makedirs(os.path.dirname(out), exist_ok=True)
                row["needle_s"] = run(needle_cmd(summary, workdir, out, dtype), f"needle eval, cache {dtype}")
            row["needle"], row["needle_answers"] = needle_scores(out)
        if not args.skip_suite:
            out_dir = os.path.join(out_root, dtype, "eval_long")
            if not args.reuse:
                row["suite_s"] = run(suite_cmd(summary, workdir, out_dir, dtype), f"long-context suite, cache {dtype}")
            row["suite"], row["suite_answers"] = suite_scores(out_dir)
        rows.append(row)

    base = rows[0]
    print(f"\ncheckpoint {summary['checkpoint']}; differences against the {base['dtype']} cache, in points")
    print(f"{'cache':>6} {'needle %':>9} {'diff':>6} {'answers != base':>15} {'suite avg':>10} {'diff':>6} "
          f"{'answers != base':>15} {'needle s':>8} {'suite s':>8}")
    for r in rows:
        cells = [f"{r['dtype']:>6}"]
        if "needle" in r:
            cells += [f"{r['needle']:9.2f}", f"{r['needle'] - base['needle']:+6.2f}",
                      f"{differing(r['needle_answers'], base['needle_answers']):>15}"]
        else:
            cells += [f"{'-':>9}", f"{'-':>6}", f"{'-':>15}"]
        if "suite" in r:
            cells += [f"{r['suite']:10.2f}", f"{r['suite'] - base['suite']:+6.2f}",
                      f"{differing(r['suite_answers'], base['suite_answers']):>15}"]
        else:
            cells += [f"{'-':>10}", f"{'-':>6}", f"{'-':>15}"]
        cells += [f"{r[k]:8.0f}" if k in r else f"{'-':>8}" for k in ("needle_s", "suite_s")]
        print(" ".join(cells))
    return rows


if __name__ == "__main__":
    main()
