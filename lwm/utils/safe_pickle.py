"""Restricted unpickling for files a user did not write (released VQGAN pickles, checkpoint metadata).

`pickle.load` runs arbitrary code: any global a pickle names is imported and called. `load` here only
resolves plain containers, numbers, strings and numpy arrays/dtypes; any other global raises
`UnsafePickleError` naming it, before anything is called.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _AS_DICT:  # flax FrozenDict pickles as FrozenDict(dict): read it as a dict
            return dict
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle global {module}.{name}; only plain containers and "
            "numpy arrays are accepted (convert the file with a trusted tool if you wrote it yourself)")


def load(file: BinaryIO, source: str = "<pickle>") -> Any:
    """Unpickle plain data (dicts, lists, numbers, strings, numpy arrays) from an open binary file."""
    return _RestrictedUnpickler(file, source).load()


def loads(data: bytes, source: str = "<pickle>") -> Any:
    return load(io.BytesIO(data), source)


def load_path(path: str) -> Any:
    """Open `path` (local or any fsspec URL) and unpickle it with the restricted unpickler."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        return load(f, source=str(path))
