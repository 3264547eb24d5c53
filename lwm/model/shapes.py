"""The one parameter-shape tracer: a model config -> its parameter tree as jax.ShapeDtypeStruct leaves.

    shapes = param_shapes(LLaMAConfig.load("7b"))            # nothing allocated, nothing compiled
    shapes["lm_head"]["kernel"]                              # ShapeDtypeStruct((4096, 32000), float32)

Every place that needs parameter shapes without parameters calls it: the inference loader (checkpoint
targets and shardings), the memory planner, lwm.convert's orbax target, the VQGAN's random init and its
parameter-file check, the benchmarks. Kept so by `tests/model/test_param_shapes.py`, which also checks that
no other `jax.eval_shape(... .init(...))` copy exists in lwm/ or benchmarks/.

Each config says what to trace with its `shape_model(dtype) -> (module, example inputs)` (LLaMAConfig,
VisionLLaMAConfig, VQGANConfig), so this module imports no model and every model module may import it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def param_shapes(config: Any, dtype: Any = jnp.float32) -> dict:
    """The parameter tree of `config`'s model as ShapeDtypeStructs (`jax.eval_shape` of its init).

    config: a LLaMAConfig (text), a VisionLLaMAConfig (vision-language) or a VQGANConfig. The language
    models are traced through `config.shape_twin()` (plain dense attention) on one token (1, 1): parameter
    shapes do not depend on the attention path, and a ring or a kernel cannot trace one token without a
    mesh. Their parameters are `dtype`; the VQGAN's are float32 whatever `dtype`.

    Example: param_shapes(LLaMAConfig.load("tiny"))["lm_head"]["kernel"] -> ShapeDtypeStruct((64, 512), float32)
    (D = 64, V = 512).
    """
    model, inputs = config.shape_model(dtype)
    return jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), *inputs)["params"]
