"""`jax.distributed` initialisation for multi-host runs.

Flags win over the environment. Environment variables: LWM_COORDINATOR_ADDRESS (host:port),
LWM_NUM_PROCESSES, LWM_PROCESS_ID, LWM_LOCAL_DEVICE_IDS (comma list). On TPU pods and SLURM/Open MPI
clusters JAX finds all of these itself: pass `initialize=True` with nothing else.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax


@dataclasses.dataclass
class DistributedConfig:
    initialize: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[str] = None  # "0,1"


def default_flags() -> dict:
    """The original's `--jax_distributed.*` flags and their defaults (empty / -1 = not given)."""
    return dict(initialize_jax_distributed=False, coordinator_address="", num_processes=-1, process_id=-1,
                local_device_ids="")


def config_from_flags(flags) -> DistributedConfig:
    """`--jax_distributed.*` flags (any object with the `default_flags()` attributes) -> DistributedConfig."""
    return DistributedConfig(initialize=flags.initialize_jax_distributed,
                             coordinator_address=flags.coordinator_address or None,
                             num_processes=None if flags.num_processes < 0 else flags.num_processes,
                             process_id=None if flags.process_id < 0 else flags.process_id,
                             local_device_ids=flags.local_device_ids or None)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(config: DistributedConfig) -> DistributedConfig:
    """Fill unset fields from the environment; any coordinator setting implies initialize=True."""
    out = dataclasses.replace(config)
    out.coordinator_address = out.coordinator_address or os.environ.get("LWM_COORDINATOR_ADDRESS") or None
    if out.num_processes is None:
        out.num_processes = _env_int("LWM_NUM_PROCESSES")
    if out.process_id is None:
        out.process_id = _env_int("LWM_PROCESS_ID")
    out.local_device_ids = out.local_device_ids or os.environ.get("LWM_LOCAL_DEVICE_IDS") or None
    if out.coordinator_address is not None:
        out.initialize = True
        missing = [n for n in ("num_processes", "process_id") if getattr(out, n) is None]
        if missing:
            raise ValueError(f"jax_distributed: coordinator_address={out.coordinator_address!r} is set but "
                             f"{', '.join(missing)} is not (flag or LWM_NUM_PROCESSES / LWM_PROCESS_ID)")
        if not 0 <= out.process_id < out.num_processes:
            raise ValueError(f"jax_distributed: process_id={out.process_id} not in [0, {out.num_processes})")
    return out


def initialize(config: DistributedConfig) -> None:
    """Call jax.distributed.initialize once, before any other JAX call, when configured to."""
    config = resolve(config)
    if not config.initialize:
        return
    ids = None
    if config.local_device_ids:
        ids = [int(i) for i in config.local_device_ids.split(",")]
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes, process_id=config.process_id,
                               local_device_ids=ids)
