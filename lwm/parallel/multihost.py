"""Arrays and host state across processes (`jax.distributed`): which part of every batch this process
builds, joining the parts into global arrays, placing host values on a mesh, the one read-back of a jax.Array
to numpy, and gathering each process's dataset state.

    host = host_shard_from_mesh(mesh)                 # this process's rows and sequence columns
    dataset = DatasetFactory.load_dataset(config, tokenizer, host=host)
    batch = global_batch(local_batch, mesh, host)     # global (B, T) arrays, P(('dp', 'fsdp'), 'sp')
    loss = float(host_array(metrics["loss"]))         # numpy on every process
    message = broadcast_bytes(blob if jax.process_index() == 0 else None)   # process 0's bytes everywhere

Used by the training loop, the checkpoint writer, the engine and the server across hosts (`broadcast_bytes`);
knows nothing of the model, the data pipeline or the step functions.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from lwm.parallel.sharding import BATCH_AXES, SEQ_AXIS, batch_spec


def host_array(x) -> np.ndarray:
    """The one read-back (tests/test_one_home.py::test_rule_holds[read_back]: no other module calls
    process_allgather or addressable_data): a numpy copy of x on every process. A jax.Array spread over several
    processes is read from this process's copy when it is fully replicated, else gathered first with
    `multihost_utils.process_allgather` (a collective: every process must call this, in the same order);
    a local jax.Array, a numpy array or a Python number is converted as it is."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:                       # every process holds a whole copy: read its own
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def needs_gather(x) -> bool:
    """True when `host_array(x)` is a collective (x's shards live on several processes, not replicated)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated


def replicate(value, sharding) -> jax.Array:
    """The same host value on every device of `sharding` (a global array, also across processes)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ------------------------------------------------------------------------------------- batches over hosts


class HostShard(NamedTuple):
    """Which part of every global batch this process builds: rows of data-parallel block `dp_rank` (of
    `dp_size`) and columns of sequence block `sp_rank` (of `sp_size`). Processes with the same dp_rank read
    the same examples and build the same rows; those with different sp_rank keep different columns."""

    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1

    def to_dict(self) -> dict:
        return dict(self._asdict())


def _block(indices: np.ndarray, n: int, what: str, process: int) -> tuple[int, int]:
    """Contiguous aligned block of mesh indices -> (rank, size)."""
    idx = np.unique(indices)
    k = len(idx)
    if n % k or idx[0] % k or not np.array_equal(idx, np.arange(idx[0], idx[0] + k)):
        raise ValueError(f"process {process} holds {what} indices {idx.tolist()} of {n}: the batch can only be "
                         "split over hosts in contiguous, equal blocks (reorder the mesh devices)")
    return int(idx[0] // k), n // k


def host_layout(axis_names, device_processes, process_index: int, data_axes=None,
                seq_axis: str | None = None) -> HostShard:
    """HostShard of `process_index` for a batch sharded P(data_axes, seq_axis) over a mesh whose devices
    belong to the processes `device_processes` (an int array shaped like the mesh). The axes default to
    lwm.parallel.sharding's BATCH_AXES (dp, fsdp) and SEQ_AXIS (sp).

    >>> # dp=2 over two hosts, sp=2 within each: host 1 builds rows 2..3 of a 4-row batch, all columns
    >>> host_layout(("dp", "sp"), np.array([[0, 0], [1, 1]]), 1)
    HostShard(dp_rank=1, dp_size=2, sp_rank=0, sp_size=1)
    """
    data_axes = BATCH_AXES if data_axes is None else data_axes
    seq_axis = SEQ_AXIS if seq_axis is None else seq_axis
    procs = np.asarray(device_processes)
    names = list(axis_names)
    if procs.ndim != len(names):
        raise ValueError(f"device_processes has {procs.ndim} axes, the mesh {len(names)} ({names})")
    data = [names.index(a) for a in data_axes if a in names]
    seq = [names.index(seq_axis)] if seq_axis in names else []
    rest = [i for i in range(len(names)) if i not in data + seq]
    grid = np.transpose(procs, data + seq + rest)
    n_data = int(np.prod([procs.shape[i] for i in data], dtype=int))
    n_seq = int(np.prod([procs.shape[i] for i in seq], dtype=int))
    grid = grid.reshape(n_data, n_seq, -1)  # (data index, sequence index, other axes)
    result = {}
    for p in np.unique(procs):
        d, s, _ = np.nonzero(grid == p)
        result[int(p)] = HostShard(*_block(d, n_data, "data-parallel", p), *_block(s, n_seq, "sequence", p))
    if process_index not in result:
        raise ValueError(f"process {process_index} owns no device of the mesh")
    return result[process_index]


def host_shard_from_mesh(mesh, process_index: int | None = None) -> HostShard:
    """HostShard for this process (or `process_index`) under a jax Mesh with axes among dp, fsdp, tp, sp."""
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return host_layout(mesh.axis_names, procs, jax.process_index() if process_index is None else process_index)


def global_batch(batch: dict, mesh, host: HostShard | None, spec=None) -> dict:
    """This process's part of a batch -> global (B, T) jax Arrays sharded by `spec` (default
    lwm.parallel.sharding.batch_spec: P(('dp', 'fsdp'), 'sp'), limited to the axes the mesh has).

    host: the HostShard this process built (`host_shard_from_mesh(mesh)`): its local arrays are
    (B / dp_size, T / sp_size) and are joined with `jax.make_array_from_process_local_data`. None: every
    process holds the whole (B, T) batch and its devices keep their slices."""
    sharding = NamedSharding(mesh, batch_spec(mesh) if spec is None else spec)
    if host is None:
        return {k: replicate(v, sharding) for k, v in batch.items()}
    out = {}
    for key, local in batch.items():
        shape = (local.shape[0] * host.dp_size, local.shape[1] * host.sp_size, *local.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local), shape)
    return out


# ------------------------------------------------------------------------------------------ host state

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


BROADCAST_INLINE = 4096   # bytes of the fixed first buffer of `broadcast_bytes` (an 8-byte length, then data)


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's `data` on every process (the others pass None): a collective, so every process calls it, in
    the same order. One `multihost_utils.broadcast_one_to_all` of a fixed BROADCAST_INLINE-byte buffer (the
    length, then the bytes when they fit), else a second one of the next power of two bytes, so only a few
    shapes ever compile. One process: `data` as it is."""
    if jax.process_count() == 1:
        return bytes(data or b"")
    from jax.experimental import multihost_utils

    source = jax.process_index() == 0
    if source and data is None:
        raise ValueError("broadcast_bytes: process 0 is the source and must pass the bytes")
    head = np.zeros(BROADCAST_INLINE, np.uint8)
    if source:
        head[:8] = np.frombuffer(np.uint64(len(data)).tobytes(), np.uint8)
        if len(data) <= BROADCAST_INLINE - 8:
            head[8:8 + len(data)] = np.frombuffer(data, np.uint8)
    head = np.asarray(multihost_utils.broadcast_one_to_all(head))
    n = int(np.frombuffer(head[:8].tobytes(), np.uint64)[0])
    if n <= BROADCAST_INLINE - 8:
        return head[8:8 + n].tobytes()
    body = np.zeros(1 << (n - 1).bit_length(), np.uint8)
    if source:
        body[:n] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(body))[:n].tobytes()


def process_state(state: Any) -> Any:
    """This process's part of what `gather_process_states` saved (or a single-process state as it is)."""
    if isinstance(state, dict) and "process_states" in state:
        states = state["process_states"]
        if len(states) != jax.process_count():
            raise ValueError(f"the dataset state was saved by {len(states)} processes, this run has "
                             f"{jax.process_count()}; resume with the same number of processes")
        return states[jax.process_index()]
    return state
