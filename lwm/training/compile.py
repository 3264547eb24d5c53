"""The one place the training step meets its shardings: `shard_train_step(task, tx, schedule, mesh)` returns
the jitted train step, eval step and state initialisers of `lwm.training.steps` with their in/out shardings
and donation, and the abstract state, from which `lower(batch_size, seq_len)` lowers the step for a batch
shape. `lwm.train` (`lwm.training.loop`), the memory planner (`lwm.tools.memory_planner.compile_train`), the
benchmark (`benchmarks/train_step_bench.py`) and the sharded-parity test (`tests/parallel/test_sharding.py`)
call it; no other module of lwm/ or benchmarks/ touches the step functions
(tests/test_one_home.py::test_rule_holds[train_step_shardings]).

    step = shard_train_step(task, tx, schedule, mesh)
    with jax.set_mesh(mesh):
        state = step.init(multihost.replicate(rng, step.replicated))
        state, rng, metrics = step.train(state, rng, batch)     # batch: global (B, T) arrays
    compiled = step.lower(batch_size=8, seq_len=4096).compile()  # memory_analysis(), cost_analysis()

Shardings (lwm.parallel.sharding): the state (parameters and optimizer moments) by the one parameter rule
table, its layer axis at the model config's `param_scan_axis`; the batch P(('dp', 'fsdp'), 'sp'); the RNG
and the metrics replicated. The train step donates the state and the RNG (arguments 0 and 1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm.parallel.sharding import batch_spec, param_shardings
from lwm.training import steps as ts

# Every (B, T) array a batch may hold and its dtype (lwm.training.packing's batch layout).
BATCH_DTYPES = {"input_tokens": jnp.int32, "target_tokens": jnp.int32, "loss_masks": jnp.float32,
                "input_vision_masks": jnp.bool_, "target_vision_masks": jnp.bool_, "segment_ids": jnp.int32,
                "position_ids": jnp.int32}
# What a text step reads (loss_fn): the keys lowered by default.
TEXT_BATCH_KEYS = ("input_tokens", "target_tokens", "loss_masks", "target_vision_masks")


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """The jitted step functions of one task on one mesh. Call them (and trace them) under
    `jax.set_mesh(self.mesh)`: the context-parallel attention reads the ambient mesh."""
    mesh: Mesh
    task: ts.Task
    state_shapes: Any            # TrainState of jax.ShapeDtypeStruct, each with its sharding
    state_shardings: Any         # TrainState of NamedSharding
    batch_sharding: NamedSharding
    replicated: NamedSharding
    train: Callable              # (state, rng (2,) uint32, batch) -> (state, rng, metrics); donates state, rng
    eval: Callable               # (params {'params': tree}, batch) -> metrics
    init: Callable               # (rng (2,) uint32) -> a fresh state, sharded
    tx: optax.GradientTransformation

    def state_from_params(self, params, step: int = 0):
        """A sharded state around loaded params ({'params': tree}) with a fresh optimizer state at `step`."""
        fn = functools.partial(ts.state_from_params, tx=self.tx, step=step)
        return jax.jit(fn, in_shardings=(self.state_shardings.params,), out_shardings=self.state_shardings)(params)

    def abstract_batch(self, batch_size: int, seq_len: int, keys=TEXT_BATCH_KEYS) -> dict:
        """{key: ShapeDtypeStruct (batch_size, seq_len)} sharded as the step expects. Raises KeyError for a
        key that is not one of BATCH_DTYPES."""
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), BATCH_DTYPES[k], sharding=self.batch_sharding)
                for k in keys}

    def lower(self, batch_size: int, seq_len: int, keys=TEXT_BATCH_KEYS) -> jax.stages.Lowered:
        """The train step lowered for abstract (batch_size, seq_len) inputs: nothing is allocated or run."""
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)
        with jax.set_mesh(self.mesh):
            return self.train.lower(self.state_shapes, rng, self.abstract_batch(batch_size, seq_len, keys))


def shard_train_step(task: ts.Task, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, *,
                     accumulate_steps: int = 1) -> ShardedStep:
    """The train and eval steps of `task` (its model config gives param_scan_axis) with optimizer `tx`
    (learning rate `schedule`), jitted with their shardings on `mesh` (dp, fsdp, tp, sp).
    Raises lwm.parallel.sharding.MeshError when a parameter does not divide over its mesh axes."""
    init_fn = functools.partial(ts.init_train_state, task=task, tx=tx)
    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = param_shardings(shapes, task.config, mesh)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, batch_spec(mesh))
    train = jax.jit(functools.partial(ts.train_step, task=task, schedule=schedule, accumulate_steps=accumulate_steps),
                    in_shardings=(shardings, replicated, batch_sharding),
                    out_shardings=(shardings, replicated, replicated), donate_argnums=(0, 1))
    evaluate = jax.jit(functools.partial(ts.eval_step, task=task), in_shardings=(shardings.params, batch_sharding),
                       out_shardings=replicated)
    init = jax.jit(init_fn, in_shardings=(replicated,), out_shardings=shardings)
    state_shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return ShardedStep(mesh=mesh, task=task, state_shapes=state_shapes, state_shardings=shardings,
                       batch_sharding=batch_sharding, replicated=replicated, train=train, eval=evaluate, init=init,
                       tx=tx)
