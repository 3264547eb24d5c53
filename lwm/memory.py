"""`python -m lwm.memory`: the memory planner (lwm.tools.memory_planner) from the command line.

    python -m lwm.memory --llama_config 7b --seq_len 1048576 --mesh_dim 1,1,4,64 --dtype bf16 \
        --remat_block nothing_saveable --device_memory 95GiB
    python -m lwm.memory --llama_config debug --seq_len 4096 --mesh_dim 1,1,1,2 --check_xla

The formulas and their sources: lwm/tools/memory_planner.py and docs/memory.md.
"""
from __future__ import annotations

import argparse
import math
import sys

from lwm.tools.memory_planner import (DEVICES, LOAD_BALANCES, REMATS, SP_STRATEGIES, Plan, estimate, max_context,
                                      parse_bytes, xla_prefill, xla_train)




def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lwm.memory", description="Memory planner: per-device memory of training and inference, and the longest context that fits a device.")
    p.add_argument("--llama_config", "--load_llama_config", dest="llama_config", default="7b",
                   help="a preset (tiny, debug, 7b, ...) or json::path")
    p.add_argument("--update_llama_config", default="", help="JSON object of config fields to change")
    p.add_argument("--seq_len", default="32768", help="tokens per sequence; a comma list for several")
    p.add_argument("--mesh_dim", default="1,1,1,1", help="dp,fsdp,tp,sp sizes (no -1: the planner has no devices)")
    p.add_argument("--context_parallel_strategy", "--sp_strategy", dest="sp_strategy", default=None,
                   choices=SP_STRATEGIES,
                   help="context parallelism over sp (default: the config's): ring (K/V blocks passed round), "
                        "all_gather (full K/V on every device), ulysses (all-to-all: full sequence, heads / sp)")
    p.add_argument("--context_parallel_load_balance", dest="load_balance", default=None, choices=LOAD_BALANCES,
                   help="token layout over sp (default: the config's): none, zigzag, striped")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="compute dtype (and inference weights)")
    p.add_argument("--batch_size", type=int, default=1, help="global sequences per step")
    p.add_argument("--scan_query_chunk_size", type=int, default=0, help="0: the config's")
    p.add_argument("--scan_key_chunk_size", type=int, default=0, help="0: the config's")
    p.add_argument("--loss_chunk_size", type=int, default=1024)
    p.add_argument("--remat_block", default=None, choices=REMATS, help="default: the config's")
    p.add_argument("--optimizer_state", default="true", choices=["true", "false"])
    p.add_argument("--bf16_momentum", action="store_true")
    p.add_argument("--new_tokens", type=int, default=0, help="inference: cache slots after the prompt")
    p.add_argument("--device_memory", default="", help="bytes per device (80GB, 95GiB) or a device name "
                   f"({', '.join(sorted(DEVICES))}): also print the longest context that fits")
    p.add_argument("--check_xla", action="store_true",
                   help="also compile the real train step and prefill on simulated CPU devices and print XLA's "
                        "memory analysis beside the estimate (small models only)")
    return p.parse_args(argv)


def _plans(args):
    import json

    from lwm.model.llama import LLaMAConfig
    from lwm.parallel.sharding import MeshError

    try:
        mesh = tuple(int(x) for x in args.mesh_dim.split(","))
    except ValueError:
        raise ValueError(f"--mesh_dim={args.mesh_dim!r}: four integers dp,fsdp,tp,sp") from None
    if len(mesh) != 4 or min(mesh) < 1:
        raise ValueError(f"--mesh_dim={args.mesh_dim!r}: four positive sizes dp,fsdp,tp,sp")
    config = LLaMAConfig.load(args.llama_config)
    updates = json.loads(args.update_llama_config) if args.update_llama_config else {}
    if args.scan_query_chunk_size:
        updates["scan_query_chunk_size"] = args.scan_query_chunk_size
    if args.scan_key_chunk_size:
        updates["scan_key_chunk_size"] = args.scan_key_chunk_size
    if args.remat_block is not None:
        updates["remat_block"] = args.remat_block
    config = config.replace(**updates)
    strategy = args.sp_strategy or config.context_parallel_strategy
    balance = args.load_balance or config.context_parallel_load_balance
    for t in args.seq_len.split(","):
        try:
            yield Plan(config, int(t), mesh, args.batch_size, 4 if args.dtype == "fp32" else 2, strategy, balance,
                       args.optimizer_state == "true", args.bf16_momentum, args.loss_chunk_size, args.new_tokens)
        except MeshError as e:      # lwm.parallel.sharding's message, with the flags it is about
            raise ValueError(f"--mesh_dim={args.mesh_dim} --seq_len={t} --context_parallel_strategy={strategy} "
                             f"--context_parallel_load_balance={balance}: {e}") from None


def main(argv=None):
    import os

    args = parse_args(argv)
    if args.check_xla:          # before jax is imported anywhere
        n = math.prod(int(x) for x in args.mesh_dim.split(",") if x.strip().lstrip("-").isdigit())
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={max(n, 1)}").strip()
    try:
        plans = list(_plans(args))
        device = parse_bytes(args.device_memory) if args.device_memory else None
    except ValueError as e:
        sys.exit(f"lwm.memory: {e}")
    parts = ("parameters", "optimizer", "gradients", "activations", "kv_cache", "total")
    small = max(estimate(p)["train"]["total"] for p in plans) < 2**30
    unit, scale = ("MiB", 2**20) if small else ("GiB", 2**30)
    fmt = lambda x: f"{x / scale:.2f}"
    cp = f"{plans[0].sp_strategy}/{plans[0].load_balance}, " if plans[0].mesh[3] > 1 else ""
    print(f"# {args.llama_config}, mesh dp,fsdp,tp,sp = {args.mesh_dim}, {cp}{args.dtype}, "
          f"batch {args.batch_size}, remat '{plans[0].config.remat_block}'; {unit} per device")
    header = "| seq_len | mode | " + " | ".join(parts) + (" | XLA peak | estimate / XLA |" if args.check_xla else " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for plan in plans:
        est = estimate(plan)
        for mode in ("train", "inference"):
            row = f"| {plan.seq_len} | {mode} | " + " | ".join(fmt(est[mode][k]) for k in parts) + " |"
            if args.check_xla:
                xla = (xla_train if mode == "train" else xla_prefill)(plan)["peak"]
                row += f" {fmt(xla)} | {est[mode]['total'] / xla:.2f} |"
            print(row)
    if device:
        for mode in ("train", "inference"):
            longest = max_context(plans[0], device, mode)
            print(f"longest {mode} context in {device / 2**30:.1f} GiB per device: {longest} tokens")


if __name__ == "__main__":
    main()
