"""Arrays and host state across processes (`jax.distributed`): reading replicated values, placing host
values and batches on a mesh that spans processes, and gathering each process's dataset state.

Used by the training loop (`lwm.train`); knows nothing of the model or the step functions.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def host_value(x) -> np.ndarray:
    """A replicated jax.Array (possibly spread over processes) as numpy, from this process's copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def replicate(value, sharding) -> jax.Array:
    """The same host value on every device of `sharding` (a global array, also across processes)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(batch: dict, mesh, host, sharded_loader: bool = True) -> dict:
    """This process's part of a batch -> global (B, T) arrays sharded as `lwm.parallel.sharding.batch_spec`
    (P(('dp', 'fsdp'), 'sp')). Without the sharded loader every process holds the whole batch and keeps its
    devices' slices."""
    from jax.sharding import NamedSharding

    from lwm.training.packing import make_global_batch
    from lwm.parallel.sharding import batch_spec

    if sharded_loader:
        return make_global_batch(batch, mesh, host=host)
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return {k: replicate(v, sharding) for k, v in batch.items()}


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def gather_process_states(state: Any) -> Any:
    """Every process's dataset state, for process 0 to save: the state itself with one process, else
    {'process_states': [state of process 0, state of process 1, ...]}. Call on every process."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state, default=_json_default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return {"process_states": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]}


def process_state(state: Any) -> Any:
    """This process's part of what `gather_process_states` saved (or a single-process state as it is)."""
    if isinstance(state, dict) and "process_states" in state:
        states = state["process_states"]
        if len(states) != jax.process_count():
            raise ValueError(f"the dataset state was saved by {len(states)} processes, this run has "
                             f"{jax.process_count()}; resume with the same number of processes")
        return states[jax.process_index()]
    return state
