"""The one dtype table: every float dtype name a flag, config or checkpoint option accepts.

Short and long names alike map to a numpy dtype, the same object `jnp.dtype` gives (bfloat16 is
ml_dtypes', the one JAX uses):

    fp32, float32 -> float32      bf16, bfloat16 -> bfloat16      fp16, float16 -> float16
    fp64, float64 -> float64

`parse_float_dtype` is the only parser: `--dtype`, `--cache_dtype`, `--checkpointer.float_dtype`, the
checkpoint loaders and `lwm.convert --dtype` all go through it, so a name means the same thing everywhere
and a bad one gets the same one-line error. Kept so by `tests/utils/test_dtypes.py`.

The KV cache also takes two 8-bit names (`parse_cache_dtype`, QUANTIZED_CACHE_DTYPES), each stored with a
float32 scale per token and kv head (`lwm.attention.decode.quantize`):

    int8 -> int8 (symmetric, scale = max|x| / 127)      fp8 -> float8_e4m3fn (scale = max|x| / 448)
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


# The KV cache's 8-bit element types (values; a float32 scale per token and kv head rides beside them).
QUANTIZED_CACHE_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
CACHE_SCALE_DTYPE = np.dtype(np.float32)


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


def is_quantized(dtype) -> bool:
    """True for a cache dtype that is stored with scales (int8, float8_e4m3fn)."""
    return dtype is not None and np.dtype(dtype) in QUANTIZED_CACHE_DTYPES.values()


def cache_names() -> list[str]:
    """The --cache_dtype names: the float table's and the quantized ones, sorted."""
    return sorted(set(names()) | set(QUANTIZED_CACHE_DTYPES))


def parse_cache_dtype(value: Any, what: str = "--cache_dtype") -> np.dtype | None:
    """A KV-cache dtype: a float name or dtype (`parse_float_dtype`), or 'int8' / 'fp8' (or np.int8 /
    float8_e4m3fn) -> np.dtype; None or '' -> None. Raises ValueError with one line, e.g.
    "--cache_dtype='int4' is not one of bf16, bfloat16, float16, float32, float64, fp16, fp32, fp64, fp8, int8"."""
    if isinstance(value, str) and value in QUANTIZED_CACHE_DTYPES:
        return QUANTIZED_CACHE_DTYPES[value]
    if isinstance(value, str) and value and value not in FLOAT_DTYPES:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(cache_names())}")
    if value is not None and not isinstance(value, str):
        try:
            if is_quantized(value):
                return np.dtype(value)
        except TypeError:
            pass
    return parse_float_dtype(value, what=what)


def cache_bytes_per_row(dtype, head_dim: int) -> int:
    """Bytes of one cache row of one kv head (H values, plus its scale for a quantized dtype).
    Example: bf16, H=128 -> 256; int8 or fp8, H=128 -> 128 + 4 = 132."""
    dtype = np.dtype(dtype)
    return head_dim * dtype.itemsize + (CACHE_SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)


_BACKEND_OK: dict = {}


def check_cache_dtype_backend(dtype, what: str = "--cache_dtype") -> None:
    """Raise ValueError (one line, naming the flag and the backend) if the default JAX backend cannot
    quantize to, store and compute with `dtype` (a tiny eager convert, scatter and matmul, once per
    backend and dtype); a no-op for the float dtypes."""
    if dtype is None or not is_quantized(dtype):
        return
    import jax
    import jax.numpy as jnp

    key = (jax.default_backend(), np.dtype(dtype).name)
    if key not in _BACKEND_OK:
        try:
            x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32).reshape(2, 4)
            q = jnp.zeros((2, 3, 4), dtype).at[:, 1].set((x * 100).astype(dtype))
            y = jnp.einsum("bsh,bh->bs", q.astype(jnp.float32), x)
            _BACKEND_OK[key] = bool(np.isfinite(np.asarray(y)).all())
        except Exception:  # the backend lacks the type or an op on it
            _BACKEND_OK[key] = False
    if not _BACKEND_OK[key]:
        raise ValueError(f"{what}={np.dtype(dtype).name}: the {key[0]} backend cannot compute with it; "
                         f"use one of {', '.join(names())} or int8")
