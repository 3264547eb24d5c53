"""The model registry: which config class and which linen model serve each `--modality`.

    cls = model_config_class("vision,text")         # VisionLLaMAConfig
    model = build_model("text", LLaMAConfig.load("tiny"), dtype=jnp.bfloat16)   # LLaMAForCausalLM

It sits beside the models so that flag parsing (lwm/cli/flags.py) and the training steps (lwm/training/steps.py)
both look models up here without importing each other.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM

MODALITIES = ("text", "vision,text")
_MODELS = {"text": (LLaMAConfig, LLaMAForCausalLM), "vision,text": (VisionLLaMAConfig, VisionLLaMAForCausalLM)}


def _lookup(modality: str):
    if modality not in _MODELS:
        raise ValueError(f"--modality={modality!r}; choose one of {MODALITIES}")
    return _MODELS[modality]


def model_config_class(modality: str) -> type:
    """The config dataclass of `modality` (raises ValueError naming --modality for an unknown one)."""
    return _lookup(modality)[0]


def build_model(modality: str, config: LLaMAConfig, dtype: Any = jnp.float32) -> nn.Module:
    """The causal LM of `modality` over `config`, computing in `dtype` (parameters stay float32)."""
    return _lookup(modality)[1](config, dtype=dtype)


def model_class(config: LLaMAConfig) -> type:
    """VisionLLaMAForCausalLM for a VisionLLaMAConfig, LLaMAForCausalLM for any other LLaMAConfig."""
    return VisionLLaMAForCausalLM if isinstance(config, VisionLLaMAConfig) else LLaMAForCausalLM
