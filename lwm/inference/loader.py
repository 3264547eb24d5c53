"""The one model loader for inference, text and vision alike (no other inference module reads a checkpoint:
tests/test_one_home.py::test_rule_holds[model_loader]).

    model, params = load_model(config, "params::/ckpt/params", jnp.bfloat16, mesh)

`config` is a `LLaMAConfig` (text) or a `VisionLLaMAConfig` (vision-language); the model class follows from
it. The parameter shapes come from `lwm.model.shapes.param_shapes` (the one parameter-shape tracer), the
checkpoint is read by `lwm.checkpoint.formats.load_checkpoint` (any `--load_checkpoint` spec: params::PATH,
trainstate_params::PATH, flax_params::PATH, orbax::DIR), checked against those shapes, cast to `dtype` and,
with a mesh, placed by the sharding table (lwm.parallel.sharding) one tensor at a time, so host memory never
holds more than one tensor beyond the placed tree. An empty spec loads host-drawn random weights
(`random_params`) only when asked (`random_if_empty=True`: demos and tests of the vision entry points);
otherwise it raises.
"""
from __future__ import annotations

import re
import jax
import jax.numpy as jnp
import numpy as np

from lwm.model.llama import LLaMAConfig
from lwm.model.registry import model_class
from lwm.model.shapes import param_shapes


def param_shardings(shapes, config: LLaMAConfig, mesh):
    """NamedShardings for `shapes` from the sharding table; raises (lwm.parallel.sharding) when a rule is missing or
    a dimension is not divisible by its mesh axes."""
    from lwm.parallel import sharding

    return sharding.param_shardings(shapes, config, mesh)


def random_params(shapes, config: LLaMAConfig, shardings=None, seed: int = 0):
    """Host-drawn random weights with the model's init law (normal(0, initializer_range), norms at one),
    each placed on its sharding; nothing is compiled, and the draw is the same on any mesh. For demos,
    tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def draw(path, shape, sharding):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if re.search(r"(norm|ln_f)/kernel$", name):
            value = np.ones(shape.shape, np.float32)
        else:
            value = rng.standard_normal(shape.shape, np.float32) * np.float32(config.initializer_range)
        return jax.device_put(value.astype(shape.dtype), sharding)

    if shardings is None:
        shardings = jax.tree.map(lambda _: None, shapes)
    return jax.tree_util.tree_map_with_path(draw, shapes, shardings)


def load_model(config: LLaMAConfig, load_checkpoint: str, dtype=jnp.float32, mesh=None, *,
               random_if_empty: bool = False, seed: int = 0):
    """(model, params) for inference: `model_class(config)` computing in `dtype`, and its parameters read
    from a `--load_checkpoint` spec, cast to `dtype` and, with a mesh, placed on it.

    An empty spec gives `random_params(..., seed)` when random_if_empty, else raises ValueError naming the
    flag. A checkpoint whose tree or shapes differ from the model's raises lwm.checkpoint.formats.CheckpointError."""
    from lwm.checkpoint.formats import load_checkpoint as read_checkpoint

    dtype = jnp.dtype(dtype)
    model = model_class(config)(config, dtype=dtype, param_dtype=dtype)
    shapes = param_shapes(config, dtype)
    shardings = None if mesh is None else param_shardings(shapes, config, mesh)
    if not load_checkpoint:
        if random_if_empty:
            return model, random_params(shapes, config, shardings, seed)
        raise ValueError("--load_checkpoint is empty: give params::PATH (or trainstate_params::, flax_params::, "
                         "orbax::) of a trained model")
    _, params = read_checkpoint(load_checkpoint, params_target=shapes, params_shardings=shardings,
                                float_dtype=dtype, disallow_trainstate=True)
    return model, params["params"]
