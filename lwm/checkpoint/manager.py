"""The training loop's checkpointer: one directory per checkpoint, written aside and renamed into place.

    checkpointer = Checkpointer("/run", float_dtype="fp32", save_optimizer_state=True, keep=2)
    checkpointer.save(step, train_state, dataset.get_state_dict(), metadata={"rng": rng})  # every process
    newest = latest("/run")                   # e.g. /run/step_00001000, or None
    state, _ = load_checkpoint(checkpoint_spec(newest), train_state_target=shapes)  # lwm.checkpoint.formats
    dataset.load_state_dict(read_dataset_state(newest))

A directory holds the tensors in one of lwm/checkpoint/formats.py's formats (`streaming_params`,
`streaming_train_state` or `orbax/`), `metadata.json`/`.pkl`, `dataset.json`/`.pkl`, and `checkpoint.json`,
written last: a directory without it is a partial save, never returned by `latest`. See docs/checkpoints.md.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from lwm.utils import safe_pickle
from lwm.utils.atomic import fsync_dir as _fsync_dir, move_into_place
from lwm.checkpoint.formats import CheckpointError, inner_params, is_local, parse_float_dtype, save_orbax, save_streaming

_MARKER = "checkpoint.json"
_DIR_RE = re.compile(r"^(?P<old>\.old-)?(?P<kind>step|milestone)_(?P<step>\d+)$")


def _json_default(x: Any) -> Any:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _write_json(path: str, obj: Any, what: str) -> Any:
    """Write `obj` as JSON (numpy/jax arrays become lists); returns the plain-data version written."""
    try:
        text = json.dumps(obj, default=_json_default, indent=1, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"{what}: {e}; keep it to dicts, lists, numbers, strings and arrays") from e
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return json.loads(text)


def _write_pickle(path: str, obj: Any) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _complete(path: str) -> dict | None:
    try:
        with open(os.path.join(path, _MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _checkpoint_dirs(save_dir: str) -> list[tuple[int, bool, bool, str]]:
    """(step, is_current_name, is_milestone, path) for every complete checkpoint directory."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = _DIR_RE.match(name)
        path = os.path.join(save_dir, name)
        if m and _complete(path) is not None:
            found.append((int(m["step"]), not m["old"], m["kind"] == "milestone", path))
    return sorted(found)


def latest(save_dir: str) -> str | None:
    """The newest complete checkpoint directory under `save_dir` (partial saves are skipped), or None."""
    found = _checkpoint_dirs(save_dir)        # at equal steps prefer a current name, then step_ over milestone_
    return max(found, key=lambda d: (d[0], d[1], not d[2]))[3] if found else None


def checkpoint_spec(checkpoint_dir: str) -> str:
    """The `--load_checkpoint` spec for a directory written by `Checkpointer`, e.g. for autoresume."""
    info = _complete(checkpoint_dir)
    if info is None:
        raise CheckpointError(f"{checkpoint_dir}: no {_MARKER}; not a complete checkpoint")
    kind = {"train_state": "trainstate", "params": "params"}[info["kind"]]
    if info["format"] == "orbax":
        kind = "orbax"
    return f"{kind}::{os.path.join(checkpoint_dir, info['file'])}"


def read_metadata(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, "metadata.json")
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_dataset_state(path: str) -> Any:
    """Dataset state from a checkpoint directory (its dataset.json), a .json file, or a pickle written by
    the original (read with the restricted unpickler: plain data only)."""
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    try:
        if path.endswith(".json"):
            with fsspec.open(path, "r") as f:
                return json.load(f)
        return safe_pickle.load_path(path)
    except FileNotFoundError:
        raise
    except Exception as e:       # JSON, pickle or decode errors do not name the file
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: not a readable dataset state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


class Checkpointer:
    """Saves `save_dir/step_<N>/` (the last `keep` are kept) and `save_dir/milestone_<N>/` (kept forever).

    Each directory holds `streaming_params` (or `streaming_train_state` with `save_optimizer_state`, or
    `orbax/` with `format='orbax'`), `metadata.json` + `metadata.pkl`, `dataset.json` + `dataset.pkl`, and
    `checkpoint.json`, written last. Everything is written to `save_dir/.tmp-<name>/` and renamed into
    place, so a kill mid-save leaves the previous checkpoint as `latest()`.
    float_dtype applies to the streaming format (the original's default bf16 is lossy for a resumed
    optimizer: use 'fp32' for exact resumption); orbax keeps every dtype.
    """

    def __init__(self, save_dir: str, *, float_dtype: Any = "bf16", save_optimizer_state: bool = False,
                 format: str = "streaming", keep: int = 1):
        if format not in ("streaming", "orbax"):
            raise CheckpointError(f"checkpoint format {format!r}: expected 'streaming' or 'orbax'")
        if keep < 1:
            raise CheckpointError(f"keep={keep}: at least the newest checkpoint must be kept")
        if not is_local(save_dir):
            raise CheckpointError(f"{save_dir}: Checkpointer needs a local (or mounted) directory for its "
                                  "atomic renames; use save_streaming/save_orbax for object stores")
        self.save_dir, self.format, self.keep = save_dir, format, keep
        self.float_dtype = parse_float_dtype(float_dtype)
        self.save_optimizer_state = save_optimizer_state
        self.is_writer = jax.process_index() == 0

    def save(self, step: int, train_state: Any, dataset_state: Any = None, metadata: dict | None = None,
             milestone: bool = False) -> str:
        """Write one checkpoint of `train_state` (a TrainState, or a params tree) and return its directory.
        Call on every process."""
        step = int(step)
        name = f"{'milestone' if milestone else 'step'}_{step:08d}"
        final, tmp = os.path.join(self.save_dir, name), os.path.join(self.save_dir, f".tmp-{name}")
        if self.is_writer:
            os.makedirs(self.save_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)     # left by a killed save of the same step
            os.makedirs(tmp)
        _barrier(f"lwm_checkpoint_start_{name}")
        try:
            if self.save_optimizer_state:
                state, kind, file = train_state, "train_state", "streaming_train_state"
            else:
                params = train_state.params if hasattr(train_state, "params") else train_state
                state, kind, file = inner_params(params), "params", "streaming_params"
            if self.format == "orbax":
                file = "orbax"
                save_orbax(os.path.join(tmp, file), state)
            else:
                save_streaming(os.path.join(tmp, file), state, self.float_dtype, write=self.is_writer)
            if self.is_writer:
                self._write_side_files(tmp, step, metadata, dataset_state)
                info = dict(format=self.format, kind=kind, file=file, step=step, milestone=milestone,
                            float_dtype=None if self.float_dtype is None else self.float_dtype.name)
                _write_json(os.path.join(tmp, _MARKER), info, f"{tmp}/{_MARKER}")
                _fsync_dir(tmp)
            _barrier(f"lwm_checkpoint_written_{name}")
            if self.is_writer:
                move_into_place(tmp, final)      # lwm.utils.atomic: old kept as .old-NAME until the new is in
                self._prune()
        except BaseException:
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier(f"lwm_checkpoint_done_{name}")
        return final

    def _write_side_files(self, tmp: str, step: int, metadata: dict | None, dataset_state: Any) -> None:
        meta = _write_json(os.path.join(tmp, "metadata.json"), {**(metadata or {}), "step": step},
                           "checkpoint metadata")
        data = _write_json(os.path.join(tmp, "dataset.json"), dataset_state, "dataset state")
        # For the original's tools (`tux.load_pickle`); plain data only, so `safe_pickle` reads them back.
        _write_pickle(os.path.join(tmp, "metadata.pkl"), meta)
        _write_pickle(os.path.join(tmp, "dataset.pkl"), data)

    def _prune(self) -> None:
        regular = [path for step, current, milestone, path in _checkpoint_dirs(self.save_dir)
                   if current and not milestone]
        stale = [path for _, current, _, path in _checkpoint_dirs(self.save_dir) if not current]
        stale += [os.path.join(self.save_dir, name) for name in os.listdir(self.save_dir)
                  if name.startswith(".tmp-")]               # left by killed saves; ours is renamed by now
        for path in regular[:-self.keep] + stale:
            shutil.rmtree(path, ignore_errors=True)
