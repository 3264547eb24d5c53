"""`python -m lwm.memory`: how much memory a model needs per device, and how many devices it needs.

Two questions, one command (library: lwm.tools.memory_planner; formulas, sources and checks: docs/memory.md):

  What hardware do I need?  Give a device (--device_memory) and no mesh: the planner searches meshes
      (dp,fsdp,tp,sp), context-parallel strategies, remat policies (training) and cache dtypes (inference)
      and prints, for training and for inference, the fewest devices (powers of two) that fit, with the
      flags that run them.
        python -m lwm.memory --llama_config=7b --seq_len=128K,1M --device_memory=h100,tpu-v5p
  How much does this mesh need?  Give --mesh_dim: a table of parameters, optimizer, gradients, activations
      and KV cache per device for each length; with --device_memory also the longest context that fits.
        python -m lwm.memory --llama_config=7b --seq_len=1M --mesh_dim=1,1,4,64 --remat_block=nothing_saveable
        python -m lwm.memory --llama_config=debug --seq_len=4096 --mesh_dim=1,1,1,2 --check_xla

Flags
  --seq_len        tokens per sequence: 4096, 128K (131072), 1M (1048576); a comma list for several
  --device_memory  a device by name (h100, h200, a100-80g, a100-40g, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e; a comma
                   list for several) or a size with its unit (80GiB, 95GB); a bare number is refused
  --mesh_dim       dp,fsdp,tp,sp (or dp:1,tp:4,...), as in every command, but no -1 (no devices to fill it);
                   empty: search (with --device_memory; without it, the table of one device)
  --batch_size     global sequences per training step; dp*fsdp must divide it (the search keeps to that)
  --context_parallel_strategy, --remat_block, --cache_dtype: fixed when given; empty: the config's (table)
                   or every choice (search). --remat_block=none means no remat.
  --max_devices    the search's largest device count
Bad flags: one line naming the flag, exit status 2.
"""
from __future__ import annotations

import math
import sys

from ml_collections import ConfigDict

from lwm.cli.command import cli, parse
from lwm.utils.dtypes import cache_names, parse_cache_dtype
from lwm.cli.values import (FlagError, mesh_sizes, parse_choice, parse_length, parse_length_list, parse_literal_dict,
                            parse_size)
from lwm.tools.memory_planner import (DEVICE_TABLE, DEVICES, LOAD_BALANCES, REMATS, SEARCH_REMATS, SP_STRATEGIES,
                                      Plan, estimate, max_context, search, xla_prefill, xla_train)

# --cache_dtype name -> bytes per element (0: --dtype's); int8 / fp8 add a float32 scale per token and kv head
CACHE_DTYPES = {"": 0, **{n: parse_cache_dtype(n).itemsize for n in cache_names()
                          if parse_cache_dtype(n).itemsize <= 4}}


def get_default_config() -> ConfigDict:
    """Every flag and its default."""
    c = ConfigDict()
    c.load_llama_config = "7b"                 # a preset (tiny, debug, 7b, ...) or json::path
    c.update_llama_config = ""                 # dict(key=value, ...), a {'key': value} literal or JSON
    c.seq_len = "32768"                        # tokens per sequence (4096, 128K, 1M); a comma list for several
    c.mesh_dim = ""                            # dp,fsdp,tp,sp for one mesh's table; '' = search with --device_memory
    c.context_parallel_strategy = ""           # ring | all_gather | ulysses over sp; '' = the config's / search all
    c.context_parallel_load_balance = ""       # none | zigzag | striped token layout over sp; '' = the config's
    c.dtype = "bf16"                           # fp32 | bf16: compute dtype (and inference weights)
    c.cache_dtype = ""                         # inference KV cache: fp32|bf16|fp16|int8|fp8; '' = --dtype's / search
    c.batch_size = 1                           # global sequences per training step
    c.scan_query_chunk_size = 0                # 0: the config's
    c.scan_key_chunk_size = 0                  # 0: the config's
    c.loss_chunk_size = 1024
    c.remat_block = ""                         # none | nothing_saveable | checkpoint_dots ...; '' = the config's / search
    c.optimizer_state = True
    c.bf16_momentum = False
    c.new_tokens = 0                           # inference: cache slots after the prompt
    c.device_memory = ""                       # h100, tpu-v5p, ... (comma list) or 80GiB, 95GB; no bare numbers
    c.max_devices = 16384                      # search: the largest device count tried
    c.check_xla = False                        # also compile the real train step and prefill on simulated CPU devices
    c.lock()
    return c


def _devices(config: ConfigDict) -> list[tuple[str, float]]:
    """[(name or size text, bytes)] of --device_memory; FlagError naming the flag."""
    names = [x.strip() for x in config.device_memory.split(",") if x.strip()]
    return [(n.lower() if n.lower() in DEVICES else n, parse_size("device_memory", n, DEVICES)) for n in names]


def _check(config: ConfigDict) -> None:
    """FlagError naming the flag, before anything is computed."""
    parse_choice("dtype", config.dtype, ("fp32", "bf16"))
    parse_choice("cache_dtype", config.cache_dtype, tuple(CACHE_DTYPES))
    if config.context_parallel_strategy:
        parse_choice("context_parallel_strategy", config.context_parallel_strategy, SP_STRATEGIES)
    if config.context_parallel_load_balance:
        parse_choice("context_parallel_load_balance", config.context_parallel_load_balance, LOAD_BALANCES)
    if config.remat_block:
        parse_choice("remat_block", config.remat_block, ("none",) + tuple(r for r in REMATS if r))
    for flag in ("batch_size", "loss_chunk_size", "max_devices"):
        if config[flag] < 1:
            raise FlagError(f"--{flag}={config[flag]}: must be >= 1")
    devices = _devices(config)
    if config.mesh_dim and len(devices) > 1:
        raise FlagError(f"--device_memory={config.device_memory!r}: one device with --mesh_dim (a list only "
                        "when searching, without --mesh_dim)")


def _model_config(config: ConfigDict):
    """The model config with the flags' updates; FlagError naming --update_llama_config."""
    from lwm.model.llama import LLaMAConfig

    model_config = LLaMAConfig.load(config.load_llama_config)
    updates = parse_literal_dict(config.update_llama_config)
    if config.scan_query_chunk_size:
        updates["scan_query_chunk_size"] = config.scan_query_chunk_size
    if config.scan_key_chunk_size:
        updates["scan_key_chunk_size"] = config.scan_key_chunk_size
    if config.remat_block:
        updates["remat_block"] = "" if config.remat_block == "none" else config.remat_block
    try:
        return model_config.replace(**updates)
    except (ValueError, TypeError) as e:
        raise FlagError(f"--update_llama_config: {e}") from None


def _plan_fields(config: ConfigDict) -> dict:
    return dict(optimizer_state=config.optimizer_state, bf16_momentum=config.bf16_momentum,
                loss_chunk_size=config.loss_chunk_size, new_tokens=config.new_tokens)


def _plans(config: ConfigDict, model_config):
    from lwm.parallel.sharding import MeshError

    mesh = mesh_sizes("mesh_dim", config.mesh_dim or "1,1,1,1")
    shards = mesh[0] * mesh[1]
    if config.batch_size % shards:
        raise FlagError(f"--batch_size={config.batch_size} is not divisible by dp*fsdp={shards} of "
                        f"--mesh_dim={config.mesh_dim}: raise --batch_size to a multiple of {shards} "
                        f"(--batch_size={shards * math.ceil(config.batch_size / shards)}), or move devices "
                        "from dp/fsdp to tp or sp")
    strategy = config.context_parallel_strategy or model_config.context_parallel_strategy
    balance = config.context_parallel_load_balance or model_config.context_parallel_load_balance
    for t in parse_length_list("seq_len", config.seq_len):
        try:
            yield Plan(model_config, t, mesh, config.batch_size, 4 if config.dtype == "fp32" else 2, strategy, balance,
                       cache_bytes=CACHE_DTYPES[config.cache_dtype], **_plan_fields(config))
        except MeshError as e:      # lwm.parallel.sharding's message, with the flags it is about
            raise ValueError(f"--mesh_dim={config.mesh_dim} --seq_len={t} --context_parallel_strategy={strategy} "
                             f"--context_parallel_load_balance={balance}: {e}") from None


def table(config: ConfigDict, model_config) -> None:
    """One mesh: the parts per device for each length (and the longest contexts with one --device_memory)."""
    import dataclasses
    import os

    plans = list(_plans(config, model_config))
    devices = _devices(config)
    device = devices[0][1] if devices else None
    if config.check_xla:          # before jax is imported anywhere (it may already be, in tests)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={math.prod(plans[0].mesh)}").strip()
    parts = ("parameters", "optimizer", "gradients", "activations", "kv_cache", "total")
    small = max(estimate(p)["train"]["total"] for p in plans) < 2**30
    unit, scale = ("MiB", 2**20) if small else ("GiB", 2**30)
    fmt = lambda x: f"{x / scale:.2f}"
    cp = f"{plans[0].sp_strategy}/{plans[0].load_balance}, " if plans[0].mesh[3] > 1 else ""
    print(f"# {config.load_llama_config}, mesh dp,fsdp,tp,sp = {config.mesh_dim or '1,1,1,1'}, {cp}{config.dtype}, "
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
    if not plans[0].config.remat_block and not config.remat_block:
        p = plans[-1]
        low = estimate(dataclasses.replace(p, config=p.config.replace(remat_block="nothing_saveable")))
        print(f"remat '' (the config's default) keeps every layer's activations for the backward; "
              f"--remat_block=nothing_saveable (LWM's long-context runs) recomputes them: train total "
              f"{fmt(low['train']['total'])} {unit} at {p.seq_len}")
    if device:
        for mode in ("train", "inference"):
            longest = max_context(plans[0], device, mode)
            print(f"longest {mode} context in {device / 2**30:.1f} GiB per device: {longest} tokens")


def answer(config: ConfigDict, model_config) -> None:
    """No mesh: for each length and device, the fewest devices that fit training and inference, and the flags."""
    dtype_bytes = 4 if config.dtype == "fp32" else 2
    strategies = (config.context_parallel_strategy,) if config.context_parallel_strategy else SP_STRATEGIES
    remats = (("" if config.remat_block == "none" else config.remat_block,) if config.remat_block
              else SEARCH_REMATS)
    caches = ((CACHE_DTYPES[config.cache_dtype],) if config.cache_dtype
              else (0,) if dtype_bytes == 2 else (0, 2))
    balance = config.context_parallel_load_balance or "none"
    lengths = parse_length_list("seq_len", config.seq_len)
    print(f"# {config.load_llama_config}: the fewest devices (powers of two, up to {config.max_devices}) whose "
          f"estimated peak fits, {config.dtype} compute, training batch {config.batch_size}, inference batch 1 "
          f"(a prefill of the whole length); searched: meshes dp,fsdp,tp,sp, sp strategies "
          f"{'/'.join(strategies)}, remat {'/'.join(r or 'none' for r in remats)}, KV cache "
          f"{'/'.join({0: config.dtype, 1: config.cache_dtype, 2: 'bf16', 4: 'fp32'}[c] for c in caches)}")
    for name, size in _devices(config):
        source = f" ({DEVICE_TABLE[name][1]})" if name in DEVICE_TABLE else ""
        print(f"# {name}: {size / 2**30:.1f} GiB per device{source}")
    print("| seq_len | device | mode | devices | mesh dp,fsdp,tp,sp | sp strategy | remat | GiB per device | flags |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in lengths:
        for name, size in _devices(config):
            for mode in ("train", "inference"):
                fits = search(model_config, t, size, mode, batch_size=config.batch_size if mode == "train" else 1,
                              dtype_bytes=dtype_bytes, strategies=strategies, load_balance=balance, remats=remats,
                              cache_bytes=caches, max_devices=config.max_devices, **_plan_fields(config))
                if not fits:
                    print(f"| {t} | {name} | {mode} | none up to {config.max_devices} | - | - | - | - | - |")
                    continue
                f = fits[0]
                sp = f.plan.sp_strategy if f.plan.mesh[3] > 1 else "-"
                remat = (f.remat or "none") if mode == "train" else "-"
                print(f"| {t} | {name} | {mode} | {f.devices} | {','.join(map(str, f.plan.mesh))} | {sp} | {remat} | "
                      f"{f.per_device / 2**30:.1f} | `{f.flags()}` |")


def main(argv=None) -> None:
    """Print the search's answer (no --mesh_dim) or one mesh's table. Raises FlagError / ValueError naming the
    flag on bad input."""
    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    _check(config)
    model_config = _model_config(config)
    if config.mesh_dim or not config.device_memory:
        table(config, model_config)
    else:
        answer(config, model_config)
    if not config.mesh_dim and not config.device_memory:
        print("(one device, mesh 1,1,1,1: --device_memory=h100 (or a size, 80GiB) finds the fewest devices that "
              "fit; --mesh_dim=dp,fsdp,tp,sp gives another mesh's table)")


if __name__ == "__main__":
    sys.exit(cli("lwm.memory", main, get_default_config, __doc__))
