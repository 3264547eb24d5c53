"""`python -m lwm.train` in subprocesses on the tiny preset, for tests/training/test_train_runs.py and
tests/training/test_context_parallel_train.py: the flags of a small packed text run, one run (optionally through
FAULT_WRAPPER, which SIGKILLs itself at a chosen step or inside a chosen checkpoint save), two processes joined by
jax.distributed, and the per-step losses of a run folder. The corpus they read (tokenizer, text.jsonl,
vision.jsonl, fault_wrapper.py, jax_cache/) is the `corpus` fixture of tests/training/conftest.py."""
import os
import subprocess
import sys

from lwm.training.metrics import read_metrics
from support import free_port

# Written to corpus/fault_wrapper.py: lwm.train's CLI with two kill switches read from the environment,
# KILL_AFTER_STEP (SIGKILL right after that step's metrics row is logged) and KILL_IN_SAVE (SIGKILL while the
# checkpoint of that step is being saved, just before its marker file, the last one, is written).
FAULT_WRAPPER = r'''
import os, signal, sys
from lwm.checkpoint import manager
from lwm.training import metrics
kill_after_step = int(os.environ.get("KILL_AFTER_STEP", "-1"))
kill_in_save = int(os.environ.get("KILL_IN_SAVE", "-1"))
log = metrics.MetricsLogger.log
def log_then_maybe_die(self, row):
    log(self, row)
    if row.get("step") == kill_after_step:
        os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricsLogger.log = log_then_maybe_die
write_json = manager._write_json
def write_json_or_die(path, obj, what):     # the marker is the last file of a save: all else is on disk
    if path.endswith("checkpoint.json") and obj.get("step") == kill_in_save:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, obj, what)
manager._write_json = write_json_or_die
from lwm.train import cli
sys.exit(cli())
'''


def run_train(corpus, args, devices=1, env=None, wrapper=False, check=True, timeout=300):
    """`python -m lwm.train args` (or corpus/fault_wrapper.py args) on `devices` simulated CPU devices, with the
    compilation cache in corpus/jax_cache and `env` added; returns the CompletedProcess. check: raise
    AssertionError (with the end of stderr) on a non-zero exit."""
    cmd = [sys.executable, str(corpus / "fault_wrapper.py")] if wrapper else [sys.executable, "-m", "lwm.train"]
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_COMPILATION_CACHE_DIR=str(corpus / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **(env or {}))
    proc = subprocess.run(cmd + args, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lwm.train exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def text_args(corpus, out, experiment, steps, seq=64, batch=2):
    """Flags of a packed text run of the tiny preset on corpus/text.jsonl: `steps` steps of `batch` rows of `seq`
    tokens, AdamW at 1e-2 (2 warmup steps), metrics every step into out/experiment."""
    return ["--modality=text", "--load_llama_config=tiny", f"--tokenizer={corpus / 'tokenizer.model'}",
            "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
            f"--train_dataset.json_dataset.path={corpus / 'text.jsonl'}", "--train_dataset.json_dataset.mode=pack",
            f"--train_dataset.json_dataset.seq_length={seq}", f"--train_dataset.json_dataset.batch_size={batch}",
            "--optimizer.adamw_optimizer.lr=1e-2", "--optimizer.adamw_optimizer.lr_warmup_steps=2",
            "--optimizer.adamw_optimizer.lr_decay_steps=100", f"--total_steps={steps}", "--log_freq=1",
            f"--logger.output_dir={out}", f"--logger.experiment_id={experiment}", "--logger.append_uuid=False",
            "--peak_flops=1e11"]


def losses(folder) -> dict:
    """step -> loss over every line of a run folder's metrics (a resumed run logs some steps twice: all must agree)."""
    seen = {}
    for row in read_metrics(str(folder)):
        assert seen.setdefault(row["step"], row["loss"]) == row["loss"], f"step {row['step']} logged two losses"
    return seen


def train_two_processes(corpus, args, timeout=300):
    """`python -m lwm.train args` as 2 processes x 2 simulated CPU devices joined by jax.distributed on a free
    loopback port; asserts both exit 0 and that process 0 saw 2 processes. Returns the two processes' stderr."""
    port = free_port()
    procs = []
    for pid in range(2):
        dist = ["--jax_distributed.initialize_jax_distributed=True",
                f"--jax_distributed.coordinator_address=127.0.0.1:{port}", "--jax_distributed.num_processes=2",
                f"--jax_distributed.process_id={pid}"]
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COMPILATION_CACHE_DIR=str(corpus / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        procs.append(subprocess.Popen([sys.executable, "-m", "lwm.train", *args, *dist], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert "2 processes" in outputs[0][1]
    return [err for _, err in outputs]
