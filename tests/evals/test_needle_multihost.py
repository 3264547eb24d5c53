"""`python -m lwm.eval_needle` over two processes of two CPU devices each (--jax_distributed.* flags,
--mesh_dim=2,1,1,2, ring attention across the processes) writes the same results as one process with four
devices and the same flags: the issue-14 multi-host bug (reading back arrays that span non-addressable
devices) must not come back. Subprocesses share a persistent compilation cache."""
import json
import os
import subprocess
import sys

import pytest

from golden.cases import needle_flags
from support import cpu_subprocess_env, free_port

MESH = ["--mesh_dim=2,1,1,2", "--update_llama_config=dict(attention_impl='ring')"]


def _results(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.load(f)]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(golden_workdir):
    d = golden_workdir
    single = os.path.join(d, "single", "results.json")
    flags = lambda out: needle_flags(d, out) + MESH
    proc = subprocess.run([sys.executable, "-m", "lwm.eval_needle", *flags(single)], env=cpu_subprocess_env(d, 4),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    port, procs = free_port(), []
    multi = os.path.join(d, "multi", "results.json")
    for pid in range(2):
        dist = ["--jax_distributed.initialize_jax_distributed=True",
                f"--jax_distributed.coordinator_address=127.0.0.1:{port}", "--jax_distributed.num_processes=2",
                f"--jax_distributed.process_id={pid}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "lwm.eval_needle", *flags(multi), *dist],
                                      env=cpu_subprocess_env(d, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    want = _results(single)
    assert len(want) == 4 and all(r["response"] for r in want)
    assert _results(multi) == want
