"""Logging set-up shared by the entry points that log at INFO (`python -m lwm.train`).

JAX tries every backend it knows when JAX_PLATFORMS is unset; one whose runtime is absent (on a CPU or GPU
machine: the TPU plugin's libtpu.so) is skipped quietly with an INFO record of logger `jax._src.xla_bridge`,
"Unable to initialize backend 'tpu': ... Failed to open libtpu.so ...". Under logging.basicConfig(level=INFO)
every run printed it. `quiet_absent_backends()` drops exactly those records: JAX logs them only for a backend
that it skips because it is not there (fail_quietly, jax._src.xla_bridge.backends); a backend named in
JAX_PLATFORMS that fails to start still raises, and every other record of that logger still prints.
"""
from __future__ import annotations

import logging

XLA_BRIDGE_LOGGER = "jax._src.xla_bridge"
ABSENT_BACKEND_PREFIX = "Unable to initialize backend"


class _AbsentBackendFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith(ABSENT_BACKEND_PREFIX))


def quiet_absent_backends() -> None:
    """Drop JAX's INFO record for each backend skipped because it is absent (module docstring); idempotent."""
    logger = logging.getLogger(XLA_BRIDGE_LOGGER)
    if not any(isinstance(f, _AbsentBackendFilter) for f in logger.filters):
        logger.addFilter(_AbsentBackendFilter())
