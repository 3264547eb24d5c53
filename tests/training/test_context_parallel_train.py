"""`lwm.train` on the tiny preset with packing under every context-parallel strategy x load balance: the
same losses as dense attention for 5 steps (1e-5 relative) on meshes 1,1,1,4 / 1,2,1,2 / 1,1,2,2; a
param_scan_axis=1 model trains and equals param_scan_axis=0; and 2 processes x 2 devices with a balanced
strategy equal one process with 4 devices.

Cost: one subprocess per mesh runs its 10 or 11 trainings in turn (one compiled train step each), sharing
a persistent compilation cache; all are marked slow.
"""
import json
import os
import subprocess
import sys

import pytest

from support.train_runs import losses, run_train, text_args, train_two_processes

pytestmark = pytest.mark.slow

STEPS = 5
STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")
CHUNKS = ["--llama.scan_query_chunk_size=16", "--llama.scan_key_chunk_size=16"]
DRIVER = r"""
import json, sys
from lwm.train import main
base, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, extra in runs:
    main(base + extra + [f"--logger.experiment_id={name}"])
"""


def cp_flags(strategy, balance):
    return ["--llama.attention_impl=ring", "--update_llama_config=dict(context_parallel_strategy="
            f"'{strategy}',context_parallel_load_balance='{balance}')"]


def run_many(corpus, out, mesh, runs, devices=4):  # noqa: F811
    base = [a for a in text_args(corpus, out, "unused", STEPS) if not a.startswith("--logger.experiment_id")]
    base += [f"--mesh_dim={mesh}", *CHUNKS]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(corpus / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               NPROC="32")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(base), json.dumps(runs)], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: losses(out / name) for name, _ in runs}


# sp=4 trains every strategy x balance; each sp=2 mesh (with fsdp or tp) a Latin square of them: every strategy
# and every balance once per mesh, and a different pairing on each (6 of the 9 pairs), at a third of the runs.
PAIRS = {"1,1,1,4": [(s, b) for s in STRATEGIES for b in BALANCES],
         "1,2,1,2": [("ring", "zigzag"), ("all_gather", "striped"), ("ulysses", "none")],
         "1,1,2,2": [("ring", "striped"), ("all_gather", "none"), ("ulysses", "zigzag")]}


@pytest.mark.parametrize("mesh", list(PAIRS))
def test_every_strategy_and_balance_trains_like_dense(corpus, tmp_path, mesh):  # noqa: F811
    runs = [["dense", ["--llama.attention_impl=dense"]]]
    runs += [[f"{s}-{b}", cp_flags(s, b)] for s, b in PAIRS[mesh]]
    assert {s for s, _ in PAIRS[mesh]} == set(STRATEGIES) and {b for _, b in PAIRS[mesh]} == set(BALANCES)
    if mesh == "1,1,1,4":
        runs.append(["scan_axis_1", cp_flags("ring", "zigzag") + ["--llama.param_scan_axis=1"]])
    got = run_many(corpus, tmp_path, mesh, runs)
    want = got.pop("dense")
    assert sorted(want) == list(range(STEPS)) and want[STEPS - 1] < want[0]
    for name, row in got.items():
        assert sorted(row) == sorted(want), name
        worst = max(abs(row[s] - want[s]) / abs(want[s]) for s in want)
        assert worst < 1e-5, (mesh, name, worst, row, want)


def test_two_processes_zigzag_ring_match_one_process(corpus, tmp_path):  # noqa: F811
    """2 processes x 2 devices, the zigzag ring across the processes (sp=4), vs 1 process x 4 devices."""
    flags = lambda name: (text_args(corpus, tmp_path, name, STEPS) + ["--mesh_dim=1,1,1,4", *CHUNKS]
                          + cp_flags("ring", "zigzag"))
    run_train(corpus, flags("single"), devices=4, timeout=900)
    train_two_processes(corpus, flags("multihost"), timeout=900)
    want, got = losses(tmp_path / "single"), losses(tmp_path / "multihost")
    assert sorted(got) == sorted(want) == list(range(STEPS))
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < 1e-5
