"""The one dtype table: every float dtype name a flag, config or checkpoint option accepts.

Short and long names alike map to a numpy dtype, the same object `jnp.dtype` gives (bfloat16 is
ml_dtypes', the one JAX uses):

    fp32, float32 -> float32      bf16, bfloat16 -> bfloat16      fp16, float16 -> float16
    fp64, float64 -> float64

`parse_float_dtype` is the only parser: `--dtype`, `--cache_dtype`, `--checkpointer.float_dtype`, the
checkpoint loaders and `lwm.convert --dtype` all go through it, so a name means the same thing everywhere
and a bad one gets the same one-line error. Kept so by `tests/utils/test_dtypes.py`.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# numpy dtypes (what jnp.dtype returns; jnp.bfloat16 is ml_dtypes.bfloat16), so that command lines can
# list the names without importing JAX.
FLOAT_DTYPES = {
    "fp32": np.dtype(np.float32), "float32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16), "float16": np.dtype(np.float16),
    "fp64": np.dtype(np.float64), "float64": np.dtype(np.float64),
}


def names(max_bytes: int | None = None) -> list[str]:
    """The accepted names, sorted; with max_bytes only those of at most that many bytes per element.

    Example: names(4) -> ['bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32'].
    """
    return sorted(n for n, t in FLOAT_DTYPES.items() if max_bytes is None or t.itemsize <= max_bytes)


def parse_float_dtype(value: Any, what: str = "dtype", max_bytes: int | None = None) -> np.dtype | None:
    """A float dtype name (see the table), or a dtype object, -> np.dtype; None or '' -> None.

    `what` names the flag or field in the error; `max_bytes` restricts the names to those of at most that
    many bytes per element (`names`). Raises ValueError with one line, e.g.
    "--dtype='fp7' is not one of bf16, bfloat16, float16, float32, float64, fp16, fp32, fp64", or
    "... is not a floating dtype" for a dtype object (np.int8, ...) that is not a float.
    """
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, str):
        allowed = names(max_bytes)
        if value not in allowed:
            raise ValueError(f"{what}={value!r} is not one of {', '.join(allowed)}")
        return FLOAT_DTYPES[value]
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError(f"{what}={value!r} is not a dtype") from None
    import jax.numpy as jnp  # knows ml_dtypes' floats (bfloat16) as floating, numpy does not

    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{what}={value!r} is not a floating dtype")
    return dtype
