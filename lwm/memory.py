"""`python -m lwm.memory`: the memory planner (lwm.tools.memory_planner) from the command line.

    python -m lwm.memory --load_llama_config=7b --seq_len=1048576 --mesh_dim=1,1,4,64 --dtype=bf16 \
        --remat_block=nothing_saveable --device_memory=95GiB
    python -m lwm.memory --load_llama_config=debug --seq_len=4096 --mesh_dim=1,1,1,2 --check_xla

The formulas and their sources: lwm/tools/memory_planner.py and docs/memory.md. --mesh_dim takes the syntax
of every command (dp,fsdp,tp,sp or dp:1,tp:4,...) but no -1: the planner has no devices to fill it.
Bad flags: one line, exit status 2.
"""
from __future__ import annotations

import math
import sys

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.cli.values import FlagError, mesh_sizes, parse_choice, parse_int_list, parse_literal_dict
from lwm.tools.memory_planner import (DEVICES, LOAD_BALANCES, REMATS, SP_STRATEGIES, Plan, estimate, max_context,
                                      parse_bytes, xla_prefill, xla_train)


def get_default_config() -> ConfigDict:
    """Every flag and its default."""
    c = ConfigDict()
    c.load_llama_config = "7b"                 # a preset (tiny, debug, 7b, ...) or json::path
    c.update_llama_config = ""                 # dict(key=value, ...), a {'key': value} literal or JSON
    c.seq_len = "32768"                        # tokens per sequence; a comma list for several
    c.mesh_dim = "1,1,1,1"                     # dp,fsdp,tp,sp sizes, the usual syntax; no -1 (the planner has no devices)
    c.context_parallel_strategy = ""           # ring | all_gather | ulysses over sp; '' = the config's
    c.context_parallel_load_balance = ""       # none | zigzag | striped token layout over sp; '' = the config's
    c.dtype = "bf16"                           # fp32 | bf16: compute dtype (and inference weights)
    c.batch_size = 1                           # global sequences per step
    c.scan_query_chunk_size = 0                # 0: the config's
    c.scan_key_chunk_size = 0                  # 0: the config's
    c.loss_chunk_size = 1024
    c.remat_block = ""                         # '' = the config's
    c.optimizer_state = True
    c.bf16_momentum = False
    c.new_tokens = 0                           # inference: cache slots after the prompt
    c.device_memory = ""                       # bytes per device (80GB, 95GiB) or a device name: also the longest context
    c.check_xla = False                        # also compile the real train step and prefill on simulated CPU devices
    c.lock()
    return c


def _check(config: ConfigDict) -> None:
    """FlagError naming the flag, before anything is computed."""
    parse_choice("dtype", config.dtype, ("fp32", "bf16"))
    if config.context_parallel_strategy:
        parse_choice("context_parallel_strategy", config.context_parallel_strategy, SP_STRATEGIES)
    if config.context_parallel_load_balance:
        parse_choice("context_parallel_load_balance", config.context_parallel_load_balance, LOAD_BALANCES)
    if config.remat_block:
        parse_choice("remat_block", config.remat_block, REMATS)
    if config.device_memory and config.device_memory not in DEVICES:
        try:
            parse_bytes(config.device_memory)
        except ValueError as e:
            raise FlagError(f"--device_memory={config.device_memory!r}: {e}") from None
    for flag in ("batch_size", "loss_chunk_size"):
        if config[flag] < 1:
            raise FlagError(f"--{flag}={config[flag]}: must be >= 1")


def _plans(config: ConfigDict):
    from lwm.model.llama import LLaMAConfig
    from lwm.parallel.sharding import MeshError

    mesh = mesh_sizes("mesh_dim", config.mesh_dim)
    model_config = LLaMAConfig.load(config.load_llama_config)
    updates = parse_literal_dict(config.update_llama_config)
    if config.scan_query_chunk_size:
        updates["scan_query_chunk_size"] = config.scan_query_chunk_size
    if config.scan_key_chunk_size:
        updates["scan_key_chunk_size"] = config.scan_key_chunk_size
    if config.remat_block:
        updates["remat_block"] = config.remat_block
    try:
        model_config = model_config.replace(**updates)
    except (ValueError, TypeError) as e:
        raise FlagError(f"--update_llama_config: {e}") from None
    strategy = config.context_parallel_strategy or model_config.context_parallel_strategy
    balance = config.context_parallel_load_balance or model_config.context_parallel_load_balance
    for t in parse_int_list("seq_len", config.seq_len, minimum=1):
        try:
            yield Plan(model_config, t, mesh, config.batch_size, 4 if config.dtype == "fp32" else 2, strategy, balance,
                       config.optimizer_state, config.bf16_momentum, config.loss_chunk_size, config.new_tokens)
        except MeshError as e:      # lwm.parallel.sharding's message, with the flags it is about
            raise ValueError(f"--mesh_dim={config.mesh_dim} --seq_len={t} --context_parallel_strategy={strategy} "
                             f"--context_parallel_load_balance={balance}: {e}") from None


def main(argv=None) -> None:
    """Print the plan's table (and the longest contexts with --device_memory). Raises FlagError / ValueError
    naming the flag on bad input."""
    import os

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    _check(config)
    plans = list(_plans(config))
    device = parse_bytes(config.device_memory) if config.device_memory else None
    if config.check_xla:          # before jax is imported anywhere (it may already be, in tests)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={math.prod(plans[0].mesh)}").strip()
    parts = ("parameters", "optimizer", "gradients", "activations", "kv_cache", "total")
    small = max(estimate(p)["train"]["total"] for p in plans) < 2**30
    unit, scale = ("MiB", 2**20) if small else ("GiB", 2**30)
    fmt = lambda x: f"{x / scale:.2f}"
    cp = f"{plans[0].sp_strategy}/{plans[0].load_balance}, " if plans[0].mesh[3] > 1 else ""
    print(f"# {config.load_llama_config}, mesh dp,fsdp,tp,sp = {config.mesh_dim}, {cp}{config.dtype}, "
          f"batch {config.batch_size}, remat '{plans[0].config.remat_block}'; {unit} per device")
    header = "| seq_len | mode | " + " | ".join(parts) + (" | XLA peak | estimate / XLA |" if config.check_xla else " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for plan in plans:
        est = estimate(plan)
        for mode in ("train", "inference"):
            row = f"| {plan.seq_len} | {mode} | " + " | ".join(fmt(est[mode][k]) for k in parts) + " |"
            if config.check_xla:
                xla = (xla_train if mode == "train" else xla_prefill)(plan)["peak"]
                row += f" {fmt(xla)} | {est[mode]['total'] / xla:.2f} |"
            print(row)
    if device:
        for mode in ("train", "inference"):
            longest = max_context(plans[0], device, mode)
            print(f"longest {mode} context in {device / 2**30:.1f} GiB per device: {longest} tokens")


if __name__ == "__main__":
    sys.exit(cli("lwm.memory", main, get_default_config, __doc__))
