"""Metrics for `lwm.train`: a JSON-lines file in the output folder, optional Weights & Biases, step timing
(tokens/s, MFU), the machine's measured matmul rate, and progress output fit for terminals and for logs.

    logger = MetricsLogger(get_default_config({"output_dir": "/runs", "experiment_id": "a"}), variant)
    logger.log({"step": 0, "loss": 2.3, ...})    # one line of /runs/a/metrics.jsonl (+ wandb when on)

The `--logger.*` flags are the original's (tux WandBLogger) plus `use_wandb`. wandb is imported only when
`use_wandb=True`; without an API key (WANDB_API_KEY or a `wandb login`) it runs offline.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lwm.utils.progress import PlainProgress, progress  # noqa: F401  (the progress bar lives there; used as metrics.progress)

METRICS_FILE = "metrics.jsonl"


def get_default_config(updates=None) -> ConfigDict:
    config = ConfigDict()
    config.project_id = "lwm"
    config.project_entity = ""
    config.experiment_id = ""        # '' = a fresh uuid
    config.append_uuid = True        # experiment_id + '_' + uuid (set False to resume in the same folder)
    config.experiment_note = ""
    config.output_dir = "/tmp/"      # the run writes to output_dir/experiment_id
    config.wandb_dir = ""            # '' = the run's output folder
    config.profile_dir = ""          # accepted for the original's scripts; unused
    config.online = False            # wandb online (needs an API key; otherwise it stays offline)
    config.use_wandb = False
    config.lock()
    if updates is not None:
        for key, value in dict(updates).items():
            if key not in config:
                raise KeyError(f"unknown flag logger.{key}; known: {sorted(config.keys())}")
            config[key] = value
    return config


def experiment_id(config: ConfigDict, shared_uuid: str) -> str:
    if not config.experiment_id:
        return shared_uuid
    return f"{config.experiment_id}_{shared_uuid}" if config.append_uuid else str(config.experiment_id)


def shared_uuid() -> str:
    """A uuid hex string that every process of the run agrees on (process 0's)."""
    raw = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw.astype(np.uint8).tolist()).hex()


def _plain(value: Any) -> Any:
    """Scalars (numpy, jax, python) -> python numbers for JSON; NaN/inf stay as floats (JSON NaN)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        return value.item() if value.size == 1 else value.tolist()
    return value


class MetricsLogger:
    """Appends one JSON object per `log` call to `output_dir/metrics.jsonl` (process 0, or every process
    with `all_workers`, then `metrics.p<i>.jsonl`), and mirrors it to wandb when `use_wandb`."""

    def __init__(self, config: ConfigDict, variant: dict, *, run_id: str, enable: bool = True,
                 process_index: int = 0):
        self.config = config
        self.enable = enable
        self.output_dir = os.path.join(config.output_dir, run_id) if config.output_dir else run_id
        self.run_id = run_id
        self._file = None
        self._wandb = None
        if not enable:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        name = METRICS_FILE if process_index == 0 else f"metrics.p{process_index}.jsonl"
        self.metrics_path = os.path.join(self.output_dir, name)
        self._file = open(self.metrics_path, "a")
        if config.use_wandb:
            self._wandb = self._start_wandb(variant)

    def _start_wandb(self, variant: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("--logger.use_wandb=True but wandb is not installed: `pip install wandb` "
                              "(or pip install 'lwm[wandb]'), or set --logger.use_wandb=False") from None
        c = self.config
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        mode = "online" if (c.online and has_key) else "offline"
        wandb_dir = os.path.join(c.wandb_dir, self.run_id) if c.wandb_dir else self.output_dir
        os.makedirs(wandb_dir, exist_ok=True)
        return wandb.init(config=variant, project=c.project_id or None, entity=c.project_entity or None,
                          dir=wandb_dir, id=self.run_id, resume="allow", notes=c.experiment_note or None,
                          mode=mode)

    def log(self, metrics: dict) -> None:
        if not self.enable:
            return
        row = {k: _plain(v) for k, v in metrics.items()}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=int(row.get("step", 0)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl file (a folder means its metrics.jsonl)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -------------------------------------------------------------------------------------------- speed

def measure_matmul_flops(seconds: float = 1.0, n: int = 2048, device: Optional[jax.Device] = None) -> float:
    """FLOP/s of an fp32 (n, n) @ (n, n) matmul on `device` (default: the first local device): the fastest of
    the repetitions that fit in about `seconds`, each timed with block_until_ready (the best rep, not the
    mean, so a busy moment of a shared machine does not lower the peak). On a CPU this is the whole host's
    rate: simulated CPU devices share its cores."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.full((n, n), 1.0 / n, jnp.float32), device)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds or best == math.inf:
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_of_run(measured_per_device: float) -> float:
    """The peak FLOP/s MFU is measured against: on CPU one measurement per host (devices share the
    host), on accelerators one per device."""
    if jax.local_devices()[0].platform == "cpu":
        return measured_per_device * jax.process_count()
    return measured_per_device * jax.device_count()


class StepTimer:
    """Accumulates timed steps between two log lines: tokens/s and MFU over that window. The first
    step of a process (compilation) is reported on its own."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.steps, self.seconds = 0, 0.0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def summary(self) -> dict:
        """Metrics of the window, then start a new one."""
        seconds = max(self.seconds, 1e-12)
        tps = self.steps * self.tokens_per_step / seconds
        out = {"step_time": seconds / max(self.steps, 1), "tokens_per_second": tps,
               "mfu": tps * self.flops_per_token / self.peak_flops if self.peak_flops > 0 else math.nan}
        self.steps, self.seconds = 0, 0.0
        return out
