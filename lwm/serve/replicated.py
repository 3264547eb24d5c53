"""The server across hosts: process 0 drives the one engine, every other process follows its calls.

    # every process (python -m lwm.serve with --jax_distributed.*): the same flags, the same engine
    check_same_flags(config)                     # one line naming the flags a process disagrees on
    if jax.process_index() == 0:
        engine = ReplicatedEngine(engine)        # the scheduler uses it as the engine; HTTP on process 0 only
        ...; engine.close()                      # the followers return
    else:
        serve_follower(engine)                   # until process 0 closes

Under `jax.distributed` every process must run the same computations on its part of every global array, in the
same order (multi-controller JAX): a KV cache sharded over `sp` across hosts is prefilled, decoded and read
back by all of them at once. Process 0 alone decides what to run (its scheduler, lwm.serve.scheduler, is
unchanged); `ReplicatedEngine` sends each engine call that touches devices (`REPLICATED`) as one message
to the other processes before running it, and each follower runs the same method of its own engine with the
same arguments. A message is JSON (method name, arguments, the ids of released values, the id of the held
object whose method it is, if not the engine's), numpy arrays as base64 of their bytes and a few named
dataclasses; never pickle. It goes out through
lwm.parallel.multihost.broadcast_bytes (one collective of a fixed 4 KiB buffer for a small message) and every
process, process 0 included, decodes the same bytes and makes the same call, so their arguments cannot drift.

Device values an engine call returns (a DecodeState, a prefill's logits and cache) stay on the devices: every
process keeps them in a registry under the same id (ids are counted in call order, the same on all), and
process 0's caller gets a `Handle` in their place, which it passes back in later calls as it would the value.
A handle that process 0 drops (garbage collected) is released on every process with the next message.
Host values (tokens, log-probabilities) come back as they are: the engine's read-back (host_array) already
gathers them on every process.

The prefix cache and chunked prefill. Every process holds its own `PrefixCache` (`ReplicatedEngine.prefix_cache`,
one replicated call: process 0 resolves the default budget and sends it, so every copy has the same budget) and
every process makes the same lookups, stores and evictions in the same order, so the copies stay equal (LRU is
deterministic; the block keys are BLAKE2b of the ids, the same on every host). Process 0's caller gets its own
copy, the real object: what reads it (`keys`, `in`, `stats()`) reads process 0's copy, and passing it to a
replicated call sends its id. `start_prefill` is replicated too: each process keeps its `ChunkedPrefill` under one
id, and process 0's caller gets a `RemotePrefill` whose host fields (done, remaining, cached, chunk) read process
0's copy while `step()`, `result()` and `run()` are messages that every process runs (`result()` returns a Prefix
whose cache and logits are handles). Only those calls may change a copy: a caller that changes process
0's PrefixCache by itself (`put`, `clear`, `match`) leaves the processes out of step.

While idle, process 0 sends a no-op every `keepalive_s`, so a follower never waits on one collective for long.
Limits: docs/serve.md, "Across hosts".
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import json
import sys
import threading
import time
import weakref
from typing import Any, Optional

import jax
import numpy as np

from lwm.inference.engine import ChunkedPrefill, DecodeState, Prefix, TokenLogprobs
from lwm.inference.prefix_cache import PrefixCache, default_budget_bytes
from lwm.inference.sampling import SamplingConfig
from lwm.parallel.multihost import broadcast_bytes, gather_process_states

# Engine methods that touch devices: process 0 runs them only with every follower running them too.
REPLICATED = ("init_state", "prefill", "prefill_batch", "insert", "step", "move", "free", "active", "drawn",
              "score", "generate", "prefix_cache", "start_prefill")
# Methods of the objects every process holds under one id (a ChunkedPrefill), run on every process likewise.
OBJECT_METHODS = {ChunkedPrefill: ("step", "result", "run")}
# Engine attributes read on process 0 alone (host-side: no device computation).
LOCAL = ("config", "model", "head", "head_size", "vocab_size", "eos_id", "pad_id", "cache_dtype", "vision",
         "last_stats", "padded_length", "mesh_sizes", "check_length", "check_chunking", "block_bytes")
# Flags that only process 0 reads (its HTTP side) or that name the process itself: they may differ.
PROCESS_FLAGS = ("jax_distributed.process_id", "jax_distributed.local_device_ids", "host", "port", "api_key")
_STOP, _NOOP = "__stop__", "__noop__"
_DTYPE_KINDS = "biuf"     # numpy arrays a message may carry: bool, ints, unsigned ints, floats


def _dataclasses() -> dict:
    """The dataclasses a message may carry, by name: the sampling settings and the frame rule of image
    generation (lwm.inference.vision.FrameRule). A new engine call whose arguments hold another type is
    refused by `encode` until it is added here (and its method to REPLICATED)."""
    out = {"SamplingConfig": SamplingConfig}
    from lwm.inference.vision import FrameRule

    out["FrameRule"] = FrameRule
    return out


class OutOfStep(RuntimeError):
    """A follower received a message out of order: the processes no longer run the same calls."""


class Handle:
    """Process 0's stand-in for a device value that every process holds under the same `id` (module docstring).
    `is_deleted()`: whether that value's arrays were donated to a later call (the scheduler asks after a
    failed insert)."""
    __slots__ = ("id", "_owner", "__weakref__")

    def __init__(self, id: int, owner: "ReplicatedEngine"):
        self.id, self._owner = id, owner

    def is_deleted(self) -> bool:
        value = self._owner._values.get(self.id)
        return value is None or any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id})"


class RemotePrefill(Handle):
    """Process 0's stand-in for the `ChunkedPrefill` every process holds under `id` (`ReplicatedEngine.
    start_prefill`): `done`, `remaining`, `cached` and `chunk` read process 0's copy (host fields, no message);
    `step()`, `result()` and `run()` are replicated calls (`result()` / `run()` return a Prefix of handles)."""
    __slots__ = ()

    def _own(self) -> ChunkedPrefill:
        return self._owner._values[self.id]

    done = property(lambda self: self._own().done)
    remaining = property(lambda self: self._own().remaining)
    cached = property(lambda self: self._own().cached)
    chunk = property(lambda self: self._own().chunk)

    def step(self) -> None:
        return self._owner._call("step", (), {}, on=self.id)

    def result(self) -> Prefix:
        return self._owner._call("result", (), {}, on=self.id)

    def run(self) -> Prefix:
        return self._owner._call("run", (), {}, on=self.id)


# ----------------------------------------------------------------------------------------- messages
def encode(x, shared: Optional[dict] = None) -> Any:
    """A call's arguments -> JSON-able data. Every JSON object in the result is a tag with one key: h (a
    Handle's id, or the id of an object in `shared`: {id(object): its id}, process 0's own PrefixCache),
    nd ([dtype, shape, base64 bytes]), t (a tuple), d (a dict with string keys), nt ([name, fields]: a Prefix
    or TokenLogprobs), dc ([name, fields]: `_dataclasses`). Raises TypeError naming anything else (a callable,
    an array on devices, a PrefixCache not made by `ReplicatedEngine.prefix_cache`): such an argument cannot
    reach the other processes."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, Handle):
        return {"h": x.id}
    if shared and id(x) in shared:
        return {"h": shared[id(x)]}
    if isinstance(x, PrefixCache):
        raise TypeError("a PrefixCache of process 0 alone cannot be sent to the other processes; make it with "
                        "ReplicatedEngine.prefix_cache, which makes one on every process")
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"a numpy array of dtype {x.dtype} cannot be sent to the other processes")
        x = np.ascontiguousarray(x)
        return {"nd": [x.dtype.str, list(x.shape), base64.b64encode(x.tobytes()).decode()]}
    if isinstance(x, (Prefix, TokenLogprobs)):
        return {"nt": [type(x).__name__, [encode(v, shared) for v in x]]}
    if isinstance(x, tuple):
        return {"t": [encode(v, shared) for v in x]}
    if isinstance(x, list):
        return [encode(v, shared) for v in x]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {"d": {k: encode(v, shared) for k, v in x.items()}}
    name = type(x).__name__
    if dataclasses.is_dataclass(x) and _dataclasses().get(name) is type(x):
        return {"dc": [name, {f.name: encode(getattr(x, f.name), shared) for f in dataclasses.fields(x)}]}
    raise TypeError(f"{name} cannot be sent to the other processes (JSON, numpy arrays, handles and "
                    f"{', '.join(_dataclasses())} only)")


def decode(x, values: dict) -> Any:
    """`encode`'s data -> the call's arguments on this process, handles resolved from `values` (id -> device
    value). Raises ValueError for a released handle or an unknown tag."""
    if isinstance(x, list):
        return [decode(v, values) for v in x]
    if not isinstance(x, dict):
        return x
    (tag, v), = x.items()
    if tag == "h":
        if v not in values:
            raise ValueError(f"device value {v} was released; a handle is valid until process 0 drops it")
        return values[v]
    if tag == "nd":
        dtype, shape, data = v
        dtype = np.dtype(dtype)
        if dtype.kind not in _DTYPE_KINDS:
            raise ValueError(f"a message carries an array of dtype {dtype}")
        return np.frombuffer(base64.b64decode(data), dtype).reshape(shape).copy()
    if tag == "t":
        return tuple(decode(e, values) for e in v)
    if tag == "d":
        return {k: decode(e, values) for k, e in v.items()}
    if tag == "nt":
        kind = {"Prefix": Prefix, "TokenLogprobs": TokenLogprobs}[v[0]]
        return kind(*(decode(e, values) for e in v[1]))
    if tag == "dc":
        return _dataclasses()[v[0]](**{k: decode(e, values) for k, e in v[1].items()})
    raise ValueError(f"a message carries an unknown tag {tag!r}")


def _is_device_value(x) -> bool:
    return isinstance(x, (DecodeState, jax.Array)) or (
        isinstance(x, dict) and any(isinstance(v, jax.Array) for v in jax.tree_util.tree_leaves(x)))


class _Mirror:
    """What process 0 and every follower share: the engine, the registry of device values by id, and the
    count of messages (each message names its number; a follower that sees another is out of step)."""

    def __init__(self, engine):
        self.engine = engine
        self._values: dict = {}
        self._next_id = 0
        self._seq = 0

    def _keep(self, x, make):
        """A call's result with its device values and held objects (a PrefixCache, a ChunkedPrefill)
        registered (each under the next id) and replaced by make(id, value): a Handle, a RemotePrefill or
        process 0's own PrefixCache on process 0, nothing on a follower (which keeps only the registry)."""
        if _is_device_value(x) or isinstance(x, (PrefixCache, ChunkedPrefill)):
            self._values[self._next_id] = x
            self._next_id += 1
            return make(self._next_id - 1, x)
        if isinstance(x, (Prefix, TokenLogprobs)):
            return type(x)(*(self._keep(v, make) for v in x))
        if isinstance(x, tuple):
            return tuple(self._keep(v, make) for v in x)
        if isinstance(x, list):
            return [self._keep(v, make) for v in x]
        return x

    def _execute(self, message: dict, make):
        """Run one decoded message on this process's engine; returns its result through `_keep`."""
        if message["n"] != self._seq:
            raise OutOfStep(f"lwm.serve: message {message['n']} arrived where {self._seq} was due; the "
                            "processes are out of step")
        self._seq += 1
        for i in message["r"]:
            self._values.pop(i, None)
        name, on = message["m"], message.get("o")
        if name == _NOOP:
            return None
        if on is None:
            if name not in REPLICATED:
                raise ValueError(f"lwm.serve: {name!r} is not an engine call this server replicates")
            target = self.engine
        else:
            target = decode({"h": on}, self._values)
            if name not in OBJECT_METHODS.get(type(target), ()):
                raise ValueError(f"lwm.serve: {type(target).__name__}.{name} is not a call this server replicates")
        args, kwargs = decode(message["a"], self._values), decode(message["k"], self._values)
        return self._keep(getattr(target, name)(*args, **kwargs), make)


class ReplicatedEngine(_Mirror):
    """The engine on process 0, for a server whose other processes run `serve_follower`: each call of a
    `REPLICATED` method is sent to them first, then run here (module docstring); `LOCAL` attributes are the
    engine's; anything else is an AttributeError (it would run on process 0 alone and leave the followers
    behind). Calls are serialised by a lock (they must reach every process in one order). keepalive_s: a
    no-op is sent when no message went out for this long (0 = never). `close()` ends the followers' loops."""

    def __init__(self, engine, keepalive_s: float = 30.0):
        super().__init__(engine)
        self._lock = threading.Lock()
        self._released: collections.deque = collections.deque()   # ids dropped here, not yet sent
        self._shared: dict = {}                                    # id(process 0's PrefixCache) -> its id
        self._closed = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._keepalive = None
        if keepalive_s > 0:
            self._keepalive = threading.Thread(target=self._keep_alive, args=(float(keepalive_s),),
                                               name="lwm-serve-keepalive", daemon=True)
            self._keepalive.start()

    def __getattr__(self, name):
        if name in LOCAL:
            return getattr(self.engine, name)
        if name in REPLICATED:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        raise AttributeError(f"ReplicatedEngine: {name!r} is not replicated to the other processes (replicated: "
                             f"{', '.join(REPLICATED)}; local: {', '.join(LOCAL)})")

    def _handle(self, i: int, value):
        if isinstance(value, PrefixCache):       # process 0's own copy, held (here and everywhere) until close
            self._shared[id(value)] = i
            return value
        handle = (RemotePrefill if isinstance(value, ChunkedPrefill) else Handle)(i, self)
        weakref.finalize(handle, self._released.append, i)   # (any thread) released with the next message
        return handle

    def prefix_cache(self, budget_bytes: Optional[int] = None, block_size: Optional[int] = None) -> PrefixCache:
        """`Engine.prefix_cache` on every process (module docstring), the default budget (`default_budget_bytes`,
        which reads this process's free memory) resolved here so that every copy gets process 0's. Returns
        process 0's own copy; pass it as `prefix_cache=` to `start_prefill` / `prefill`. Raises as
        `Engine.prefix_cache` does, on every process."""
        if budget_bytes is None:
            budget_bytes = default_budget_bytes()
        return self._call("prefix_cache", (int(budget_bytes), block_size), {})

    def _send(self, name: str, args=(), kwargs=None, on: Optional[int] = None):
        """(Lock held.) Broadcast one message and run it here, from the very bytes the followers decode; `on`:
        the id of the held object whose method `name` is (None: the engine's)."""
        if self._closed:
            raise RuntimeError("ReplicatedEngine: closed (the followers have stopped)")
        message = {"n": self._seq, "m": name, "a": encode(list(args), self._shared),
                   "k": encode(dict(kwargs or {}), self._shared), "r": [], "o": on}
        while self._released:                             # after encode: a TypeError there loses no release
            message["r"].append(self._released.popleft())
        blob = broadcast_bytes(json.dumps(message).encode())
        self._last = time.monotonic()
        if name == _STOP:
            self._closed = True
            return None
        return self._execute(json.loads(blob), self._handle)

    def _call(self, name: str, args, kwargs, on: Optional[int] = None):
        with self._lock:
            return self._send(name, args, kwargs, on)

    def _keep_alive(self, every: float) -> None:
        while not self._stop.wait(every / 4):
            with self._lock:
                if not self._closed and time.monotonic() - self._last >= every:
                    self._send(_NOOP)

    def close(self) -> None:
        """Tell every follower to return (once; later calls raise RuntimeError)."""
        self._stop.set()
        with self._lock:
            if not self._closed:
                self._send(_STOP)


def serve_follower(engine, *, log=sys.stderr) -> int:
    """On a process other than 0: run each engine call process 0's `ReplicatedEngine` sends, on `engine` (this
    process's, built from the same flags), until process 0 closes; returns the number of calls run. A call
    that raises here is logged in one line and the loop goes on: process 0 raised the same (it decoded the
    same message) and its scheduler handles it. Run under the server's mesh (`jax.set_mesh`)."""
    mirror, calls = _Mirror(engine), 0
    while True:
        message = json.loads(broadcast_bytes(None))
        if message["m"] == _STOP:
            return calls
        try:
            mirror._execute(message, lambda i, value: None)
            calls += message["m"] != _NOOP
        except OutOfStep:
            raise
        except Exception as e:                          # the same fault as process 0's, handled there
            print(f"lwm.serve: process {jax.process_index()}: {message['m']} failed as on process 0: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=log, flush=True)


# -------------------------------------------------------------------------------------------- flags
def _flat(config) -> dict:
    out = {}

    def walk(prefix, value):
        if hasattr(value, "items"):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = json.dumps(value, default=str, sort_keys=True)

    walk("", config.to_dict() if hasattr(config, "to_dict") else config)
    return out


def check_same_flags(config) -> None:
    """Every process must be started with process 0's flags, but for PROCESS_FLAGS (each process's id and
    devices; the HTTP flags, which only process 0 reads): a collective (call on every process, after
    jax.distributed starts). Raises ValueError, the same line on every process, naming the processes and flags
    that differ. One process: nothing to check."""
    if jax.process_count() == 1:
        return
    mine = {k: v for k, v in _flat(config).items() if k not in PROCESS_FLAGS}
    theirs = json.loads(broadcast_bytes(json.dumps(mine).encode() if jax.process_index() == 0 else None))
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    states = gather_process_states(differ)["process_states"]
    bad = [(p, d) for p, d in enumerate(states) if d]
    if bad:
        said = "; ".join(f"process {p}: " + ", ".join(f"--{k}" for k in d[:6]) + (" ..." if len(d) > 6 else "")
                         for p, d in bad)
        raise ValueError(f"--jax_distributed: every process must be given process 0's flags (only "
                         f"{', '.join('--' + f for f in PROCESS_FLAGS)} may differ); these differ from process "
                         f"0's: {said}")
