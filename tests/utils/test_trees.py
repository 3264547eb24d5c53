"""The one tree validator (lwm/utils/trees.py): its rule on small trees, and that both users (the checkpoint
formats and the VQGAN's parameter files) go through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.utils.trees import TreeValidator

TARGET = {"a": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)},
          "step": jax.ShapeDtypeStruct((), jnp.int32), "empty": {}}


def test_accepts_the_exact_tree_in_any_order():
    v = TreeValidator("src", TARGET)
    assert v.check(("step",), (), np.int32) == ((), np.dtype(np.int32))
    assert v.check(("a", "b"), (3,), jnp.bfloat16) == ((3,), np.dtype(np.float32))  # any float for a float
    v.check(("a", "w"), (2, 3))
    v.missing()                                           # the empty container is not required
    assert v.empty_keys() == [("empty",)]


@pytest.mark.parametrize("entries, message", [
    ([(("a", "x"), (3,), None)], "src: a/x: unexpected key (shape (3,)) not in the target"),
    ([(("a", "w"), (3, 2), None)], "src: a/w: checkpoint shape (3, 2) != target shape (2, 3)"),
    ([(("step",), (), np.float32)], "src: step: checkpoint dtype float32 != target dtype int32"),
    ([(("a", "b"), (3,), None), (("a", "b"), (3,), None)], "src: a/b: key appears twice"),
    ([(("empty",), (), None)], "src: empty: unexpected key"),
])
def test_each_problem_is_one_line(entries, message):
    v = TreeValidator("src", TARGET)
    with pytest.raises(ValueError) as e:
        for key, shape, dtype in entries:
            v.check(key, shape, dtype)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_missing_and_prefix():
    v = TreeValidator("src", TARGET, prefix=("params",))
    v.check(("a", "w"), (2, 3))
    with pytest.raises(ValueError, match=r"^src: params/a/b: missing from the checkpoint \(target shape \(3,\)\)$"):
        v.missing()


def test_check_tree_collects_every_problem():
    tree = {"a": {"w": np.zeros((3, 2)), "x": np.zeros(1)}, "step": np.int32(0)}
    with pytest.raises(ValueError) as e:
        TreeValidator("src", TARGET).check_tree(tree)
    msg = str(e.value)
    assert msg.startswith("src: 3 entries do not match the target: ")
    for part in ("a/w: checkpoint shape (3, 2) != target shape (2, 3)", "a/x: unexpected key",
                 "a/b: missing (target shape (3,))"):
        assert part in msg
    good = {"a": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "step": np.int32(0)}
    assert set(TreeValidator("src", TARGET).check_tree(good)) == {("a", "w"), ("a", "b"), ("step",)}


def test_checkpoint_formats_use_it_with_their_hints():
    from lwm.checkpoint import formats

    assert issubclass(formats.TreeValidator, TreeValidator)
    target = {"h": {"scan_decoder": {"w": jax.ShapeDtypeStruct((4, 2, 3), jnp.float32)}}}
    v = formats.TreeValidator("ckpt", target)
    with pytest.raises(formats.CheckpointError, match="flip --llama.param_scan_axis"):
        v.check(("h", "scan_decoder", "w"), (2, 4, 3))
    with pytest.raises(formats.CheckpointError, match="scan_layers=False"):
        v.check(("h", "0", "w"), (2, 3))
    with pytest.raises(formats.CheckpointError, match="trainstate_params::PATH"):
        v.check(("opt_state", "mu"), (1,))


def test_vqgan_parameter_files_use_it(monkeypatch):
    """The VQGAN's loader raises the validator's message, and goes through TreeValidator.check_tree: a
    validator that accepts everything lets a wrong tree through (negative control)."""
    from lwm.model import vqgan
    from lwm.utils import trees

    cfg = vqgan.VQGANConfig.load("tiny")
    params = vqgan.init_params(cfg)
    bad = jax.tree.map(lambda x: x, params)
    bad["extra"] = np.zeros(2)
    want = r"^f \(VQGAN parameters for this VQGANConfig\): 1 entries do not match the target: extra: unexpected"
    with pytest.raises(ValueError, match=want):
        vqgan._check_tree(bad, cfg, "f")
    monkeypatch.setattr(trees.TreeValidator, "check_tree",
                        lambda self, tree: __import__("flax").traverse_util.flatten_dict(tree))
    vqgan._check_tree(bad, cfg, "f")                     # no longer caught: the loader used the validator
