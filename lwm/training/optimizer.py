"""The optimizer of `lwm.train`: AdamW with gradient clipping, warmup + cosine (or constant) learning rate,
and optional gradient accumulation, configured by the original's `--optimizer.*` flags.

    config = get_default_config({"adamw_optimizer": {"lr": 8e-5, "lr_warmup_steps": 5}})
    tx, schedule = make_optimizer(config)       # optax.GradientTransformation, step -> learning rate

The chain is the original's: clip_by_global_norm(clip_gradient) then optax.adamw, wrapped in
optax.MultiSteps when accumulate_gradient_steps > 1 (each train step feeds one micro-batch; parameters
change every k-th step). Its state tree is the original's, so `trainstate::` checkpoints of the original
load. Weight decay applies to every parameter, as in the original (LWM excludes nothing).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from lwm.utils.config_dict import update_locked

SCHEDULES = ("warmup_cosine_decay", "warmup_constant")


def get_default_config(updates=None) -> ConfigDict:
    """The original's defaults (tux/EasyLM OptimizerFactory with AdamW), plus `lr_schedule_type`."""
    adamw = ConfigDict()
    adamw.init_lr = 0.0                   # learning rate at step 0, warmed up linearly to `lr`
    adamw.end_lr = 0.001                  # learning rate at `lr_decay_steps` and after (cosine schedule)
    adamw.lr = 0.01                       # peak learning rate
    adamw.lr_warmup_steps = 2000
    adamw.lr_decay_steps = 500000         # counted from step 0, warmup included (optax's convention)
    adamw.lr_schedule_type = "warmup_cosine_decay"   # or "warmup_constant": warmup, then `lr` for ever
    adamw.b1 = 0.9
    adamw.b2 = 0.95
    adamw.clip_gradient = 1.0             # global-norm clipping; 0 turns it off
    adamw.weight_decay = 1e-4
    adamw.bf16_momentum = False           # keep the first moment in bfloat16
    config = ConfigDict()
    config.type = "adamw"
    config.accumulate_gradient_steps = 1
    config.adamw_optimizer = adamw
    return update_locked(config, updates, "optimizer", noun="flag")


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    """step (number of optimizer updates so far) -> learning rate."""
    c = config
    if c.lr_schedule_type not in SCHEDULES:
        raise ValueError(f"--optimizer.adamw_optimizer.lr_schedule_type={c.lr_schedule_type!r}; "
                         f"choose one of {SCHEDULES}")
    if c.lr_warmup_steps < 0:
        raise ValueError(f"--optimizer.adamw_optimizer.lr_warmup_steps={c.lr_warmup_steps} must be >= 0")
    if c.lr_schedule_type == "warmup_constant":
        warmup = optax.linear_schedule(c.init_lr, c.lr, max(c.lr_warmup_steps, 1))
        return optax.join_schedules([warmup, optax.constant_schedule(c.lr)], [c.lr_warmup_steps])
    if c.lr_decay_steps <= c.lr_warmup_steps:
        raise ValueError(f"--optimizer.adamw_optimizer.lr_decay_steps={c.lr_decay_steps} must exceed "
                         f"lr_warmup_steps={c.lr_warmup_steps} (the cosine runs between them)")
    return optax.warmup_cosine_decay_schedule(init_value=c.init_lr, peak_value=c.lr,
                                              warmup_steps=c.lr_warmup_steps, decay_steps=c.lr_decay_steps,
                                              end_value=c.end_lr)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from an `--optimizer` config (a ConfigDict or a dict of updates)."""
    config = get_default_config(config)
    if config.type != "adamw":
        raise ValueError(f"--optimizer.type={config.type!r}: only 'adamw' is supported")
    if config.accumulate_gradient_steps < 1:
        raise ValueError(f"--optimizer.accumulate_gradient_steps={config.accumulate_gradient_steps} must be >= 1")
    c = config.adamw_optimizer
    if c.clip_gradient < 0:
        raise ValueError(f"--optimizer.adamw_optimizer.clip_gradient={c.clip_gradient} must be >= 0")
    schedule = learning_rate_schedule(c)
    # clip_by_global_norm(inf) is the identity but keeps the state tree the original's.
    clip = optax.clip_by_global_norm(c.clip_gradient if c.clip_gradient > 0 else float("inf"))
    tx = optax.chain(clip, optax.adamw(learning_rate=schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                                       mu_dtype=jnp.bfloat16 if c.bf16_momentum else None))
    if config.accumulate_gradient_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_gradient_steps)
    return tx, schedule
