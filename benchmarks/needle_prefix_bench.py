"""The main job's needle eval with and without the prefix cache: wall time, the ratio, and whether the records
are identical (issue 23's needle row).

The eval (`python -m lwm.eval_needle`, the demo's model settings: ring attention over sp = 4 on 4 simulated
CPU devices) runs 3 context lengths x 5 depths, once with `--prefix_cache_mb=0` (whole left-padded prefills,
batched) and once with the default prefix cache (each prompt prefilled alone from slot 0, its cached prefix
reused; the runner orders each length's prompts so prompts that share a haystack prefix run back to back).
Both runs include their compiles (each is a fresh process, as a user runs it); the order alternates per
--repeats so neither always runs on a warmer machine.

Run it after `bash scripts/run_demo.sh` (it reads the demo's summary.json):
    python benchmarks/needle_prefix_bench.py                              # 1000,2500,4000 tokens x 5 depths
    python benchmarks/needle_prefix_bench.py --warm --repeats=2             # compiles loaded, not timed
    python benchmarks/needle_prefix_bench.py --lengths=500,1000 --depths=3  # quicker
What bounds the gain: prompts with needles at depths a and b share only the haystack before min(a, b) (the
text after a needle sits at other positions, so its keys differ). With depths 0, 25, ..., 100% and the deepest
first, the five prompts of one length compute 100 + 25 + 50 + 75 + 100 = 350 of their 500 haystack-% (no order
does better), so the prefill work falls 1.43x at most; the decode and the compiles do not shrink at all.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cache_dtype_accuracy import demo_summary, needle_cmd, needle_scores, run  # noqa: E402  (the demo's eval command)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="outputs/demo", help="the demo's --workdir (holds summary.json)")
    p.add_argument("--output_dir", default="", help="default: <workdir>/needle_prefix_bench")
    p.add_argument("--lengths", default="1000,2500,4000", help="min,...,max: the eval spaces them evenly")
    p.add_argument("--depths", type=int, default=5, help="needle depths per length, 0..100%% evenly")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (the order alternates)")
    p.add_argument("--warm", action="store_true",
                   help="a persistent JAX compilation cache under --output_dir, filled by one unmeasured pair "
                        "first: the measured runs then load their compiles instead of compiling")
    return p.parse_args(argv)


def command(summary, workdir, out, lengths, depths, cache_mb):
    """The demo's needle eval (lwm.demo.evaluate's flags) at these lengths and depths, one round."""
    cmd = needle_cmd(summary, workdir, out, "")
    replace = {"--context_lengths_min": lengths[0], "--context_lengths_max": lengths[-1],
               "--n_context_length_intervals": len(lengths), "--n_document_depth_intervals": depths,
               "--n_rounds": 1}
    out_cmd = []
    for arg in cmd:
        name = arg.split("=", 1)[0]
        out_cmd.append(f"{name}={replace[name]}" if name in replace else arg)
    return out_cmd + [f"--prefix_cache_mb={cache_mb}"]


def main(argv=None):
    args = parse_args(argv)
    summary, workdir = demo_summary(args.workdir)
    out_root = os.path.abspath(args.output_dir or os.path.join(workdir, "needle_prefix_bench"))
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = [("off", 0), ("on", -1)]
    times = {name: [] for name, _ in settings}
    answers = {}
    if args.warm:
        os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.join(out_root, "jax_cache"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
        for name, mb in settings:
            out = os.path.join(out_root, f"{name}_warmup", "needle_results.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if os.path.exists(out):
                os.remove(out)
            run(command(summary, workdir, out, lengths, args.depths, mb), f"warm-up, prefix cache {name}")
    load = os.getloadavg()[0]
    for rep in range(args.repeats):
        for name, mb in (settings if rep % 2 == 0 else settings[::-1]):
            out = os.path.join(out_root, f"{name}_{rep}", "needle_results.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if os.path.exists(out):
                os.remove(out)
            cmd = command(summary, workdir, out, lengths, args.depths, mb)
            times[name].append(run(cmd, f"needle eval, prefix cache {name} (run {rep})"))
            answers[name] = needle_scores(out)
    (acc_off, ans_off), (acc_on, ans_on) = answers["off"], answers["on"]
    same = sum(ans_off[k] == ans_on.get(k) for k in ans_off)
    print(f"\n{len(lengths)} lengths x {args.depths} depths, compiles {'loaded from the cache' if args.warm else 'included'}; load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'prefix cache':>12} {'wall s (each run)':>24} {'best s':>8} {'accuracy %':>10}")
    for name, acc in (("off", acc_off), ("on", acc_on)):
        print(f"{name:>12} {' '.join(f'{t:.1f}' for t in times[name]):>24} {min(times[name]):8.1f} {acc:10.2f}")
    print(f"off / on (best): {min(times['off']) / min(times['on']):.2f}x; records with the same answer: "
          f"{same}/{len(ans_off)}")
    return times, same


if __name__ == "__main__":
    main()
