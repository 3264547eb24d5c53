"""The training step functions: one `loss_fn` for text and vision+text (no other in lwm/:
tests/test_one_home.py::test_rule_holds[loss_fn]), `train_step`, `eval_step`, and the
train state's initialisation. Plain functions of arrays; everything static (the model, the modality, the
loss weights) comes in through a `Task`, bound with functools.partial before jax.jit.

Loss, per modality m in {text, vision} (vision only for modality 'vision,text'):

    w_m     = loss_masks * [target is (not) a vision token]            (B, T)
    loss_m  = sum(w_m * nll_m) / sum(w_m)       (0 when sum(w_m) == 0)
    loss    = sum_m weight_m * loss_m           weights from the data config (text_loss_weight, ...)

Text targets are scored by `lm_head` over the text vocabulary, vision targets by `vision_head` over the
vision vocabulary; each head only ever sees its own targets (the other modality's are replaced by id 0 and
carry zero weight). Logits are never materialised whole (`lwm.model.loss.cross_entropy_sums`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from lwm.model.llama import LLaMAConfig, output_head_kernel
from lwm.model.loss import cross_entropy_sums
from lwm.model.registry import MODALITIES


@dataclasses.dataclass(frozen=True)
class Task:
    """What the step functions need besides arrays."""
    model: nn.Module                 # LLaMAForCausalLM or VisionLLaMAForCausalLM
    modality: str = "text"           # 'text' | 'vision,text'
    text_loss_weight: float = 1.0
    vision_loss_weight: float = 0.0
    loss_chunk_size: int = 1024      # tokens per chunk of the blockwise cross-entropy

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"--modality={self.modality!r}; choose one of {MODALITIES}")

    @property
    def config(self) -> LLaMAConfig:
        return self.model.config

    @property
    def uses_dropout(self) -> bool:
        c = self.config
        return max(c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) > 0


def _hidden(task: Task, params, batch, dropout_rng) -> jax.Array:
    """(B, T, D) final hidden states."""
    kw = dict(position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
              deterministic=dropout_rng is None, return_hidden=True)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    args = (batch["input_tokens"],)
    if task.modality == "vision,text":
        args += (batch["input_vision_masks"],)
    return task.model.apply({"params": params}, *args, rngs=rngs, **kw)


def _masked_mean(total, count):
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def loss_fn(params, batch: dict, *, task: Task, dropout_rng: Optional[jax.Array] = None):
    """params: the inner parameter tree; batch: dict of (B, T) arrays (input_tokens, target_tokens,
    loss_masks, input/target_vision_masks, optional segment_ids, position_ids). dropout_rng None = eval.
    Returns (loss, metrics) with metrics loss, accuracy, text_loss, text_accuracy and, for 'vision,text',
    vision_loss, vision_accuracy; all float32 scalars."""
    hidden = _hidden(task, params, batch, dropout_rng)
    targets = batch["target_tokens"].astype(jnp.int32)
    weights = batch["loss_masks"].astype(jnp.float32)
    is_vision = batch["target_vision_masks"].astype(bool)
    chunk = task.loss_chunk_size
    if task.modality == "vision,text":
        from lwm.model.vision_llama import output_head_kernels

        text_kernel, vision_kernel = output_head_kernels(params, task.config)
    else:
        text_kernel, vision_kernel = output_head_kernel(params, task.config), None

    heads = {"text": (text_kernel, jnp.where(is_vision, 0, targets), jnp.where(is_vision, 0.0, weights),
                      task.text_loss_weight)}
    if vision_kernel is not None:
        heads["vision"] = (vision_kernel, jnp.where(is_vision, targets, 0), jnp.where(is_vision, weights, 0.0),
                           task.vision_loss_weight)
    loss, metrics = 0.0, {}
    all_correct, all_count = 0.0, 0.0
    for name, (kernel, tgt, w, mix) in heads.items():
        loss_sum, correct_sum = cross_entropy_sums(hidden, kernel.astype(hidden.dtype), tgt, w, chunk_size=chunk)
        count = jnp.sum(w)
        metrics[f"{name}_loss"] = _masked_mean(loss_sum, count)
        metrics[f"{name}_accuracy"] = _masked_mean(correct_sum, count)
        loss = loss + mix * metrics[f"{name}_loss"]
        all_correct, all_count = all_correct + correct_sum, all_count + count
    metrics["loss"] = jnp.asarray(loss, jnp.float32)
    metrics["accuracy"] = _masked_mean(all_correct, all_count)
    return metrics["loss"], metrics


def train_step(state: TrainState, rng: jax.Array, batch: dict, *, task: Task, schedule: optax.Schedule,
               accumulate_steps: int = 1):
    """One optimizer micro-step. Returns (new state, new rng, metrics)."""
    rng, dropout_rng = jax.random.split(rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params["params"], batch, task=task,
                                  dropout_rng=dropout_rng if task.uses_dropout else None)
    learning_rate = schedule(state.step // accumulate_steps)   # the rate of the update this step feeds
    state = state.apply_gradients(grads={"params": grads})
    metrics.update(learning_rate=jnp.asarray(learning_rate, jnp.float32),
                   param_norm=optax.global_norm(state.params), gradient_norm=optax.global_norm(grads))
    return state, rng, metrics


def eval_step(params, batch: dict, *, task: Task) -> dict:
    """params: the train state's params ({'params': tree}). Deterministic; the same loss_fn as training."""
    _, metrics = loss_fn(params["params"], batch, task=task)
    return metrics


def init_train_state(rng: jax.Array, *, task: Task, tx: optax.GradientTransformation) -> TrainState:
    """A fresh train state; params as {'params': tree}, as the original's (its checkpoints load)."""
    # Parameters do not depend on the attention implementation; init with one that needs no mesh.
    model = task.model.clone(config=task.config.shape_twin())
    ids = jnp.zeros((1, 8), jnp.int32)
    args = (ids, jnp.zeros((1, 8), bool)) if task.modality == "vision,text" else (ids,)
    params = model.init(rng, *args)
    return TrainState.create(apply_fn=None, params={"params": params["params"]}, tx=tx)


def state_from_params(params, *, tx: optax.GradientTransformation, step=0) -> TrainState:
    """A train state around loaded params ({'params': tree}) with a fresh optimizer state."""
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    return state.replace(step=jnp.asarray(step, jnp.int32))


# ----------------------------------------------------------------------------------------- FLOPs

_NO_MATMUL = re.compile(r"(wte|vte)/embedding$|norm/kernel$|ln_f/kernel$")


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def matmul_params(params, config: LLaMAConfig) -> int:
    """Parameters that take part in a matmul per token: everything except the embedding tables and the
    norm scales, with the output heads (a tied head counts its embedding)."""
    n = sum(int(np.prod(leaf.shape)) for p, leaf in jax.tree_util.tree_leaves_with_path(params)
            if not _NO_MATMUL.search(_path(p)))
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size
    if getattr(config, "tie_vision_embeddings", False):
        n += config.vision_vocab_size * config.hidden_size
    return n


def flops_per_token(params, config: LLaMAConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward):

        6 * matmul_params  +  6 * L * T * D

    The second term is causal attention: QK^T and PV cost 2 * 2 * T * D per token and layer forward over
    the full square, half of it under the causal mask, times 3 for forward + backward. Recomputation
    (remat) is not counted: MFU is model FLOPs over peak FLOPs."""
    c = config
    return 6.0 * matmul_params(params, c) + 6.0 * c.num_hidden_layers * seq_len * c.hidden_size
