"""`python -m lwm.extend` (lwm/tools/extension.py) on the tiny plan, docs/plans/tiny_cpu.yaml (1K -> 4K -> 16K, the
tiny preset, a few steps a stage), as subprocesses on one simulated CPU device:
  - a real SIGKILL between stages 1k and 4k, a rerun SIGKILLed inside 4k after its first checkpoint, then a rerun
    to the end: 1k is neither trained nor measured again, 4k continues through lwm.train's autoresume, and every
    stage passes its gates (this run is also the control of the failing gate: same plan, loose threshold);
  - a failing gate (stage 4k's held-out loss must fall by 5 nats) stops the run after 4k with the gate, value
    and threshold named, and 16k never starts;
  - every plan field is checked before anything runs: one line naming the file, the stage and the field.
The data come from docs/plans/make_tiny_data.py (lwm.demo's builders)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN = os.path.join(ROOT, "docs", "plans", "tiny_cpu.yaml")


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _cmd(plan, data, work):
    return [sys.executable, "-m", "lwm.extend", f"--plan={plan}", f"--data_dir={data}", f"--workdir={work}"]


def _state(work):
    try:
        with open(os.path.join(work, "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):   # not written yet (a half file is never seen: atomic)
        return {}


def _tree(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_tiny_data", os.path.join(ROOT, "docs", "plans",
                                                                                 "make_tiny_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(str(tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """The tiny plan run until stage 1k's three gates are recorded, then SIGKILLed (the process is between
    stages or starting 4k). Returns (workdir, a copy of it taken right after the kill)."""
    work = str(tmp_path_factory.mktemp("extend") / "run")
    log = open(os.path.join(os.path.dirname(work), "first_run.log"), "w")
    proc = subprocess.Popen(_cmd(PLAN, data, work), env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if set(_state(work).get("stages", {}).get("1k", {}).get("gates", {})) == {"heldout_loss", "needle",
                                                                                     "suite"}:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"lwm.extend exited {proc.returncode} before the kill: " + \
            open(log.name).read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    snapshot = work + "_snapshot"
    shutil.copytree(work, snapshot)
    state = _state(work)["stages"]
    assert "1k" in state and "checkpoint" not in state.get("4k", {})     # killed between the stages
    return work, snapshot


@pytest.mark.slow
def _kill_after_checkpoint(cmd, folder, step, timeout=600):
    """Start cmd; SIGKILL it as soon as `folder` holds a complete checkpoint of `step` (lwm.checkpoint.manager)."""
    from lwm.checkpoint.manager import latest

    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            found = latest(folder) if os.path.isdir(folder) else None
            if found and found.endswith(f"step_{step:08d}"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"exited {proc.returncode} before the kill: {proc.stdout.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    return out


def test_kill_between_stages_resumes_without_rerunning_the_finished_stage(killed, data):
    """After the kill between 1k and 4k: a rerun killed again inside 4k (right after its step-1 checkpoint, of
    two steps), then a rerun to the end. 1k is neither trained nor measured again; 4k continues from its step-1
    checkpoint through lwm.train's autoresume (it logs step 0 once and step 1 once, where a restart from 1k's
    checkpoint would log step 0 twice)."""
    work, _ = killed
    before = _tree(os.path.join(work, "stages", "1k"))
    needle_1k = os.stat(os.path.join(work, "gates", "1k", "needle.json")).st_mtime_ns
    out = _kill_after_checkpoint(_cmd(PLAN, data, work), os.path.join(work, "stages", "4k"), 1)
    assert "stage 0 (1k): trained earlier" in out and "stage 1 (4k): training" in out, out[-3000:]
    assert not os.path.exists(os.path.join(work, "stages", "4k", "step_00000002"))   # killed inside the stage
    assert "checkpoint" not in _state(work)["stages"]["4k"]
    proc = subprocess.run(_cmd(PLAN, data, work), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 0 (1k): trained earlier" in proc.stdout
    assert "stage 0 (1k): training" not in proc.stdout and "stage 0 (1k): gate" not in proc.stdout
    assert "stage 1 (4k): training" in proc.stdout and "stage 2 (16k): training" in proc.stdout
    assert _tree(os.path.join(work, "stages", "1k")) == before        # 1k's checkpoint and metrics untouched
    assert os.stat(os.path.join(work, "gates", "1k", "needle.json")).st_mtime_ns == needle_1k
    report = json.load(open(os.path.join(work, "report.json")))
    assert report["status"] == "passed" and [s["name"] for s in report["stages"]] == ["1k", "4k", "16k"]
    for stage in report["stages"]:
        assert [g["gate"] for g in stage["gates"]] == ["heldout_loss", "needle", "suite"]
        assert all(g["passed"] for g in stage["gates"])
    # Each stage started from the one before: 4k from 1k's checkpoint, and its loss is compared with 1k's.
    state = _state(work)["stages"]
    assert state["4k"]["gates"]["heldout_loss"]["previous_loss"] == state["1k"]["gates"]["heldout_loss"]["loss"]
    first = [json.loads(line) for line in open(os.path.join(work, "stages", "4k", "metrics.jsonl"))]
    assert [r["step"] for r in first] == [0, 1]       # 4k's own 2 steps from 0 (fresh optimizer), each run once
    assert report["stages"][2]["gates"][1]["lengths"][0] > 15000     # the needle gate at the stage's length
    assert "| 16k | 16384 | suite |" in proc.stdout                   # the printed table


@pytest.mark.slow
def test_failing_gate_stops_with_its_value_and_threshold(killed, data, tmp_path):
    """The same plan, but stage 4k's held-out loss must fall by 5 nats (the control, the same plan with
    max_increase 0.5, passes above). Run on the copy taken at the kill: 1k is recorded, 4k trains and fails."""
    _, snapshot = killed
    plan = yaml.safe_load(open(PLAN))
    plan["stages"][1]["gates"] = {"heldout_loss": {"max_increase": -5.0}}
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(plan))
    proc = subprocess.run(_cmd(strict, data, snapshot), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lwm.extend: stopped: stage 4k: gate heldout_loss failed: value ")
    assert last.endswith("threshold -5 (increase <= max_increase)")
    report = json.load(open(os.path.join(snapshot, "report.json")))
    assert report["status"] == "failed" and report["failed"]["stage"] == "4k"
    assert report["failed"]["value"] > -5.0
    assert [s["name"] for s in report["stages"]] == ["1k", "4k"]
    assert not os.path.exists(os.path.join(snapshot, "stages", "16k"))    # the next stage never started
    assert "**FAIL**" in proc.stdout and "stage 2 (16k)" not in proc.stdout


BAD = [
    (lambda p: p["stages"][1].update(seq_length="4k"), "stage 1 (4k): field seq_length: '4k' is not an integer"),
    (lambda p: p["stages"][2].update(mesh="1,2,x"), "stage 2 (16k): field mesh: "),
    (lambda p: p["stages"][0].update(rope={"thetaa": 1.0}), "stage 0 (1k): field rope: "),
    (lambda p: p["stages"][0].update(stepz=3), "stage 0 (1k): field stepz: unknown"),
    (lambda p: p["stages"][1].update(warmup_steps=2), "stage 1 (4k): field warmup_steps: 2 must be below steps=2"),
    (lambda p: p["gates"]["needle"].update(min_accuracy=1.5), "tiny.yaml: field gates.needle.min_accuracy:"),
    (lambda p: p["gates"]["suite"].update(tasks=["nope"]), "tiny.yaml: field gates.suite.tasks: unknown"),
    (lambda p: p["stages"][2].update(gates={"suite": {"min_score": 101}}), "stage 2 (16k): field gates.suite.min_score:"),
    (lambda p: p["stages"][2].update(train={"total_steps": 9}), "stage 2 (16k): field train.total_steps: set by"),
    (lambda p: p["stages"][0].update(train={"optimizer.adamw_optimizer.b1": 2.0}), "stage 0 (1k): field train: "),
    (lambda p: p["data"].update({"json_dataset.path": "missing.jsonl"}), "field data.json_dataset.path: "),
    (lambda p: p["stages"][1].update(name="1k"), "stage 1 (1k): field name: used by an earlier stage"),
    (lambda p: p["stages"][0].update(seq_length=300), "stage 0 (1k): field gates.needle.lengths: "),
    (lambda p: p["stages"][0].update(data={"mix": [{"path": "train.jsonl", "weight": 0}]}),
     "stage 0 (1k): field data.mix[0].weight: 0 must be a positive number"),
    (lambda p: p["stages"][0].update(data={"mix": [{"path": "nope.jsonl", "weight": 1}]}),
     "stage 0 (1k): field data.mix[0].path: "),
    (lambda p: p["stages"][0].update(data={"mix": "train.jsonl"}), "stage 0 (1k): field data.mix: expected"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[m.split(": ")[0] + "|" + m.split(": ")[1] for _, m in BAD])
def test_every_plan_field_is_checked_before_anything_runs(data, tmp_path, edit, message):
    from lwm.tools.extension import PlanError, load_plan

    load_plan(PLAN, data)                                   # control: the plan as shipped is accepted
    plan = yaml.safe_load(open(PLAN))
    edit(plan)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanError) as e:
        load_plan(str(path), data)
    assert str(e.value).startswith(f"plan {path}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_plan_is_one_line_and_exit_2(data, tmp_path, capsys):
    from lwm import extend

    plan = yaml.safe_load(open(PLAN))
    plan["stages"][0]["lr"] = "fast"
    path = tmp_path / "bad.json"                            # JSON is YAML: the same reader
    path.write_text(json.dumps(plan))
    assert extend.cli("lwm.extend", extend.main, extend.get_default_config, "",
                      [f"--plan={path}", f"--data_dir={data}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lwm.extend: error: plan {path}: stage 0 (1k): field lr: 'fast' is not a number"]
    assert not (tmp_path / "w").exists()                    # nothing ran
    assert extend.cli("lwm.extend", extend.main, extend.get_default_config, "", [f"--plan={tmp_path / 'no.yaml'}"]) == 2
    assert capsys.readouterr().err.strip() == f"lwm.extend: error: --plan={tmp_path / 'no.yaml'}: no such file"


def test_the_paper_plan_passes_every_check_but_its_files(data, tmp_path):
    """docs/plans/lwm_paper.yaml with its pod paths replaced by the tiny files (and the 7b preset for the imported
    config): every other field (meshes, RoPE, schedules, gates and their lengths) goes through the same checks."""
    from lwm.tools.extension import load_plan

    plan = yaml.safe_load(open(os.path.join(ROOT, "docs", "plans", "lwm_paper.yaml")))
    plan["base"].update(load_llama_config="7b", load_checkpoint="")
    plan["tokenizer"] = "tokenizer.model"
    plan["heldout"]["path"] = "heldout.jsonl"
    plan["gates"]["needle"]["haystack"] = "haystack.jsonl"
    for stage in plan["stages"]:
        stage["data"]["json_dataset.path"] = "train.jsonl"
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(str(path), data)
    assert [(s.seq_length, s.rope["theta"], s.mesh) for s in loaded.stages] == [
        (32768, 1e6, "1,128,1,2"), (131072, 1e7, "1,32,1,8"), (262144, 1e7, "1,16,1,16"),
        (524288, 2.5e7, "1,8,1,32"), (1048576, 5e7, "1,4,1,64")]
    assert all(s.batch_size * s.seq_length == 2 ** 22 for s in loaded.stages)      # 4M tokens per step


def test_a_changed_stage_is_refused_on_resume(data, tmp_path, monkeypatch):
    """state.json says stage 1k trained at lr 0.001; the plan now says 0.003: one line naming the field, before
    anything runs (control: with the plan's own flags recorded, the run gets past the check to 1k's training)."""
    from lwm.tools import extension
    from lwm.training import loop

    plan = extension.load_plan(PLAN, data)
    recorded = extension._recorded(extension.stage_flags(plan, 0, ""))
    work = tmp_path / "w"
    work.mkdir()
    extension.write_state(str(work), {"stages": {"1k": {"flags": dict(recorded, **{
        "optimizer.adamw_optimizer.lr": 0.001})}}, "base_heldout_loss": 6.0})
    with pytest.raises(extension.PlanError, match=r"^plan .*tiny_cpu.yaml: stage 0 \(1k\): field lr: "
                                                  r"--optimizer.adamw_optimizer.lr is 0.003, but the stage ran in "):
        extension.run(plan, str(work), log=lambda *a: None)
    assert not (work / "stages").exists()

    class Reached(Exception):
        pass

    def fake_train(config):
        raise Reached(config.logger.experiment_id)

    monkeypatch.setattr(loop, "train", fake_train)
    extension.write_state(str(work), {"stages": {"1k": {"flags": recorded}}, "base_heldout_loss": 6.0})
    with pytest.raises(Reached, match="^1k$"):
        extension.run(plan, str(work), log=lambda *a: None)


def test_a_data_mix_takes_each_source_by_its_weight(data, tmp_path):
    """A stage's data.mix is written once into its folder, each example a verbatim line of a source, the
    sources' shares their weights' shares (3:1 over 4000 examples: 3000 +- 3 sigma), a small source cycled; the
    stage trains on the mix file (its json_dataset.path), replacing the plan's shared path."""
    from lwm.tools.extension import load_plan, stage_config, write_mix

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(50)))
    b.write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(7)))
    mix = [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}]
    out = tmp_path / "mix.jsonl"
    taken = write_mix(mix, str(out), 4000, seed=0)
    lines = out.read_text().splitlines()
    assert len(lines) == 4000 and sum(taken.values()) == 4000
    n_a = sum(json.loads(x)["text"].startswith("a") for x in lines)
    assert n_a == taken[str(a)] and abs(n_a - 3000) < 3 * (4000 * 0.25 * 0.75) ** 0.5
    assert {json.loads(x)["text"] for x in lines} == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(7)}
    assert write_mix(mix, str(tmp_path / "again.jsonl"), 4000, seed=0) == taken           # seeded
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    # Control: equal weights give equal shares, not 3:1.
    even = write_mix([dict(m, weight=1.0) for m in mix], str(tmp_path / "even.jsonl"), 4000, seed=0)
    assert abs(even[str(a)] - 2000) < 3 * (4000 * 0.25) ** 0.5
    plan = yaml.safe_load(open(PLAN))
    plan["stages"][0]["data"] = {"mix": mix, "mix_examples": 64}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(plan))
    loaded = load_plan(str(path), data)
    config = stage_config(loaded, 0, str(tmp_path / "work"), init="")
    mixed = config.train_dataset.json_dataset.path
    assert mixed.endswith("1k.mix.jsonl") and len(open(mixed).read().splitlines()) == 64
    assert stage_config(loaded, 1, str(tmp_path / "work"), init="").train_dataset.json_dataset.path.endswith(
        "train.jsonl")                                      # the other stages keep the shared path
