"""The one tree validator: checks a tree of arrays (a checkpoint, a parameter file) against a target tree.

Every loader that reads parameters from outside uses it: the checkpoint formats (streaming, flax msgpack,
orbax, HF; `lwm.checkpoint.formats.TreeValidator` adds the LLaMA layout hints and CheckpointError) and the
VQGAN's parameter files (`lwm.model.vqgan`). Kept so by `tests/utils/test_trees.py` (the loaders use it) and
`tests/test_one_home.py::test_rule_holds[tree_validator]` (no other *Validator class in lwm/).

The rule: each entry must be a key of the target with the target's shape (and a float where the target is
a float), no key twice, and no target leaf missing (empty containers are not stored, so they are not
required). Errors are one line, `SOURCE: key/path: problem`.

    v = TreeValidator("params.msgpack", {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    v.check(("w",), (3, 2))   # ValueError: params.msgpack: w: checkpoint shape (3, 2) != target shape (2, 3)
    v.check(("w",), (2, 3)); v.missing()   # fine: every target leaf was given once
"""

from __future__ import annotations

from typing import Any

import numpy as np

Key = tuple[str, ...]


def leaf_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an array, a ShapeDtypeStruct or anything np.asarray takes."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    arr = np.asarray(leaf)
    return arr.shape, arr.dtype


def is_float(dtype) -> bool:
    """True for floating dtypes, bfloat16 included (numpy alone does not count it)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


class TreeValidator:
    """Checks entries (key, shape, dtype) of a tree against `target`, one at a time, so a loader can stream.

    Args:
      source: what is being read (a path), the start of every error line.
      target: a tree (nested dicts or a flax struct) of arrays or ShapeDtypeStructs.
      prefix: key parts shown before each key in errors (the place of the target inside the source).

    Raises `error` (ValueError here; subclasses set their own) with one line. Subclasses may add hints with
    `key_hint` (a key the target lacks) and `shape_hint` (a shape that differs).
    """

    error: type[Exception] = ValueError

    def __init__(self, source: str, target: Any, prefix: Key = ()):
        import flax.serialization
        from flax.traverse_util import empty_node, flatten_dict

        self._empty = empty_node
        self.source, self.prefix = source, tuple(prefix)
        self.expected = flatten_dict(flax.serialization.to_state_dict(target), keep_empty_nodes=True)
        self.seen: set[Key] = set()

    def where(self, key: Key) -> str:
        return f"{self.source}: {'/'.join(self.prefix + tuple(key))}"

    def key_hint(self, key: Key) -> str:
        """Why `key` may be absent from the target ('' here; '; ...' in subclasses)."""
        return ""

    def shape_hint(self, key: Key, shape: tuple[int, ...], target_shape: tuple[int, ...]) -> str:
        """Why `shape` may differ from the target's ('' here; '; ...' in subclasses)."""
        return ""

    def check(self, key: Key, shape: tuple[int, ...], dtype: Any = None) -> tuple[tuple[int, ...], np.dtype]:
        """Validate one entry; returns the target's (shape, dtype) for it."""
        key, shape = tuple(key), tuple(shape)
        where = self.where(key)
        if key not in self.expected or self.expected[key] is self._empty:
            raise self.error(f"{where}: unexpected key (shape {shape}) not in the target" + self.key_hint(key))
        target_shape, target_dtype = leaf_shape_dtype(self.expected[key])
        if shape != target_shape:
            raise self.error(f"{where}: checkpoint shape {shape} != target shape {target_shape}"
                             + self.shape_hint(key, shape, target_shape))
        if dtype is not None and is_float(dtype) != is_float(target_dtype):
            raise self.error(f"{where}: checkpoint dtype {np.dtype(dtype)} != target dtype {target_dtype}")
        if key in self.seen:
            raise self.error(f"{where}: key appears twice")
        self.seen.add(key)
        return target_shape, target_dtype

    def missing(self) -> None:
        """Raise for the first target leaf no entry was given for (empty containers are not stored)."""
        for key, leaf in self.expected.items():
            if leaf is not self._empty and key not in self.seen:
                raise self.error(f"{self.where(key)}: missing from the checkpoint "
                                 f"(target shape {leaf_shape_dtype(leaf)[0]})")

    def empty_keys(self) -> list[Key]:
        return [key for key, leaf in self.expected.items() if leaf is self._empty]

    def check_tree(self, tree: Any) -> dict[Key, Any]:
        """Validate a whole in-memory tree; returns it flattened {key: leaf}.

        Every problem is collected (not only the first), missing keys first, and raised as one line:
        "SOURCE: 3 entries do not match the target: a/b: missing ...; c: ...; d: ..." (the first five shown)."""
        import flax.serialization
        from flax.traverse_util import flatten_dict

        flat = flatten_dict(flax.serialization.to_state_dict(tree))
        problems = [f"{'/'.join(self.prefix + key)}: missing (target shape {leaf_shape_dtype(leaf)[0]})"
                    for key, leaf in self.expected.items() if leaf is not self._empty and key not in flat]
        for key, leaf in flat.items():
            shape, dtype = leaf_shape_dtype(leaf)
            try:
                self.check(key, shape, dtype)
            except self.error as e:
                problems.append(str(e).removeprefix(f"{self.source}: "))
        if problems:
            raise self.error(f"{self.source}: {len(problems)} entries do not match the target: "
                             + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
        return flat
