"""The one parameter-shape tracer (lwm.model.shapes.param_shapes): the shapes every model's own init
gives, for text, vision and the VQGAN, whatever the attention path; and no other copy of it in lwm/ or
benchmarks/."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.model.shapes import param_shapes
from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM
from lwm.model.vqgan import VQGANConfig, VQGANModel


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _init_shapes(model, *args):
    """eval_shape of the model's own init on several tokens (an independent trace)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(1), *args))["params"]


def test_text_and_vision_match_their_own_init():
    ids = jnp.zeros((2, 8), jnp.int32)
    text = LLaMAConfig.load("tiny")
    assert _shapes(param_shapes(text)) == _shapes(_init_shapes(LLaMAForCausalLM(text), ids))
    vision = VisionLLaMAConfig.load("tiny")
    assert _shapes(param_shapes(vision)) == _shapes(
        _init_shapes(VisionLLaMAForCausalLM(vision), ids, jnp.zeros((2, 8), bool)))
    assert _shapes(param_shapes(vision)) != _shapes(param_shapes(text))  # negative control: it can differ


def test_vqgan_matches_its_own_init():
    cfg = VQGANConfig.load("tiny")
    image = jnp.zeros((2, cfg.resolution, cfg.resolution, cfg.num_channels))
    assert _shapes(param_shapes(cfg)) == _shapes(_init_shapes(VQGANModel(cfg), image))


@pytest.mark.parametrize("impl", ["ring", "ring_pallas", "blockwise"])
def test_attention_path_does_not_change_shapes(impl):
    """A ring cannot trace one token without a mesh: the tracer goes through the dense shape twin."""
    text = LLaMAConfig.load("tiny")
    assert _shapes(param_shapes(text.replace(attention_impl=impl))) == _shapes(param_shapes(text))


def test_dtype():
    leaves = jax.tree.leaves(param_shapes(LLaMAConfig.load("tiny"), jnp.bfloat16))
    assert leaves and {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


# A copy of the tracer: jax.eval_shape over some model's .init
COPY = re.compile(r"eval_shape\(.*\.init\(")


def test_no_other_copy_in_lwm_or_benchmarks():
    root = pathlib.Path(__file__).resolve().parents[2]
    found = [f"{p.relative_to(root)}:{i}" for d in ("lwm", "benchmarks") for p in sorted((root / d).rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if COPY.search(line)]
    assert any(f.startswith("lwm/model/shapes.py:") for f in found), found  # the scan sees the one tracer
    assert [f for f in found if not f.startswith("lwm/model/shapes.py:")] == []
