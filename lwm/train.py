"""`python -m lwm.train`: train the text or vision+text LWM with the original's flags.

    python -m lwm.train --modality=text --mesh_dim=1,-1,1,1 --load_llama_config=tiny --total_steps=100 \
        --tokenizer=/data/tokenizer.model --train_dataset.type=json \
        --train_dataset.text_processor.fields=text --train_dataset.json_dataset.path=/data/train.jsonl \
        --logger.output_dir=/runs --logger.experiment_id=demo --logger.append_uuid=False --autoresume=True

From Python: `lwm.train.main(["--modality=text", ...])` or `lwm.train.train(config)` with a ConfigDict from
`get_default_config()`. Sections: flags, then the run (setup, restore, the loop). The step functions are
in `lwm.training.steps`, the multi-process helpers in `lwm.parallel.multihost`, the optimizer in `lwm.training.optimizer`, metrics in `lwm.training.metrics`. See docs/train.md.
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from lwm.checkpoint import formats as ckpt
from lwm.parallel import distributed
from lwm.cli import flags
from lwm.training import metrics
from lwm.model import registry
from lwm.parallel import multihost
from lwm.cli.flags import FlagError, model_config_from_flags
from lwm.training import optimizer as optimizer_lib
from lwm.training import steps as ts
from lwm.checkpoint.manager import Checkpointer, checkpoint_spec, latest, read_dataset_state, read_metadata
from lwm.training.dataset import DatasetFactory, HostShard, host_shard_from_mesh
from lwm.parallel.sharding import batch_spec, check_model_mesh, make_mesh, param_shardings
from lwm.text.tokenizer import load_tokenizer

logger = logging.getLogger("lwm.train")


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN or inf; nothing after the last good checkpoint was saved."""


# --------------------------------------------------------------------------------------------- flags

def get_default_config() -> ConfigDict:
    """Every flag and its default; the names are the original LWM's."""
    c = ConfigDict()
    c.modality = "text"                        # 'text' | 'vision,text'
    c.use_data_sharded_loader = True           # each process builds only its share of every batch
    c.seed = 42
    c.mesh_dim = "1,-1,1,1"                    # dp, fsdp, tp, sp
    c.dtype = "fp32"                           # compute dtype (parameters and optimizer stay fp32)
    c.total_steps = 10000
    c.load_llama_config = ""                   # a preset ('tiny', 'debug', '7b', ...) or json::path
    c.update_llama_config = ""                 # "dict(theta=...,max_sequence_length=...)" or a dict/JSON literal
    c.load_checkpoint = ""                     # params::PATH | trainstate::PATH | trainstate_params::PATH | ...
    c.load_dataset_state = ""                  # a dataset.pkl / dataset.json / checkpoint folder
    c.log_freq = 50
    c.save_model_freq = 0
    c.save_milestone_freq = 0
    c.eval_steps = 0                           # eval batches per log step (eval_dataset.*)
    c.tokenizer = "LargeWorldModel/LWM-Text-1M"  # tokenizer.model, a folder, or a hub id in the local cache
    c.train_dataset = DatasetFactory.get_default_config()
    c.eval_dataset = DatasetFactory.get_default_config()
    c.optimizer = optimizer_lib.get_default_config()
    c.checkpointer = ConfigDict(dict(
        float_dtype="",                        # '' keeps every tensor's dtype (exact resume); 'bf16' as the original
        save_optimizer_state=False,            # the whole train state (needed for exact resume) or params only
        format="streaming",                    # 'streaming' (the original's files) | 'orbax' (sharded)
        keep=1,                                # regular checkpoints kept; milestones are never removed
    ))
    c.llama = ConfigDict()                     # --llama.<field>=value: any model config field
    c.logger = metrics.get_default_config()
    c.log_all_worker = False
    c.jax_distributed = ConfigDict(distributed.default_flags())
    c.autoresume = False                       # continue from the newest complete checkpoint in the output folder
    c.loss_chunk_size = 1024                   # tokens per chunk of the blockwise cross-entropy
    c.peak_flops = 0.0                         # FLOP/s of the run's hardware for MFU; 0 = measure a matmul
    c.lock()
    return c


def parse_flags(argv: list[str], config: Optional[ConfigDict] = None) -> ConfigDict:
    """Training flags on top of `get_default_config()` (see lwm.cli.flags.parse_flags)."""
    return flags.parse_flags(argv, config if config is not None else get_default_config())


def _check_flags(config: ConfigDict) -> None:
    if config.total_steps < 0 or config.log_freq < 1:
        raise FlagError(f"--total_steps={config.total_steps} must be >= 0 and --log_freq={config.log_freq} >= 1")
    if config.save_model_freq < 0 or config.save_milestone_freq < 0 or config.eval_steps < 0:
        raise FlagError("--save_model_freq, --save_milestone_freq and --eval_steps must be >= 0")
    if config.autoresume and (config.logger.append_uuid or not config.logger.experiment_id):
        raise FlagError("--autoresume=True needs a fixed output folder: set --logger.experiment_id and "
                        "--logger.append_uuid=False")
    if config.loss_chunk_size < 1:
        raise FlagError(f"--loss_chunk_size={config.loss_chunk_size} must be >= 1")


# ------------------------------------------------------------------------------------------------- run

def train(config: ConfigDict) -> dict:
    """Run training as configured (a ConfigDict from get_default_config(), flags applied). Returns a
    summary: output folder, last step, last metrics."""
    _check_flags(config)
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
        dataset.load_state_dict(multihost.process_state(read_dataset_state(resume_dir)))
        if eval_dataset is not None and meta.get("eval_dataset_state") is not None:
            eval_dataset.load_state_dict(multihost.process_state(meta["eval_dataset_state"]))
        return state, params, meta, resume_dir
    state = params = None
    if config.load_checkpoint:
        state, params = ckpt.load_checkpoint(config.load_checkpoint, train_state_target=shapes,
                                             train_state_shardings=shardings)
    if config.load_dataset_state:
        dataset.load_state_dict(multihost.process_state(read_dataset_state(config.load_dataset_state)))
    return state, params, {}, None


def _evaluate(eval_fn, params, eval_iter, steps: int, to_global) -> dict:
    """Mean of each metric over `steps` eval batches, names prefixed with eval_."""
    rows = [eval_fn(params, to_global(next(eval_iter)[0])) for _ in range(steps)]
    return {f"eval_{k}": float(sum(float(multihost.host_value(r[k])) for r in rows) / steps) for k in rows[0]}


def _run(config: ConfigDict) -> dict:
    is_main = jax.process_index() == 0
    run_id = metrics.experiment_id(config.logger, metrics.shared_uuid())
    metrics_log = metrics.MetricsLogger(config.logger, config.to_dict(), run_id=run_id,
                                              enable=is_main or config.log_all_worker,
                                              process_index=jax.process_index())
    output_dir = metrics_log.output_dir
    mesh = make_mesh(config.mesh_dim)
    host = host_shard_from_mesh(mesh) if config.use_data_sharded_loader else HostShard()
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
    to_global = functools.partial(multihost.global_batch, mesh=mesh, host=host,
                                  sharded_loader=config.use_data_sharded_loader)
    c = config.checkpointer
    checkpointer = Checkpointer(output_dir, float_dtype=c.float_dtype or None,
                                save_optimizer_state=c.save_optimizer_state, format=c.format, keep=c.keep)

    # Measured outside the mesh context: a one-device jit inside jax.set_mesh is refused.
    peak = config.peak_flops or metrics.peak_flops_of_run(metrics.measure_matmul_flops())
    with jax.set_mesh(mesh):
        init_rng, rng = np.asarray(jax.random.split(jax.random.PRNGKey(config.seed)))
        init_fn = functools.partial(ts.init_train_state, task=task, tx=tx)
        shapes = jax.eval_shape(init_fn, init_rng)
        shardings = param_shardings(shapes, model_config, mesh)   # the layer axis from param_scan_axis
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, batch_spec(mesh))

        state, params, meta, last_checkpoint = _restore(config, output_dir, dataset, eval_dataset, shapes,
                                                        shardings)
        if state is None and params is None:
            state = jax.jit(init_fn, out_shardings=shardings)(multihost.replicate(init_rng, replicated))
        elif state is None:
            from_params = functools.partial(ts.state_from_params, tx=tx, step=int(meta.get("step", 0)))
            state = jax.jit(from_params, in_shardings=(shardings.params,), out_shardings=shardings)(params)
            del params
        rng = multihost.replicate(np.asarray(meta.get("rng", rng), np.uint32), replicated)

        train_fn = jax.jit(
            functools.partial(ts.train_step, task=task, schedule=schedule,
                              accumulate_steps=config.optimizer.accumulate_gradient_steps),
            in_shardings=(shardings, replicated, batch_sharding), out_shardings=(shardings, replicated, replicated),
            donate_argnums=(0, 1))
        eval_fn = jax.jit(functools.partial(ts.eval_step, task=task), in_shardings=(shardings.params, batch_sharding),
                          out_shardings=replicated)

        timer = metrics.StepTimer(batch_size * seq_len,
                                        ts.flops_per_token(shapes.params["params"], model_config, seq_len), peak)

        def save(step: int, milestone: bool = False) -> str:
            metadata = dict(rng=multihost.host_value(rng), modality=config.modality, flags=config.to_dict(),
                            llama_config=model_config.to_dict(), process_count=jax.process_count(),
                            eval_dataset_state=None if eval_dataset is None else
                            multihost.gather_process_states(eval_dataset.get_state_dict()))
            return checkpointer.save(step, state, multihost.gather_process_states(dataset.get_state_dict()),
                                     metadata, milestone=milestone)

        start_step = int(multihost.host_value(state.step))
        logger.info("training %s steps %d..%d in %s (mesh %s, %d processes, peak %.3g FLOP/s)",
                    config.modality, start_step, config.total_steps, output_dir, dict(mesh.shape),
                    jax.process_count(), peak)
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
                state, rng, metrics = train_fn(state, rng, batch)
                jax.block_until_ready((state, rng, metrics))
                timer.add(time.perf_counter() - t0)
                bar.update(1)
                metrics = {k: float(multihost.host_value(v)) for k, v in metrics.items()}
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["gradient_norm"])):
                    metrics_log.log({"step": step, **metrics, **data_metrics})
                    raise TrainingDiverged(
                        f"step {step}: loss {metrics['loss']}, gradient norm {metrics['gradient_norm']}. Stopped "
                        f"without saving; the last good checkpoint is {last_checkpoint or 'none (nothing saved yet)'}")
                if step % config.log_freq == 0:
                    row = {"step": step, **metrics, **timer.summary(), **data_metrics}
                    if eval_iter is not None:
                        row.update(_evaluate(eval_fn, state.params, eval_iter, config.eval_steps, to_global))
                    metrics_log.log(row)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                done = step + 1
                if config.save_milestone_freq > 0 and done % config.save_milestone_freq == 0:
                    last_checkpoint, saved_step = save(done, milestone=True), done
                elif config.save_model_freq > 0 and done % config.save_model_freq == 0:
                    last_checkpoint, saved_step = save(done), done
            final_step = int(multihost.host_value(state.step))
            if config.save_model_freq > 0 and saved_step != final_step:
                last_checkpoint = save(final_step)
        finally:
            bar.close()
            metrics_log.close()
    return {"output_dir": output_dir, "step": int(multihost.host_value(state.step)), "last_row": row,
            "last_checkpoint": last_checkpoint}


def _usage() -> str:
    return flags.usage(get_default_config(), "python -m lwm.train")


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse flags (default: sys.argv[1:]) and train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(_usage())
        return {}
    return train(parse_flags(argv))


def cli() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except FlagError as e:
        print(f"lwm.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"lwm.train: stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
