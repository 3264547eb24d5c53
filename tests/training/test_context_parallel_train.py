"""`lwm.train` on the tiny preset with packing under every context-parallel strategy x load balance: the
same losses as dense attention for 5 steps (1e-5 relative) on meshes 1,1,1,4 / 1,2,1,2 / 1,1,2,2; a
param_scan_axis=1 model trains and equals param_scan_axis=0; and 2 processes x 2 devices with a balanced
strategy equal one process with 4 devices. Each run is checked to have traced its own strategy and balance
into the train step (support.cp_trace; dense traces none), and each lwm.train process to have logged them.

Cost: one subprocess per mesh runs its 10 or 11 trainings in turn (one compiled train step each), sharing
a persistent compilation cache; all are marked slow.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from support.cp_trace import layouts_of, strategies_of
from support.train_runs import losses, run_train, text_args, train_two_processes

pytestmark = pytest.mark.slow
TESTS = pathlib.Path(__file__).resolve().parents[1]

STEPS = 5
STRATEGIES = ("ring", "all_gather", "ulysses")
BALANCES = ("none", "zigzag", "striped")
CHUNKS = ["--llama.scan_query_chunk_size=16", "--llama.scan_key_chunk_size=16"]
# Runs lwm.train's main in turn in one process, recording what each run traced (support.cp_trace) into argv[3].
DRIVER = r"""
import json, os, sys
sys.path.insert(0, os.environ["LWM_TESTS_DIR"])
from support.cp_trace import traced_strategies
from lwm.train import main
base, runs, record = json.loads(sys.argv[1]), json.loads(sys.argv[2]), {}
for name, extra in runs:
    with traced_strategies() as seen:
        main(base + extra + [f"--logger.experiment_id={name}"])
    record[name] = sorted(seen)
with open(sys.argv[3], "w") as f:
    json.dump(record, f)
"""


def cp_flags(strategy, balance):
    return ["--llama.attention_impl=ring", "--update_llama_config=dict(context_parallel_strategy="
            f"'{strategy}',context_parallel_load_balance='{balance}')"]


def run_many(corpus, out, mesh, runs, devices=4):  # noqa: F811
    """{name: (step -> loss, what the run traced as a set, support.cp_trace)} of `runs` [name, extra flags]."""
    base = [a for a in text_args(corpus, out, "unused", STEPS) if not a.startswith("--logger.experiment_id")]
    base += [f"--mesh_dim={mesh}", *CHUNKS]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(corpus / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               NPROC="32", LWM_TESTS_DIR=str(TESTS))
    record = out / "traced.json"
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(base), json.dumps(runs), str(record)], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    traced = json.loads(record.read_text())
    return {name: (losses(out / name), {tuple(e) for e in traced[name]}) for name, _ in runs}


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
    want, dense_trace = got.pop("dense")
    assert sorted(want) == list(range(STEPS)) and want[STEPS - 1] < want[0]
    # each run traced its own strategy and balance (and the layout) into the train step, and dense none of them:
    # a dropped --update_llama_config would give ('ring', 'none') everywhere, with dense's losses all the same
    assert not strategies_of(dense_trace) and layouts_of(dense_trace) == {"none"}, dense_trace
    for name, (row, trace) in got.items():
        strategy, balance = ("ring", "zigzag") if name == "scan_axis_1" else name.split("-")
        assert strategies_of(trace) == {(strategy, balance)} and balance in layouts_of(trace), (name, trace)
        assert sorted(row) == sorted(want), name
        worst = max(abs(row[s] - want[s]) / abs(want[s]) for s in want)
        assert worst < 1e-5, (mesh, name, worst, row, want)


def test_two_processes_zigzag_ring_match_one_process(corpus, tmp_path):  # noqa: F811
    """2 processes x 2 devices, the zigzag ring across the processes (sp=4), vs 1 process x 4 devices."""
    flags = lambda name: (text_args(corpus, tmp_path, name, STEPS) + ["--mesh_dim=1,1,1,4", *CHUNKS]
                          + cp_flags("ring", "zigzag"))
    single = run_train(corpus, flags("single"), devices=4, timeout=900).stderr
    logs = train_two_processes(corpus, flags("multihost"), timeout=900)
    said = "attention ring (strategy ring, load balance zigzag)"   # lwm.train's start line: the config it built
    assert said in single and all(said in log for log in logs), (single[-2000:], [log[-2000:] for log in logs])
    want, got = losses(tmp_path / "single"), losses(tmp_path / "multihost")
    assert sorted(got) == sorted(want) == list(range(STEPS))
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < 1e-5
