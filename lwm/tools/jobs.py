"""Subprocess steps of the offline main jobs (lwm.demo, lwm.vision_demo): the environment a training
subprocess runs in (CPU only, offline, N simulated devices) and one step run with its command printed.
A failed step ends the job with SystemExit naming the step and its exit code."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_env(devices: int) -> dict:
    """os.environ for a CPU subprocess with `devices` simulated devices, offline (no hub downloads)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    # XLA:CPU runs concurrent collectives of the simulated devices on one thread pool sized by NPROC
    # (default: the core count); with fewer threads than collectives in flight, they wait on each other.
    env.setdefault("NPROC", str(max(16, 4 * devices)))
    return env


def run_step(cmd: list[str], env: dict, what: str, job: str = "demo") -> None:
    """Run `cmd` in the repository root, its output going to ours; SystemExit when it fails."""
    print(f"\n== {what}\n   {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{job}: {what} failed with exit code {proc.returncode}")


PYTHON = sys.executable
