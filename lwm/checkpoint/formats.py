"""Checkpoint formats: the original LWM streaming format, orbax for sharded runs, and `load_checkpoint`, which
reads what a `--load_checkpoint TYPE::PATH` flag names. The training loop's `Checkpointer` (one directory per
save, retention, `latest` for autoresume) is in lwm/checkpoint/manager.py.

Streaming format (what `tux.StreamingCheckpointer` writes, and so what the official LWM checkpoints are):
a file of concatenated msgpack 2-arrays `[key_path, flax.serialization.to_bytes(tensor)]`, no header, where
`key_path` is the list of string keys of `flax.traverse_util.flatten_dict(to_state_dict(tree))`. Floating
tensors are stored in `float_dtype` (the original's default: bf16); integers are stored as they are. Empty
containers (optax's `EmptyState`) are not written; they are refilled from the target on load.

    params::PATH             PATH holds the inner linen tree (keys `transformer/wte/embedding`, ...);
                             loaded back as {'params': tree}.
    trainstate::PATH         PATH holds a whole flax TrainState state dict (`step`, `params/params/...`,
                             `opt_state/0/mu/params/...`).
    trainstate_params::PATH  the `params/params/...` entries of a train-state file, as {'params': tree}.
    flax_params::PATH        one `flax.serialization.msgpack_serialize` blob of the inner tree.
    orbax::DIR               a directory written by `save_orbax` (parallel, sharded writes).
    hf::DIR                  a local Hugging Face folder of a LLaMA-family model, or our vision export
                             (`lwm.checkpoint.hf_folders`); loaded as {'params': tree} in the target's layer layout.

Every tensor is read, checked against the target (key path, shape), cast and placed onto its sharding before
the next one is read, so a 7B checkpoint never sits whole in host memory twice nor whole on one device.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.serialization
import fsspec
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax.traverse_util import empty_node, flatten_dict, unflatten_dict

from lwm.utils import dtypes, trees

from lwm.parallel import multihost

_READ_SIZE = 16 * 2**20          # bytes read from the file at a time
_MAX_RECORD_BYTES = 2**40        # one tensor may be this large (msgpack's default cap is 100 MiB)
Key = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint file or directory does not match what was asked of it."""


def parse_float_dtype(name: Any) -> np.dtype | None:
    """The one dtype table's parser (`lwm.utils.dtypes.parse_float_dtype`) for a checkpoint's float_dtype:
    a name or dtype -> np.dtype, None or '' -> None; raises CheckpointError with the table's message."""
    try:
        return dtypes.parse_float_dtype(name, what="float_dtype")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _path_str(key: Key) -> str:
    return "/".join(key)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def _cast_float(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Cast floating tensors to `dtype` (as the original's `get_dtype` does); anything else is untouched."""
    if dtype is None or not _is_float(x.dtype) or x.dtype == dtype:
        return x
    return x.astype(dtype)


def _open(path: str, mode: str):
    return fsspec.open(path, mode)


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


# ---------------------------------------------------------------------------------------------------------
# Streaming format.


def _to_host(x: Any, needed: bool) -> Any:
    """Bring one leaf to host memory as numpy (`lwm.parallel.multihost.host_array`). Arrays spread over
    several processes are gathered first (a collective: every process must call this in the same order);
    `needed=False` skips the copy where no collective is due."""
    if isinstance(x, (int, float, bool)) and not isinstance(x, np.generic):
        return x if needed else None  # python scalars (TrainState.create's step=0) are stored as msgpack numbers
    if not needed and not multihost.needs_gather(x):
        return None
    x = multihost.host_array(x)
    return x if needed else None


def _bin_header(n: int) -> bytes:
    """msgpack's header for a byte string of length n < 4 GiB (the smallest form, as msgpack packs it)."""
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    return b"\xc5" + n.to_bytes(2, "big") if n < 2**16 else b"\xc6" + n.to_bytes(4, "big")


def save_streaming(path: str, tree: Any, float_dtype: Any = None, *, write: bool | None = None) -> None:
    """Write `tree` (a dict, FrozenDict or flax struct such as TrainState) in the streaming format.

    Tensors are gathered, cast and written one at a time. Local files are written to `path.tmp` and renamed
    over `path` at the end, so a crash never leaves a half-written file under `path`. In a multi-process
    run every process must call this (gathering sharded arrays is collective); only `write=True` (default:
    process 0) writes.
    """
    dtype = parse_float_dtype(float_dtype)
    write = jax.process_index() == 0 if write is None else write
    flat = flatten_dict(flax.serialization.to_state_dict(tree))
    if not write:
        for value in flat.values():
            _to_host(value, needed=False)
        return
    local = is_local(path)
    tmp = f"{path}.tmp" if local else path
    packer = msgpack.Packer()
    try:
        with _open(tmp, "wb") as f:
            for key, value in flat.items():
                value = _to_host(value, needed=True)
                if isinstance(value, np.ndarray):
                    value = _cast_float(value, dtype)
                    if value.nbytes > 2**32 - 2**10:
                        raise CheckpointError(
                            f"{path}: {_path_str(key)} is {value.nbytes / 2**30:.1f} GiB; one msgpack record "
                            "holds under 4 GiB (the original's limit too): save in bf16 or use save_orbax")
                blob = flax.serialization.to_bytes(value)
                # Same bytes as packer.pack((key, blob)), without a second copy of the tensor.
                f.write(packer.pack_array_header(2))
                f.write(packer.pack(list(key)))
                f.write(_bin_header(len(blob)))
                f.write(blob)
                del value, blob
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
    except BaseException:
        if local and os.path.exists(tmp):
            os.remove(tmp)
        raise


def iter_streaming(path: str) -> Iterator[tuple[Key, Any]]:
    """Yield (key_path, value) from a streaming checkpoint, one tensor at a time, as numpy/python values."""
    with _open(path, "rb") as f:
        # raw=True: msgpack < 1.0 packed bytes as the str type; keys are decoded below, tensors stay bytes.
        unpacker = msgpack.Unpacker(f, read_size=_READ_SIZE, max_buffer_size=_MAX_RECORD_BYTES, raw=True)
        for i in range(1 << 62):
            try:
                record = next(unpacker)
            except StopIteration:
                break
            except Exception as e:      # msgpack's errors (bad bytes, a map key of the wrong type) name no file
                raise CheckpointError(f"{path}: record {i} is unreadable ({type(e).__name__}: {e}); not a "
                                      f"streaming checkpoint, or a corrupt one") from None
            if not (isinstance(record, list) and len(record) == 2 and isinstance(record[0], list)
                    and isinstance(record[1], bytes) and all(isinstance(k, bytes) for k in record[0])):
                raise CheckpointError(
                    f"{path}: record {i} is not a [key_path, bytes] pair; not a streaming checkpoint")
            key = tuple(k.decode("utf-8") for k in record[0])
            yield key, flax.serialization.from_bytes(None, record[1])
        consumed, size = unpacker.tell(), f.tell()
        if consumed != size:
            raise CheckpointError(f"{path}: truncated, the last record stops at byte {consumed} of {size}")


def _flat_shardings(shardings: Any) -> dict[Key, Any]:
    if shardings is None:
        return {}
    flat = flatten_dict(flax.serialization.to_state_dict(shardings))
    for key, s in flat.items():
        if s is not None and not isinstance(s, jax.sharding.Sharding):
            raise CheckpointError(f"shardings/{_path_str(key)}: expected a jax.sharding.Sharding or None, got "
                                  f"{type(s).__name__} (build NamedSharding(mesh, spec) from a PartitionSpec)")
    return flat


def _place(value: np.ndarray, sharding: Any) -> Any:
    """Put a host tensor onto `sharding`; each device receives only its own slice."""
    if sharding is None:
        return value
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


_TRAIN_STATE_HINT = ("; this looks like a whole train state (keys step, params/params/..., opt_state/...): "
                     "load its parameters with trainstate_params::PATH")


def _is_layer_index(part: str) -> bool:
    return part.isdigit()


class TreeValidator(trees.TreeValidator):
    """The one tree validator (`lwm.utils.trees.TreeValidator`) for every checkpoint format (streaming,
    flax_params, orbax, hf), raising CheckpointError lines `SOURCE: key/path: problem`, with a hint when the
    checkpoint was saved with the other layer layout (`scan_layers`, `param_scan_axis`) or is a train state
    read as params."""

    error = CheckpointError

    def key_hint(self, key: Key) -> str:
        """Why `key` may be absent from the target: the other `scan_layers` layout, or a train state."""
        keys = [k for k, leaf in self.expected.items() if leaf is not empty_node]
        target_scanned = any("scan_decoder" in k for k in keys)
        target_unrolled = any(_is_layer_index(p) for k in keys for p in k)
        if "scan_decoder" in key and not target_scanned and target_unrolled:
            return ("; the checkpoint stacks the layers under h/scan_decoder (saved with scan_layers=True): "
                    "load it with --llama.scan_layers=True")
        if any(_is_layer_index(p) for p in key) and target_scanned:
            return ("; the checkpoint has one entry per layer (h/<i>/..., saved with scan_layers=False): load it "
                    "with --llama.scan_layers=False")
        if not self.prefix and (key[:1] in (("step",), ("opt_state",)) or key[:2] == ("params", "params")):
            return _TRAIN_STATE_HINT
        return ""

    def shape_hint(self, key: Key, shape: tuple[int, ...], target_shape: tuple[int, ...]) -> str:
        """The layer axis at the other position: saved with the other `param_scan_axis`."""
        swapped = len(shape) >= 2 and (shape[1], shape[0]) + shape[2:] == target_shape
        if "scan_decoder" in key and swapped:
            return ("; the layer axis is at the other position (saved with the other param_scan_axis): "
                    "flip --llama.param_scan_axis (0 <-> 1)")
        return ""


class _Assembler:
    """Checks (TreeValidator), casts and places tensors one at a time, then builds the tree."""

    def __init__(self, source: str, target: Any, shardings: Any, float_dtype: Any):
        self.source, self.target = source, target
        self.dtype = parse_float_dtype(float_dtype)
        self.shardings = _flat_shardings(shardings)
        self.validator = None if target is None else TreeValidator(source, target)
        self.out: dict[Key, Any] = {}

    def add(self, key: Key, value: Any) -> None:
        value = np.asarray(value)
        dtype = self.dtype
        if self.validator is not None:
            _, target_dtype = self.validator.check(key, value.shape, value.dtype)
            if dtype is None:
                dtype = target_dtype
            if not _is_float(value.dtype):
                value = value.astype(target_dtype)
        elif key in self.out:
            raise CheckpointError(f"{self.source}: {_path_str(key)}: key appears twice")
        self.out[key] = _place(_cast_float(value, dtype), self.shardings.get(key))

    def finish(self) -> Any:
        if self.validator is not None:
            self.validator.missing()
            for key in self.validator.empty_keys():
                self.out[key] = {}
        tree = unflatten_dict(self.out)
        if self.target is None:
            return tree
        return flax.serialization.from_state_dict(self.target, tree)


def load_streaming(path: str, target: Any = None, shardings: Any = None, float_dtype: Any = None, *,
                   prefix: Key = ()) -> Any:
    """Read a streaming checkpoint.

    target: a tree of arrays or `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`), used for checking
      (every key present, nothing extra, same shapes) and as the structure of the result (dicts, TrainState).
      Floats are cast to the target's dtype unless `float_dtype` says otherwise.
    shardings: a tree like `target` of `jax.sharding.Sharding` (or None leaves); each tensor is placed on
      its sharding as soon as it is read.
    prefix: only entries under this key path are read, with the prefix removed.
    Without a target the result is a nested dict of numpy arrays.
    """
    out = _Assembler(path, target, shardings, float_dtype)
    for key, value in iter_streaming(path):
        if key[:len(prefix)] != tuple(prefix):
            continue
        out.add(key[len(prefix):], value)
    if not out.out and prefix:
        raise CheckpointError(f"{path}: no entries under {_path_str(prefix)}/")
    return out.finish()


def load_flax_msgpack(path: str, target: Any = None, shardings: Any = None, float_dtype: Any = None) -> Any:
    """Read a whole-tree `flax.serialization.msgpack_serialize` file (the original's `flax_params::`)."""
    with _open(path, "rb") as f:
        raw = f.read()
    try:
        state = flax.serialization.msgpack_restore(raw)
    except Exception as e:      # msgpack's errors ("unpack(b) received extra data.") name no file
        raise CheckpointError(f"{path}: not a flax msgpack file ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a flax msgpack parameter tree (a {type(state).__name__})")
    out = _Assembler(path, target, shardings, float_dtype)
    for key, value in flatten_dict(state).items():
        out.add(key, value)
    return out.finish()


# ---------------------------------------------------------------------------------------------------------
# Orbax: every process writes its own shards in parallel.


def save_orbax(directory: str, tree: Any) -> None:
    """Save `tree` with orbax (each process writes its shards; dtypes kept). Call on every process.
    Orbax writes into a temporary directory and renames it when complete."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory) if is_local(directory) else directory,
                   flax.serialization.to_state_dict(tree))
        ckptr.wait_until_finished()


def _orbax_saved_keys(path: str) -> dict[Key, Any]:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        return flatten_dict(ckptr.metadata(path).item_metadata.tree)


def load_orbax(directory: str, target: Any, shardings: Any = None, float_dtype: Any = None, *,
               prefix: Key = ()) -> Any:
    """Restore an orbax checkpoint (or its part under `prefix`) onto `shardings` (default: each tensor on
    the first local device). The target gives structure, shapes and dtypes, so a restore may use another
    mesh than the save did; every process reads only the shards it holds."""
    import orbax.checkpoint as ocp

    if target is None:
        raise CheckpointError(f"orbax::{directory}: a target (tree of shapes/dtypes) is needed to restore")
    path = os.path.abspath(directory) if is_local(directory) else directory
    dtype = parse_float_dtype(float_dtype)
    flat_shardings = _flat_shardings(shardings)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    validator = TreeValidator(f"orbax::{directory}", target, prefix)
    abstract = {}
    for key, meta in _orbax_saved_keys(path).items():
        if key[:len(prefix)] != tuple(prefix):
            continue
        key = key[len(prefix):]
        shape, leaf_dtype = validator.check(key, tuple(meta.shape))
        if dtype is not None and _is_float(leaf_dtype):
            leaf_dtype = dtype
        abstract[tuple(prefix) + key] = jax.ShapeDtypeStruct(shape, leaf_dtype,
                                                            sharding=flat_shardings.get(key) or default)
    validator.missing()
    item = unflatten_dict(abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    out = {key[len(prefix):]: value for key, value in flatten_dict(restored).items()}
    for key in validator.empty_keys():
        out[key] = {}
    return flax.serialization.from_state_dict(target, unflatten_dict(out))


def _orbax_params_prefix(path: str) -> Key:
    """Where the params sit in an orbax tree: a wrapped train state, an unwrapped one, or bare params."""
    keys = _orbax_saved_keys(os.path.abspath(path) if is_local(path) else path)
    heads = {key[:2] for key in keys}
    if ("params", "params") in heads:
        return ("params", "params")
    return ("params",) if ("step",) in keys else ()


# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders.


def load_hf(directory: str, target: Any = None, shardings: Any = None, float_dtype: Any = None) -> Any:
    """Read a local Hugging Face folder (safetensors or .bin, sharded or not; see `lwm.checkpoint.hf_folders`) one LWM
    tensor at a time into the target's layout: scanned (`h/scan_decoder`, on the target's layer axis) or
    unscanned (`h/<i>`). Without a target: scanned on axis 0, numpy arrays in the stored dtype."""
    from lwm.checkpoint.hf_folders import iter_hf_params, lwm_config_from_hf

    scan, axis = True, 0
    if target is not None:
        layers = inner_params(target)["transformer"]["h"]
        scan = "scan_decoder" in layers
        if scan:
            norm = layers["scan_decoder"]["attention_norm"]["kernel"]
            num_layers = lwm_config_from_hf(directory).num_hidden_layers
            axis = 0 if trees.leaf_shape_dtype(norm)[0][0] == num_layers else 1
    out = _Assembler(f"hf::{directory}", target, shardings, float_dtype)
    for key, value in iter_hf_params(directory, scan_layers=scan, param_scan_axis=axis):
        out.add(key, value)
    return out.finish()


# ---------------------------------------------------------------------------------------------------------
# `--load_checkpoint` specs.


def inner_params(params: Any) -> Any:
    """The original keeps `train_state.params == {'params': tree}`; return `tree` either way."""
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        return params["params"]
    return params


def _folder_hint(kind: str, path: str) -> str:
    """What to give instead of a checkpoint folder (lwm.train's step_N folders hold streaming_params and, with
    the optimizer state saved, streaming_train_state)."""
    inside = set(os.listdir(path))
    if kind == "params" and "streaming_params" in inside:
        return f"give the file inside it: params::{os.path.join(path, 'streaming_params')}"
    if "streaming_train_state" in inside and kind != "params":
        return f"give the file inside it: {kind}::{os.path.join(path, 'streaming_train_state')}"
    if "streaming_train_state" in inside:
        return f"it holds a train state: trainstate_params::{os.path.join(path, 'streaming_train_state')}"
    if "streaming_params" in inside:
        return f"it holds parameters: params::{os.path.join(path, 'streaming_params')}"
    return "give the checkpoint file (streaming_params or streaming_train_state of an lwm.train step folder)"


def load_checkpoint(spec: str, *, train_state_target: Any = None, train_state_shardings: Any = None,
                    params_target: Any = None, params_shardings: Any = None, float_dtype: Any = None,
                    disallow_trainstate: bool = False) -> tuple[Any, Any]:
    """Load what an original `--load_checkpoint TYPE::PATH` flag names. Returns (train_state, params):
    one of them is None; params come back as {'params': tree}, as the original's loader returns them.

    params_target / params_shardings default to `train_state_target.params` (with its {'params': ...}
    wrapper removed) and the same part of `train_state_shardings`.

    >>> _, params = load_checkpoint("params::/ckpt/streaming_params", params_target=shapes)  # doctest: +SKIP
    """
    if "::" not in spec:
        raise CheckpointError(f"--load_checkpoint {spec!r}: expected TYPE::PATH with TYPE one of params, "
                              "trainstate, trainstate_params, flax_params, orbax, hf")
    kind, path = spec.split("::", 1)
    if kind in ("params", "trainstate", "trainstate_params") and os.path.isdir(path):
        raise CheckpointError(f"--load_checkpoint {spec!r}: {path} is a folder; " + _folder_hint(kind, path))
    if params_target is None and train_state_target is not None:
        params_target = inner_params(train_state_target.params)
    if params_shardings is None and train_state_shardings is not None:
        params_shardings = inner_params(train_state_shardings.params)
    if kind == "trainstate" and disallow_trainstate:
        raise CheckpointError(f"--load_checkpoint {spec!r}: a whole train state is not accepted here; use "
                              "params:: or trainstate_params::")
    if kind == "trainstate":
        return load_streaming(path, train_state_target, train_state_shardings, float_dtype), None
    if kind == "orbax":
        prefix = _orbax_params_prefix(path)
        if prefix and train_state_target is not None and not disallow_trainstate:     # a whole train state
            return load_orbax(path, train_state_target, train_state_shardings, float_dtype), None
        return None, {"params": load_orbax(path, params_target, params_shardings, float_dtype, prefix=prefix)}
    if kind == "params":
        params = load_streaming(path, params_target, params_shardings, float_dtype)
        if params_target is None and isinstance(params, Mapping) and {"step", "opt_state"} <= set(params):
            raise CheckpointError(f"--load_checkpoint {spec!r}: not a params file" + _TRAIN_STATE_HINT)
    elif kind == "trainstate_params":
        try:
            params = load_streaming(path, params_target, params_shardings, float_dtype, prefix=("params", "params"))
        except CheckpointError as e:
            if "no entries under" not in str(e):
                raise
            # A train state whose params are not wrapped in {'params': ...}.
            params = load_streaming(path, params_target, params_shardings, float_dtype, prefix=("params",))
    elif kind == "flax_params":
        params = load_flax_msgpack(path, params_target, params_shardings, float_dtype)
    elif kind == "hf":
        params = load_hf(path, params_target, params_shardings, float_dtype)
    else:
        raise CheckpointError(f"--load_checkpoint {spec!r}: unknown type {kind!r}; expected params, "
                              "trainstate, trainstate_params, flax_params, orbax or hf")
    return None, {"params": params}
