"""A successful run's log carries no noise: no "Unable to initialize backend 'tpu'" line on a machine without a TPU
(lwm.utils.logs), no carriage-return progress redraws when stderr is not a terminal (lwm.utils.progress, the one
home of progress bars), no needle-placement warning from the demo's curriculum; and the vision front-ends'
speed leaves compiling out (lwm.inference.vision.CompileClock). Each with a control that shows the noise or
the compile time is there to be caught."""
import io
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp

from lwm.inference.vision import CompileClock, speed_stats
from lwm.utils.progress import PlainProgress, progress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOGGED_START = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
if sys.argv[1] == "quiet":
    from lwm.utils.logs import quiet_absent_backends
    quiet_absent_backends()
import jax
jax.devices()
logging.getLogger("jax._src.xla_bridge").info("another record of that logger")
"""


def test_no_absent_tpu_line_under_info_logging_and_other_records_kept():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}   # JAX tries every backend it knows
    runs = {mode: subprocess.run([sys.executable, "-c", LOGGED_START, mode], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=120) for mode in ("quiet", "plain")}
    assert all(r.returncode == 0 for r in runs.values()), {m: r.stderr[-2000:] for m, r in runs.items()}
    if jax.default_backend() != "tpu":    # control: without the filter the line is there (no TPU here)
        assert "Unable to initialize backend 'tpu'" in runs["plain"].stderr, runs["plain"].stderr[-2000:]
    assert "Unable to initialize backend" not in runs["quiet"].stderr
    assert "another record of that logger" in runs["quiet"].stderr


def test_progress_never_redraws_into_a_log():
    log = io.StringIO()
    bar = progress(total=500, desc="eval", unit="prompt", file=log, interval=0.0)
    assert isinstance(bar, PlainProgress)
    for _ in range(500):
        bar.update(1)
    bar.close()
    assert "\r" not in log.getvalue() and log.getvalue().count("\n") >= 2

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()                                   # control: on a terminal it is tqdm, which redraws with \r
    bar = progress(total=5, desc="eval", file=term)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue()


def test_only_lwm_utils_progress_imports_tqdm():
    users = []
    for folder, _, files in os.walk(os.path.join(ROOT, "lwm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if "from tqdm import" in text or "import tqdm" in text:
                    users.append(os.path.relpath(path, ROOT))
    assert users == [os.path.join("lwm", "utils", "progress.py")], users   # the one home is found (control)


def test_demo_curriculum_writes_no_warning(tmp_path, tok):
    from lwm import demo
    from lwm.evals import needle

    stream = tok.encode(" ".join(["ring attention packing world model"] * 80))      # no sentence end anywhere
    needle._WARNED.discard("token")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo.write_curriculum(str(tmp_path / "c.jsonl"), stream, tok, 20, (20, 60), 0.0, seed=0, progress=False)
    assert [str(w.message) for w in caught] == []
    # Control: the same passage given straight to the needle placement warns.
    needle._WARNED.discard("token")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        needle.insert_needles(stream[:40], [(tok.encode("7"), 50.0)], 41, needle.period_token_ids(tok), buffer=0)
    assert any("no sentence ends" in str(w.message) for w in caught)


def test_compile_clock_counts_compiling_only():
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64), jnp.float32)
    with CompileClock() as first:
        f(x).block_until_ready()
    with CompileClock() as second:                      # control: the same shapes again compile nothing
        f(x).block_until_ready()
    assert first.compiles == 1 and first.seconds > 0
    assert second.compiles == 0 and second.seconds == 0
    stats = speed_stats(100, generate_s=3.0, compile_s=2.0)
    assert stats == dict(compile_s=2.0, run_s=1.0, tokens_per_s=100.0)
