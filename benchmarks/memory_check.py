"""The memory planner (`lwm.memory`) beside XLA's compiled memory analysis, and its 7B estimates.

Hardware: any CPU; meshes run on 8 simulated host devices. Each XLA row compiles the real train step or
prefill (no arrays are allocated): 20-60 s per row on 2 busy cores, ~15 min for the whole grid.
Expected: every estimate within 20% of XLA's peak (arguments + outputs - aliased + temporaries).

    python benchmarks/memory_check.py                 # the check grid (docs/memory.md), then the 7B tables
    python benchmarks/memory_check.py --only_7b       # the 7B tables alone (instant)
"""
import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# mode, preset, seq_len, mesh (dp, fsdp, tp, sp), batch, remat_block, compute dtype bytes[, context-parallel
# strategy, load balance] (default ring, none; used when sp > 1)
GRID = [
    ("train", "tiny", 1024, (1, 1, 1, 1), 1, "", 4),
    ("train", "tiny", 4096, (1, 1, 1, 1), 1, "", 4),
    ("train", "tiny", 4096, (1, 1, 1, 1), 1, "nothing_saveable", 4),
    ("train", "tiny", 4096, (1, 2, 1, 1), 2, "", 4),
    ("train", "tiny", 4096, (1, 1, 1, 4), 1, "", 4),
    ("train", "tiny", 8192, (1, 1, 2, 2), 1, "", 4),
    ("train", "debug", 1024, (1, 1, 1, 1), 1, "", 4),
    ("train", "debug", 4096, (1, 1, 1, 1), 1, "", 4),
    ("train", "debug", 4096, (1, 1, 1, 1), 1, "nothing_saveable", 4),
    ("train", "debug", 4096, (1, 1, 1, 4), 1, "", 4),
    ("train", "debug", 4096, (1, 2, 1, 2), 2, "nothing_saveable", 4),
    ("train", "debug", 4096, (1, 1, 1, 1), 1, "", 2),
    ("prefill", "tiny", 4096, (1, 1, 1, 1), 1, "", 4),
    ("prefill", "tiny", 8192, (1, 1, 1, 4), 1, "", 4),
    ("prefill", "debug", 1024, (1, 1, 1, 1), 1, "", 4),
    ("prefill", "debug", 4096, (1, 1, 1, 1), 1, "", 4),
    ("prefill", "debug", 4096, (1, 2, 1, 1), 2, "", 4),
    ("prefill", "debug", 8192, (1, 1, 1, 4), 1, "", 4),
    ("prefill", "debug", 4096, (1, 1, 1, 1), 1, "", 2),
    # the other strategies and the zigzag ring (rows 19-)
    ("train", "tiny", 4096, (1, 1, 1, 2), 1, "", 4, "all_gather", "none"),
    ("train", "tiny", 4096, (1, 1, 1, 4), 1, "", 4, "all_gather", "none"),
    ("train", "tiny", 4096, (1, 1, 1, 2), 1, "", 4, "ulysses", "none"),
    ("train", "tiny", 4096, (1, 1, 1, 4), 1, "", 4, "ulysses", "none"),
    ("train", "tiny", 4096, (1, 1, 1, 4), 1, "", 4, "ring", "zigzag"),
    ("train", "debug", 4096, (1, 1, 1, 4), 1, "", 4, "all_gather", "none"),
    ("train", "debug", 4096, (1, 1, 1, 2), 1, "", 4, "ulysses", "none"),
    ("train", "debug", 4096, (1, 1, 1, 4), 1, "", 4, "ring", "zigzag"),
    ("prefill", "tiny", 8192, (1, 1, 1, 4), 1, "", 4, "all_gather", "none"),
    ("prefill", "tiny", 8192, (1, 1, 1, 4), 1, "", 4, "ulysses", "none"),
    ("prefill", "tiny", 8192, (1, 1, 1, 4), 1, "", 4, "ring", "zigzag"),
    ("prefill", "debug", 8192, (1, 1, 1, 4), 1, "", 4, "all_gather", "none"),
    ("prefill", "debug", 8192, (1, 1, 1, 2), 1, "", 4, "ulysses", "none"),
    ("prefill", "debug", 8192, (1, 1, 1, 4), 1, "", 4, "ring", "zigzag"),
    # where the strategy term is a larger share: remat'd layers at sp = 8 / 4, and the ring beside each
    ("train", "debug", 8192, (1, 1, 1, 8), 1, "nothing_saveable", 4, "ring", "none"),
    ("train", "debug", 8192, (1, 1, 1, 8), 1, "nothing_saveable", 4, "all_gather", "none"),
    ("train", "tiny", 8192, (1, 1, 1, 4), 1, "nothing_saveable", 4, "ring", "none"),
    ("train", "tiny", 8192, (1, 1, 1, 4), 1, "nothing_saveable", 4, "ulysses", "none"),
    ("prefill", "debug", 8192, (1, 1, 1, 2), 1, "", 4, "ring", "none"),
    ("train", "tiny", 16384, (1, 1, 1, 8), 1, "", 4, "ring", "none"),
    ("train", "tiny", 16384, (1, 1, 1, 8), 1, "", 4, "all_gather", "none"),
    ("train", "tiny", 16384, (1, 1, 1, 8), 1, "nothing_saveable", 4, "ring", "none"),
    ("train", "tiny", 16384, (1, 1, 1, 8), 1, "nothing_saveable", 4, "all_gather", "none"),
]


def check_grid(rows):
    from lwm.model.llama import LLaMAConfig
    from lwm.tools.memory_planner import Plan, estimate, xla_prefill, xla_train

    print("| mode | preset | seq_len | mesh dp,fsdp,tp,sp | sp strategy | batch | remat | dtype | estimate MiB | "
          "XLA peak MiB | estimate / XLA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for mode, preset, t, mesh, b, remat, dtype_bytes, *cp in rows:
        strategy, balance = cp or ("ring", "none")
        config = LLaMAConfig.load(preset).replace(remat_block=remat)   # sp > 1: Plan.model_config picks the ring
        plan = Plan(config, t, mesh, b, dtype_bytes, strategy, balance)
        est = estimate(plan)["train" if mode == "train" else "inference"]["total"]
        xla = (xla_train if mode == "train" else xla_prefill)(plan)["peak"]
        worst = max(worst, abs(est / xla - 1))
        cp_name = "-" if mesh[3] == 1 else strategy + ("" if balance == "none" else f" {balance}")
        print(f"| {mode} | {preset} | {t} | {','.join(map(str, mesh))} | {cp_name} | {b} | {remat or '-'} | "
              f"{'fp32' if dtype_bytes == 4 else 'bf16'} | {est / 2**20:.1f} | {xla / 2**20:.1f} | {est / xla:.2f} |",
              flush=True)
    print(f"\nlargest deviation: {worst:.1%}")


def tables_7b():
    from lwm.model.llama import LLaMAConfig
    from lwm.tools.memory_planner import DEVICES, Plan, estimate, max_context

    c = LLaMAConfig.load("7b").replace(remat_block="nothing_saveable", scan_mlp=True)
    print("\n7B training, bf16 compute, fp32 parameters and AdamW, remat nothing_saveable, 4M tokens per batch "
          "(the paper's); GiB per device")
    print("| seq_len | chips | mesh dp,fsdp,tp,sp | batch | parameters | optimizer | gradients | activations | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, mesh in ((32768, (1, 64, 4, 1)), (32768, (1, 32, 4, 2)), (131072, (1, 32, 8, 1)), (131072, (1, 16, 4, 4)),
                    (1048576, (1, 4, 4, 16)), (1048576, (1, 2, 4, 32)), (1048576, (1, 1, 4, 64))):
        b = max(4 * 2**20 // t, mesh[0] * mesh[1])
        e = estimate(Plan(c, t, mesh, b, 2))["train"]
        print(f"| {t} | {mesh[0] * mesh[1] * mesh[2] * mesh[3]} | {','.join(map(str, mesh))} | {b} | "
              + " | ".join(f"{e[k] / 2**30:.1f}" for k in ("parameters", "optimizer", "gradients", "activations",
                                                              "total")) + " |")
    print("\n7B inference (bf16 weights and cache, batch 1, prefill of the whole context); GiB per device")
    print("| seq_len | mesh dp,fsdp,tp,sp | parameters | KV cache | activations | total |")
    print("|---|---|---|---|---|---|")
    for t, mesh in ((32768, (1, 1, 1, 1)), (32768, (1, 1, 4, 1)), (131072, (1, 1, 8, 1)), (131072, (1, 1, 4, 2)),
                    (1048576, (1, 1, 4, 16)), (1048576, (1, 1, 8, 8)), (1048576, (1, 1, 4, 32))):
        e = estimate(Plan(c, t, mesh, 1, 2))["inference"]
        print(f"| {t} | {','.join(map(str, mesh))} | " + " | ".join(
            f"{e[k] / 2**30:.1f}" for k in ("parameters", "kv_cache", "activations", "total")) + " |")
    print("\nLongest context that fits one device (tokens; training with batch = dp*fsdp sequences)")
    cards = ("tpu-v4", "tpu-v5p", "a100-80g", "h100", "h200")
    print("| mode | mesh dp,fsdp,tp,sp | " + " | ".join(cards) + " |")
    print("|---|---|" + "---|" * len(cards))
    for mode, mesh in (("train", (1, 8, 1, 1)), ("train", (1, 1, 8, 1)), ("train", (1, 8, 1, 8)),
                       ("train", (1, 4, 4, 16)), ("inference", (1, 1, 1, 1)), ("inference", (1, 1, 8, 1)),
                       ("inference", (1, 1, 4, 16))):
        plan = Plan(c, 1024 * mesh[3], mesh, mesh[0] * mesh[1], 2)
        print(f"| {mode} | {','.join(map(str, mesh))} | "
              + " | ".join(str(max_context(plan, DEVICES[d], mode)) for d in cards) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only_7b", action="store_true")
    p.add_argument("--rows", default="", help="comma list of GRID row numbers (default: all)")
    args = p.parse_args(argv)
    if not args.only_7b:
        rows = [GRID[int(i)] for i in args.rows.split(",")] if args.rows else GRID
        check_grid(rows)
    tables_7b()


if __name__ == "__main__":
    sys.exit(main())
