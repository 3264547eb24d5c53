"""Restricted unpickling for files a user did not write (released VQGAN pickles, checkpoint metadata).

`pickle.load` runs arbitrary code: any global a pickle names is imported and called. `load` here only
resolves plain containers, numbers, strings and numpy arrays/dtypes; any other global raises
`UnsafePickleError` naming it, before anything is called.

The allowed constructors can still be asked to allocate: a 60-byte pickle that calls
`numpy.core.multiarray._reconstruct(ndarray, (2**31,), 'b')` or `bytearray(2**31)` or `list(range(2**31))`
would allocate gigabytes before anything fails. Each such call is charged before it runs (`_cost_of`: array
shape x itemsize, an int size, or 8 bytes per element of a sized argument) against a byte budget for the whole
load (`max_alloc_bytes`, default `MAX_ALLOC_BYTES` = 1 GiB); the call that would pass it raises
`UnsafePickleError` naming the budget. The array data a legitimate pickle carries arrives as bytes opcodes
(bounded by the file) and is not charged: numpy pickles arrays as `_reconstruct(ndarray, (0,), 'b')` plus
`__setstate__` with the raw bytes, or `_frombuffer(bytes, dtype, shape, order)`, a view.
"""
from __future__ import annotations

import functools
import io
import math
import pickle
from typing import Any, BinaryIO, Callable

MAX_ALLOC_BYTES = 1 << 30      # default budget of what allowed constructors may allocate in one load, bytes

# (module, name) pairs a plain-data pickle may reference. numpy moved its internals from `numpy.core` to
# `numpy._core` in 2.0; pickles written by either name both load.
_ALLOWED_GLOBALS = {
    ("builtins", name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                 "bytes", "bytearray", "slice", "range")
} | {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
}


# Immutable mappings from libraries that parameter pickles may hold; rebuilt as plain dicts without
# importing the library.
_AS_DICT = {("flax.core.frozen_dict", "FrozenDict")}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global that plain data never needs."""


# Constructors whose size comes from their arguments: charged by `_cost_of` before each call.
_SIZED_BUILTINS = {"list", "tuple", "set", "frozenset", "bytes", "bytearray", "dict"}


def _cost_of(module: str, name: str, args: tuple, kwargs: dict) -> int:
    """Bytes the call `module.name(*args, **kwargs)` may allocate beyond its arguments, judged from the
    arguments alone (nothing is called). Arrays: prod(shape) x itemsize (`ndarray(shape, dtype)` without a
    buffer, `_reconstruct(cls, shape, dtype)`, `scalar(dtype, ...)`: itemsize); containers and bytes: an int
    argument n -> n bytes (`bytes(n)`), a sized argument -> 8 bytes per element (a pointer per item; a `range`
    is sized without being materialized). Unknown shapes or dtypes cost 0: numpy then refuses them itself."""
    import numpy as np

    def array_bytes(shape, dtype) -> int:
        try:
            dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
            itemsize = np.dtype(dtype).itemsize
        except (TypeError, ValueError):
            return 0
        if any(d < 0 for d in dims):
            return 0
        return math.prod(dims) * max(itemsize, 1)

    if name == "_reconstruct" and len(args) >= 3:
        return array_bytes(args[1], args[2])
    if name == "ndarray":
        shape = args[0] if args else kwargs.get("shape", ())
        dtype = args[1] if len(args) > 1 else kwargs.get("dtype", float)
        has_buffer = (len(args) > 2 and args[2] is not None) or kwargs.get("buffer") is not None
        return 0 if has_buffer else array_bytes(shape, dtype)
    if name == "scalar" and args:
        return array_bytes((), args[0])
    if name in _SIZED_BUILTINS or name == "OrderedDict":
        cost = 0
        for arg in list(args) + list(kwargs.values()):
            if isinstance(arg, (int, np.integer)) and not isinstance(arg, bool):
                cost += max(int(arg), 0)
            else:
                try:
                    cost += 8 * len(arg)
                except (TypeError, OverflowError):       # no len, or a range too long for an index
                    cost += 1 << 62
        return cost
    return 0


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str, max_alloc_bytes: int):
        super().__init__(file)
        self._source = source
        self._budget = int(max_alloc_bytes)
        self._spent = 0
        self._originals: dict[int, Callable] = {}     # id(guard) -> the constructor it guards

    def _unguarded(self, value: Any) -> Any:
        """The constructor behind a guard passed as an argument (`_reconstruct(ndarray, ...)` needs the type)."""
        return self._originals.get(id(value), value) if callable(value) else value

    def _charged(self, module: str, name: str, fn: Callable) -> Callable:
        """`fn` that first charges `_cost_of` its call to the load's budget (module docstring)."""
        @functools.wraps(fn)
        def call(*args, **kwargs):
            cost = _cost_of(module, name, args, kwargs)
            if self._spent + cost > self._budget:
                raise UnsafePickleError(
                    f"{self._source}: the pickle asks {module}.{name} to allocate {cost:,} bytes (after "
                    f"{self._spent:,}), over the budget of {self._budget:,} bytes (max_alloc_bytes)")
            self._spent += cost
            return fn(*(self._unguarded(a) for a in args), **kwargs)
        self._originals[id(call)] = fn
        return call

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            fn = super().find_class(module, name)
            if name in _SIZED_BUILTINS or name in ("OrderedDict", "ndarray", "_reconstruct", "scalar"):
                return self._charged(module, name, fn)
            return fn
        if (module, name) in _AS_DICT:  # flax FrozenDict pickles as FrozenDict(dict): read it as a dict
            return self._charged("builtins", "dict", dict)
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle global {module}.{name}; only plain containers and "
            "numpy arrays are accepted (convert the file with a trusted tool if you wrote it yourself)")


def load(file: BinaryIO, source: str = "<pickle>", max_alloc_bytes: int = MAX_ALLOC_BYTES) -> Any:
    """Unpickle plain data (dicts, lists, numbers, strings, numpy arrays) from an open binary file.
    Raises UnsafePickleError naming a refused global, or naming `max_alloc_bytes` (bytes, for all the
    constructor calls of this load together; module docstring) when a call would allocate past it."""
    return _RestrictedUnpickler(file, source, max_alloc_bytes).load()


def loads(data: bytes, source: str = "<pickle>", max_alloc_bytes: int = MAX_ALLOC_BYTES) -> Any:
    return load(io.BytesIO(data), source, max_alloc_bytes)


def load_path(path: str, max_alloc_bytes: int = MAX_ALLOC_BYTES) -> Any:
    """Open `path` (local or any fsspec URL) and unpickle it with the restricted unpickler (`load`)."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        return load(f, source=str(path), max_alloc_bytes=max_alloc_bytes)
