"""The restricted unpickler: plain data loads, anything that could run code is refused."""
import os
import pickle

import numpy as np
import pytest
from flax.core import FrozenDict

from lwm.utils import safe_pickle


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_plain_data_and_frozen_dicts_load():
    tree = {"params": FrozenDict({"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}),
            "step": 3, "names": ["a", ("b", 1.5)]}
    out = safe_pickle.loads(pickle.dumps(tree))
    assert type(out["params"]) is dict
    np.testing.assert_array_equal(out["params"]["conv"]["kernel"], tree["params"]["conv"]["kernel"])
    assert out["step"] == 3 and out["names"] == ["a", ("b", 1.5)]


def test_code_execution_is_refused_with_the_global_named(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"params": _RunsCode()}))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil.pkl: refusing to unpickle global posix.system"):
        safe_pickle.load_path(str(path))
