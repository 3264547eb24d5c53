"""The training run of `python -m lwm.train`: setup, restore, the loop, checkpoints and logs.

    from lwm.train import get_default_config
    config = get_default_config()           # then set fields, or lwm.train.parse_flags(argv)
    summary = train(config)                 # {'output_dir', 'step', 'last_row', 'last_checkpoint'}

Sections: the config checks, then the run (setup, restore, the loop). The step functions and their
shardings come from `lwm.training.compile.shard_train_step`; the multi-process helpers from
`lwm.parallel.multihost`. See docs/train.md.
"""
from __future__ import annotations

import logging
import math
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from lwm.checkpoint import formats as ckpt
from lwm.checkpoint.manager import Checkpointer, checkpoint_spec, latest, read_dataset_state, read_metadata
from lwm.cli.flags import FlagError, model_config_from_flags
from lwm.model import registry
from lwm.parallel import distributed, multihost
from lwm.parallel.sharding import check_model_mesh, make_mesh
from lwm.text.tokenizer import load_tokenizer
from lwm.training import metrics
from lwm.training import optimizer as optimizer_lib
from lwm.training import steps as ts
from lwm.training.compile import shard_train_step
from lwm.training.dataset import DatasetFactory, DatasetStateMismatch

logger = logging.getLogger("lwm.train")

# The sections of a dataset config (lwm.training.dataset) that carry the original's per-dataset spelling of
# --use_data_sharded_loader.
_DATASET_SECTIONS = ("json_dataset", "json_vision_dataset", "huggingface_dataset")


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or inf; nothing after the last good checkpoint was saved."""


# -------------------------------------------------------------------------------------------- checks

def check_config(config: ConfigDict) -> None:
    """Raises FlagError (one line naming the flag) for values the run cannot use."""
    if config.total_steps < 0 or config.log_freq < 1:
        raise FlagError(f"--total_steps={config.total_steps} must be >= 0 and --log_freq={config.log_freq} >= 1")
    if config.save_model_freq < 0 or config.save_milestone_freq < 0 or config.eval_steps < 0:
        raise FlagError("--save_model_freq, --save_milestone_freq and --eval_steps must be >= 0")
    if config.autoresume and (config.logger.append_uuid or not config.logger.experiment_id):
        raise FlagError("--autoresume=True needs a fixed output folder: set --logger.experiment_id and "
                        "--logger.append_uuid=False")
    if config.loss_chunk_size < 1:
        raise FlagError(f"--loss_chunk_size={config.loss_chunk_size} must be >= 1")
    _check_optimizer_and_data(config)
    data_sharded_loader(config)


def _check_optimizer_and_data(config: ConfigDict) -> None:
    """Ranges of the optimizer's numbers and the sizes of every dataset section, as FlagError naming the
    flag (ml_collections already refuses a value of the wrong type). The sizes against the mesh are checked
    where the mesh is built (lwm.parallel.sharding.check_model_mesh and the batch divisibility check)."""
    adamw = config.optimizer.adamw_optimizer
    for name in ("lr", "init_lr", "end_lr", "weight_decay", "clip_gradient"):
        value = adamw[name]
        if not (math.isfinite(value) and value >= 0):
            raise FlagError(f"--optimizer.adamw_optimizer.{name}={value} must be a finite number >= 0")
    for name in ("b1", "b2"):
        if not 0 <= adamw[name] < 1:
            raise FlagError(f"--optimizer.adamw_optimizer.{name}={adamw[name]} must be in [0, 1)")
    if adamw.lr_warmup_steps < 0:
        raise FlagError(f"--optimizer.adamw_optimizer.lr_warmup_steps={adamw.lr_warmup_steps} must be >= 0")
    if config.optimizer.accumulate_gradient_steps < 1:
        raise FlagError(f"--optimizer.accumulate_gradient_steps={config.optimizer.accumulate_gradient_steps} "
                        f"must be >= 1")
    for group in ("train_dataset", "eval_dataset"):
        for section in _DATASET_SECTIONS:
            for name in ("batch_size", "seq_length"):
                value = config[group][section].get(name)
                if value is not None and value < 1:
                    raise FlagError(f"--{group}.{section}.{name}={value} must be >= 1")


def data_sharded_loader(config: ConfigDict) -> bool:
    """The one `--use_data_sharded_loader` switch (nothing else reads the flag:
    tests/test_one_home.py::test_rule_holds[data_sharded_loader_switch]): True, each process builds only its
    share of every batch (its rows and sequence columns, `multihost.host_shard_from_mesh`); False, every
    process builds the whole batch. The original's per-dataset spelling
    (`--train_dataset.json_dataset.use_data_sharded_loader`, the same under json_vision_dataset,
    huggingface_dataset and eval_dataset) is only checked: False there with
    the switch True (a dataset building whole batches that the run would join as shares) raises FlagError."""
    value = bool(config.use_data_sharded_loader)
    for group in ("train_dataset", "eval_dataset"):
        for section in _DATASET_SECTIONS:
            if value and not config[group][section].use_data_sharded_loader:
                raise FlagError(f"--{group}.{section}.use_data_sharded_loader=False disagrees with "
                                f"--use_data_sharded_loader=True; set --use_data_sharded_loader=False alone")
    return value


# ------------------------------------------------------------------------------------------------- run

def train(config: ConfigDict) -> dict:
    """Run training as configured (a ConfigDict from lwm.train.get_default_config(), flags applied).
    Returns a summary: output folder, last step, last metrics, last checkpoint. Raises FlagError for a bad
    value, TrainingDiverged when the loss or gradient norm stops being finite."""
    check_config(config)
    distributed.initialize(distributed.config_from_flags(config.jax_distributed))   # before any other JAX call
    return _run(config)


def _restore(config, output_dir, dataset, eval_dataset, shapes, shardings):
    """The state to start from: the newest checkpoint in the output folder (--autoresume), else
    --load_checkpoint, else None. Returns (state or None, params or None, metadata, checkpoint folder)."""
    resume_dir = latest(output_dir) if config.autoresume else None
    if resume_dir is not None:
        logger.info("autoresume: continuing from %s", resume_dir)
        meta = read_metadata(resume_dir)
        if "rng" not in meta:
            logger.warning("%s has no RNG state: the resumed run will not repeat the uninterrupted one", resume_dir)
        state, params = ckpt.load_checkpoint(checkpoint_spec(resume_dir), train_state_target=shapes,
                                             train_state_shardings=shardings)
        if state is None:
            logger.warning("%s holds parameters only (--checkpointer.save_optimizer_state=False): the optimizer "
                           "state starts afresh and the run will not repeat the uninterrupted one", resume_dir)
        _load_dataset_state(dataset, read_dataset_state(resume_dir), f"--autoresume continues {resume_dir}, whose")
        if eval_dataset is not None and meta.get("eval_dataset_state") is not None:
            eval_dataset.load_state_dict(multihost.process_state(meta["eval_dataset_state"]))
        return state, params, meta, resume_dir
    state = params = None
    if config.load_checkpoint:
        state, params = ckpt.load_checkpoint(config.load_checkpoint, train_state_target=shapes,
                                             train_state_shardings=shardings)
    if config.load_dataset_state:
        _load_dataset_state(dataset, read_dataset_state(config.load_dataset_state),
                            f"--load_dataset_state={config.load_dataset_state}:")
    return state, params, {}, None


def _load_dataset_state(dataset, state, source: str) -> None:
    """dataset.load_state_dict(this process's part of `state`); a state saved for other data (path, length,
    batch) is refused in one line naming the flags: a new --logger.experiment_id starts a new run."""
    try:
        dataset.load_state_dict(multihost.process_state(state))
    except DatasetStateMismatch as e:
        flag = f"--train_dataset.{e.section}.{e.key}"
        raise FlagError(f"{source} dataset state has {flag}={e.saved!r}, this run {e.current!r}: to start a new run "
                        f"on this data give it its own --logger.experiment_id (scripts/run_train_*.sh: "
                        f"experiment_id=...), or set {flag} back to continue that run") from None


def _evaluate(eval_fn, params, eval_iter, steps: int, to_global) -> dict:
    """Mean of each metric over `steps` eval batches, names prefixed with eval_."""
    rows = [eval_fn(params, to_global(next(eval_iter)[0])) for _ in range(steps)]
    return {f"eval_{k}": float(sum(float(multihost.host_array(r[k])) for r in rows) / steps) for k in rows[0]}


def _run(config: ConfigDict) -> dict:
    is_main = jax.process_index() == 0
    run_id = metrics.experiment_id(config.logger, metrics.shared_uuid())
    metrics_log = metrics.MetricsLogger(config.logger, config.to_dict(), run_id=run_id,
                                        enable=is_main or config.log_all_worker,
                                        process_index=jax.process_index())
    output_dir = metrics_log.output_dir
    mesh = make_mesh(config.mesh_dim)
    host = multihost.host_shard_from_mesh(mesh) if data_sharded_loader(config) else None
    tokenizer = load_tokenizer(config.tokenizer)
    dataset = DatasetFactory.load_dataset(config.train_dataset, tokenizer, host=host)
    eval_dataset = (DatasetFactory.load_dataset(config.eval_dataset, tokenizer, host=host)
                    if config.eval_steps > 0 else None)
    model_config = model_config_from_flags(config, tokenizer)
    seq_len, batch_size = dataset.seq_length, dataset.config.batch_size
    check_model_mesh(model_config, mesh, seq_len=seq_len, batch_size=batch_size)
    dtype = ckpt.parse_float_dtype(config.dtype)
    if dtype is None:
        raise FlagError("--dtype is empty; use fp32, bf16 or fp16")
    weights = dataset.loss_weights
    task = ts.Task(registry.build_model(config.modality, model_config, dtype), config.modality, weights["text"],
                   weights["vision"], config.loss_chunk_size)
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer)
    to_global = lambda local: multihost.global_batch(local, mesh, host)
    c = config.checkpointer
    checkpointer = Checkpointer(output_dir, float_dtype=c.float_dtype or None,
                                save_optimizer_state=c.save_optimizer_state, format=c.format, keep=c.keep)

    # Measured outside the mesh context: a one-device jit inside jax.set_mesh is refused.
    peak = config.peak_flops or metrics.peak_flops_of_run(metrics.measure_matmul_flops())
    step_fns = shard_train_step(task, tx, schedule, mesh,
                                accumulate_steps=config.optimizer.accumulate_gradient_steps)
    with jax.set_mesh(mesh):
        init_rng, rng = np.asarray(jax.random.split(jax.random.PRNGKey(config.seed)))
        shapes, shardings = step_fns.state_shapes, step_fns.state_shardings   # layer axis from param_scan_axis
        replicated = step_fns.replicated

        state, params, meta, last_checkpoint = _restore(config, output_dir, dataset, eval_dataset, shapes,
                                                        shardings)
        if state is None and params is None:
            state = step_fns.init(multihost.replicate(init_rng, replicated))
        elif state is None:
            state = step_fns.state_from_params(params, step=int(meta.get("step", 0)))
            del params
        rng = multihost.replicate(np.asarray(meta.get("rng", rng), np.uint32), replicated)
        train_fn, eval_fn = step_fns.train, step_fns.eval

        timer = metrics.StepTimer(batch_size * seq_len,
                                  ts.flops_per_token(shapes.params["params"], model_config, seq_len), peak)

        def save(step: int, milestone: bool = False) -> str:
            metadata = dict(rng=multihost.host_array(rng), modality=config.modality, flags=config.to_dict(),
                            llama_config=model_config.to_dict(), process_count=jax.process_count(),
                            eval_dataset_state=None if eval_dataset is None else
                            multihost.gather_process_states(eval_dataset.get_state_dict()))
            return checkpointer.save(step, state, multihost.gather_process_states(dataset.get_state_dict()),
                                     metadata, milestone=milestone)

        start_step = int(multihost.host_array(state.step))
        attention = model_config.attention_impl + (   # tests/training/test_context_parallel_train.py reads it
            f" (strategy {model_config.context_parallel_strategy}, load balance "
            f"{model_config.context_parallel_load_balance})" if model_config.context_parallel else "")
        logger.info("training %s steps %d..%d in %s (mesh %s, %d processes, peak %.3g FLOP/s), attention %s",
                    config.modality, start_step, config.total_steps, output_dir, dict(mesh.shape),
                    jax.process_count(), peak, attention)
        data_iter = iter(dataset)
        eval_iter = iter(eval_dataset) if eval_dataset is not None else None
        bar = metrics.progress(total=config.total_steps, initial=start_step, desc="train", unit="step",
                               disable=not is_main)
        row, saved_step = {}, start_step if last_checkpoint else None
        try:
            for step in range(start_step, config.total_steps):
                local_batch, data_metrics = next(data_iter)
                batch = to_global(local_batch)
                t0 = time.perf_counter()
                state, rng, step_metrics = train_fn(state, rng, batch)
                jax.block_until_ready((state, rng, step_metrics))
                timer.add(time.perf_counter() - t0)
                bar.update(1)
                step_metrics = {k: float(multihost.host_array(v)) for k, v in step_metrics.items()}
                if not (math.isfinite(step_metrics["loss"]) and math.isfinite(step_metrics["gradient_norm"])):
                    metrics_log.log({"step": step, **step_metrics, **data_metrics})
                    raise TrainingDiverged(
                        f"step {step}: loss {step_metrics['loss']}, gradient norm {step_metrics['gradient_norm']}. "
                        f"Stopped without saving; the last good checkpoint is "
                        f"{last_checkpoint or 'none (nothing saved yet)'}")
                if step % config.log_freq == 0:
                    row = {"step": step, **step_metrics, **timer.summary(), **data_metrics}
                    if eval_iter is not None:
                        row.update(_evaluate(eval_fn, state.params, eval_iter, config.eval_steps, to_global))
                    metrics_log.log(row)
                    bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                done = step + 1
                if config.save_milestone_freq > 0 and done % config.save_milestone_freq == 0:
                    last_checkpoint, saved_step = save(done, milestone=True), done
                elif config.save_model_freq > 0 and done % config.save_model_freq == 0:
                    last_checkpoint, saved_step = save(done), done
            final_step = int(multihost.host_array(state.step))
            if config.save_model_freq > 0 and saved_step != final_step:
                last_checkpoint = save(final_step)
        finally:
            bar.close()
            metrics_log.close()
    return {"output_dir": output_dir, "step": int(multihost.host_array(state.step)), "last_row": row,
            "last_checkpoint": last_checkpoint}
