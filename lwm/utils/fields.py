"""Type and range checks of a frozen dataclass config's fields, each failure one line naming the field.

    check_types(config, "LLaMAConfig")                       # every field against its annotation
    check_ranges(config, "LLaMAConfig", at_least={"hidden_size": 1}, unit_interval=("resid_pdrop",))

The model configs (lwm/model/llama.py, vision_llama.py, vqgan.py) call both from `__post_init__`, so a bad
value from a preset, a json:: file, an HF config.json or `--update_llama_config` fails when the config is
built, before anything is traced or compiled. Raises ValueError.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Iterable, Mapping


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(value: Any, expected: Any) -> str | None:
    """None when `value` fits the annotation `expected`, else what was expected (for the message)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        problems = [_check(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return "a list"
        inner = args[0] if args else Any
        bad = [v for v in value if _check(v, inner)]
        return f"a list of {_check(bad[0], inner).removeprefix('an ').removeprefix('a ')}s" if bad else None
    if expected is bool:
        return None if isinstance(value, bool) else "true or false"
    if expected is int:
        return None if _is_int(value) else "an integer"
    if expected is float:
        if not _is_real(value):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if expected is str:
        return None if isinstance(value, str) else "a string"
    return None


def check_types(config: Any, what: str) -> None:
    """Raise ValueError `what.field=value: expected ...` for the first field whose value does not fit its
    annotation (bool, int, float (finite; ints accepted), str, Optional[...] and tuple[X, ...] are checked)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        problem = _check(value, hints.get(field.name, Any))
        if problem:
            raise ValueError(f"{what}.{field.name}={value!r}: expected {problem}")


def check_ranges(config: Any, what: str, *, at_least: Mapping[str, int | float] = {},
                 above: Mapping[str, float] = {}, unit_interval: Iterable[str] = ()) -> None:
    """Raise ValueError naming the field: `at_least` {field: lowest allowed}, `above` {field: bound it must
    exceed}, `unit_interval` fields in [0, 1) (dropout rates). None values are skipped (optional fields)."""
    for name, low in at_least.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"{what}.{name}={value!r}: must be >= {low}")
    for name, low in above.items():
        value = getattr(config, name)
        if value is not None and not value > low:
            raise ValueError(f"{what}.{name}={value!r}: must be > {low}")
    for name in unit_interval:
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ValueError(f"{what}.{name}={value!r}: must be in [0, 1)")
