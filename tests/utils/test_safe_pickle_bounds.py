"""The restricted unpickler's allocation budget: a tiny pickle that asks an allowed constructor for a huge
allocation is refused in one line naming max_alloc_bytes, before the allocation, while the same pickle loads
under a budget that covers it (the control: the check is what refuses, not a broken pickle) and ordinary
pickles of arrays, containers and dtypes load at every protocol that carries bytes natively (3, 4, 5)."""
import collections
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from lwm.utils import safe_pickle


def _reconstruct_pickle(n: int) -> bytes:
    """~65 bytes: numpy.core.multiarray._reconstruct(ndarray, (n,), 'b'), an n-byte empty array."""
    return (b"\x80\x04cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ" + struct.pack("<i", n)
            + b"\x85C\x01b\x87R.")


def _call_pickle(module: str, name: str, n: int, via_range: bool = False) -> bytes:
    """module.name(n), or module.name(range(n)) with via_range."""
    arg = b"J" + struct.pack("<i", n)
    if via_range:
        arg = b"cbuiltins\nrange\n" + arg + b"\x85R"
    return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n" + arg + b"\x85R."


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        try:
            result = fn()
        except safe_pickle.UnsafePickleError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MB = 1 << 20


@pytest.mark.parametrize("data", [
    _reconstruct_pickle(16 * MB),
    _call_pickle("numpy", "ndarray", 2 * MB),                    # float64: 16 MB
    _call_pickle("builtins", "bytearray", 16 * MB),
    _call_pickle("builtins", "bytes", 16 * MB),
    _call_pickle("builtins", "list", MB // 2, via_range=True),   # 4 MB of pointers + 14 MB of ints
    _call_pickle("builtins", "tuple", MB // 2, via_range=True),
], ids=["_reconstruct", "ndarray", "bytearray", "bytes", "list(range)", "tuple(range)"])
def test_allocation_over_the_budget_is_refused_before_it_happens(data):
    assert len(data) < 100
    refused, peak = _peak_bytes(lambda: safe_pickle.loads(data, "x.pkl", max_alloc_bytes=3 * MB))
    assert isinstance(refused, safe_pickle.UnsafePickleError)
    assert "\n" not in str(refused) and str(refused).startswith("x.pkl: ")
    assert "over the budget of 3,145,728 bytes (max_alloc_bytes)" in str(refused)
    assert peak < 1 * MB, peak
    # control: under a budget that covers it the same pickle loads and really allocates (>= 15 MB)
    loaded, peak = _peak_bytes(lambda: safe_pickle.loads(data, "x.pkl", max_alloc_bytes=1 << 40))
    assert not isinstance(loaded, Exception) and peak > 15 * MB, peak


def test_the_default_budget_refuses_the_issue_pickle():
    """The issue's case: ~60 bytes asking for 2 GiB; refused by the default budget (1 GiB)."""
    data = _reconstruct_pickle(2**31 - 1)
    refused, peak = _peak_bytes(lambda: safe_pickle.loads(data))
    assert isinstance(refused, safe_pickle.UnsafePickleError) and "max_alloc_bytes" in str(refused)
    assert peak < 4 * MB


def test_the_budget_is_for_the_whole_load():
    """Twenty 8 MB arrays each under a 100 MB budget, together over it."""
    one = _reconstruct_pickle(8 * MB)[2:-1]                  # the call, without PROTO and STOP
    data = b"\x80\x04(" + one * 20 + b"l."
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"after 100,663,296\), over the budget"):
        safe_pickle.loads(data, max_alloc_bytes=100 * MB)
    assert len(safe_pickle.loads(data, max_alloc_bytes=200 * MB)) == 20          # control


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_ordinary_pickles_are_not_charged_for_their_data(protocol):
    """Real arrays (C and Fortran order, 8 MB), containers and numpy scalars load under a 1 MB budget: their
    data arrives as bytes opcodes, not as constructor allocations."""
    tree = {"big": np.ones((MB, 2), np.float32), "fortran": np.asfortranarray(np.arange(6.).reshape(2, 3)),
            "od": collections.OrderedDict(a=1), "set": {1, 2}, "frozen": frozenset([3]), "ba": bytearray(b"xy"),
            "c": 1 + 2j, "dtype": np.dtype("f4"), "scalar": np.float32(3), "r": range(5)}
    out = safe_pickle.loads(pickle.dumps(tree, protocol), max_alloc_bytes=1 * MB)
    for key, value in tree.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(out[key], value)
            assert out[key].dtype == value.dtype
        else:
            assert out[key] == value and type(out[key]) is type(value), key
