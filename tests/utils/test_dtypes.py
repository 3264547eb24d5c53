"""The one dtype table (lwm/utils/dtypes.py): every parser of a dtype name in lwm/ goes through it, gives the
same dtype for every name and the same one-line error for a bad one; and no second table exists in lwm/."""

from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np
import pytest

from lwm.utils import dtypes

EXPECTED = {"fp32": np.float32, "float32": np.float32, "bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
            "fp16": np.float16, "float16": np.float16, "fp64": np.float64, "float64": np.float64}


def _parsers():
    """Every dtype-name parser of the package, as name -> fn(text) (None for '' where the caller allows it)."""
    from lwm.checkpoint import formats
    from lwm.inference import engine, runtime

    return {"dtypes": dtypes.parse_float_dtype, "checkpoint": formats.parse_float_dtype,
            "--dtype": runtime.parse_dtype, "--cache_dtype": engine.parse_cache_dtype}


def test_names_map_to_the_jax_dtypes():
    import jax.numpy as jnp

    assert set(dtypes.FLOAT_DTYPES) == set(EXPECTED)
    for name, want in EXPECTED.items():
        for label, parse in _parsers().items():
            assert parse(name) == np.dtype(want) == jnp.dtype(want), (label, name)
    assert dtypes.names(4) == ["bf16", "bfloat16", "float16", "float32", "fp16", "fp32"]


def test_convert_takes_the_table_up_to_32_bits():
    from lwm.tools.hf_convert import np_dtype

    assert np_dtype("") is None
    for name in dtypes.names(4):
        assert np_dtype(name) == np.dtype(EXPECTED[name])
    with pytest.raises(ValueError, match="--dtype='fp64' is not one of bf16, bfloat16, float16, float32, fp16, fp32$"):
        np_dtype("fp64")


def test_one_error_message():
    for label, parse in _parsers().items():
        with pytest.raises(ValueError) as e:
            parse("fp7")
        assert "='fp7' is not one of bf16, bfloat16, float16, float32, float64, fp16, fp32, fp64" in str(e.value)
        assert "\n" not in str(e.value), label
    with pytest.raises(ValueError, match="--cache_dtype='int4' is not one of"):
        _parsers()["--cache_dtype"]("int4")
    with pytest.raises(ValueError, match="is not a floating dtype"):
        dtypes.parse_float_dtype(np.int8)
    with pytest.raises(ValueError, match="--dtype is empty"):
        _parsers()["--dtype"]("")
    assert dtypes.parse_float_dtype("") is None and dtypes.parse_float_dtype(None) is None


# A dtype table is a mapping with a short float name as a key: "bf16": ..., 'fp16': ..., bf16=...
TABLE = re.compile(r"""["'](bf16|fp16|fp32)["']\s*:|\b(bf16|fp16|fp32)\s*=\s*[A-Za-z]""")


def _tables(root: pathlib.Path) -> list[str]:
    return [f"{p}:{i}" for p in sorted(root.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if TABLE.search(line)]


def test_no_second_table_in_lwm():
    root = pathlib.Path(__file__).resolve().parents[2] / "lwm"
    found = _tables(root)
    # negative control: the scan does find the one table
    assert any(f.startswith(str(root / "utils" / "dtypes.py")) for f in found), found
    assert [f for f in found if not f.startswith(str(root / "utils" / "dtypes.py"))] == []
