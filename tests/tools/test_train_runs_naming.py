"""scripts/run_train_{text,vision_text}.sh on one's own data: the tokenizer they use is the one named (and
said), another data file gets another run folder (the same settings the same one: the control), a missing
tokenizer is one line (lwm.train's); and lwm.train's refusal to resume a run on other data names the flags.
The scripts run with PYTHON set to a stub that records lwm.train's flags, so nothing is trained."""
import json
import os
import subprocess

import pytest

from lwm.cli.flags import FlagError
from lwm.training.dataset import DatasetFactory, DatasetStateMismatch
from lwm.training.loop import _load_dataset_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    d = tmp_path_factory.mktemp("stub")
    for name in ("a", "b"):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} my corpus"}) + "\n"
                                                 for i in range(20)))
    (d / "tok.model").write_bytes(b"not read: the stub stands in for lwm.train")
    py = d / "python"
    py.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    py.chmod(0o755)
    return d


def run_script(stub, script, **env):
    out = stub / "argv.txt"
    if out.exists():
        out.unlink()
    full = {**os.environ, "PYTHON": str(stub / "python"), "STUB_OUT": str(out), "output_dir": str(stub / "runs"),
            **env}
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], env=full, capture_output=True, text=True,
                       timeout=120)
    flags = dict(a.split("=", 1) for a in out.read_text().splitlines() if "=" in a) if out.exists() else {}
    return p, flags


@pytest.mark.parametrize("script", ["run_train_text.sh", "run_train_vision_text.sh"])
def test_other_data_is_another_run_and_the_tokenizer_is_said(stub, script):
    tok = str(stub / "tok.model")
    pa, a = run_script(stub, script, dataset_path=str(stub / "a.jsonl"), llama_tokenizer_path=tok)
    pb, b = run_script(stub, script, dataset_path=str(stub / "b.jsonl"), llama_tokenizer_path=tok)
    pa2, a2 = run_script(stub, script, dataset_path=str(stub / "a.jsonl"), llama_tokenizer_path=tok)
    assert pa.returncode == pb.returncode == 0, pa.stderr + pb.stderr
    assert a["--tokenizer"] == b["--tokenizer"] == tok
    assert f"tokenizer {tok} (llama_tokenizer_path)" in pa.stdout
    assert a["--logger.experiment_id"] != b["--logger.experiment_id"]
    assert a2["--logger.experiment_id"] == a["--logger.experiment_id"]          # control: same data, same run
    assert a["--autoresume"] == "True"
    _, named = run_script(stub, script, dataset_path=str(stub / "b.jsonl"), llama_tokenizer_path=tok,
                          experiment_id="mine")
    assert named["--logger.experiment_id"] == "mine"


@pytest.mark.parametrize("script", ["run_train_text.sh", "run_train_vision_text.sh"])
def test_short_runs_fit_the_warmup_and_the_checkpoint_is_said(stub, script):
    """total_steps <= 10 used to be refused for a warmup (10) the user never set: the warmup is now half of
    such a run, and lwm.train's checks accept it (control: 200 steps keep 10). A finished run says its newest
    checkpoint as the --load_checkpoint spec to pass on."""
    from lwm.train import get_default_config
    from lwm.training.loop import check_config

    tok = str(stub / "tok.model")
    for steps, warmup in (("5", "2"), ("1", "0"), ("200", "10")):
        p, flags = run_script(stub, script, dataset_path=str(stub / "a.jsonl"), llama_tokenizer_path=tok,
                              total_steps=steps, experiment_id=f"short{steps}-{script}")
        assert p.returncode == 0, p.stderr
        assert flags["--optimizer.adamw_optimizer.lr_warmup_steps"] == warmup
        config = get_default_config()
        config.total_steps = int(steps)
        config.optimizer.adamw_optimizer.lr_warmup_steps = int(warmup)
        config.optimizer.adamw_optimizer.lr_decay_steps = int(steps)
        check_config(config)
        assert "checkpoint:" not in p.stdout                      # the stub trained nothing
    step = stub / "runs" / f"short5-{script}" / "step_00000005"
    step.mkdir(parents=True)
    (step / "streaming_train_state").write_bytes(b"")
    p, _ = run_script(stub, script, dataset_path=str(stub / "a.jsonl"), llama_tokenizer_path=tok, total_steps="5",
                      experiment_id=f"short5-{script}")
    assert p.stdout.strip().endswith(f"checkpoint: --load_checkpoint=trainstate_params::{step}/streaming_train_state")


def test_missing_tokenizer_is_one_line_through_lwm_train(stub, tmp_path, capsys):
    """The scripts pass llama_tokenizer_path to lwm.train as --tokenizer; lwm.train refuses a missing one in one
    line (docs/train.md), before any model is built."""
    from lwm import train

    _, flags = run_script(stub, "run_train_text.sh", dataset_path=str(stub / "a.jsonl"),
                          llama_tokenizer_path=str(stub / "missing" / "tokenizer.model"))
    assert flags["--tokenizer"] == str(stub / "missing" / "tokenizer.model")
    argv = ["--modality=text", "--load_llama_config=tiny", f"--tokenizer={flags['--tokenizer']}",
            f"--train_dataset.json_dataset.path={stub / 'a.jsonl'}", f"--logger.output_dir={tmp_path}"]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing/tokenizer.model" in err[0] and "no such file" in err[0]


def test_text_script_trains_a_tokenizer_from_the_data_when_none_is_named(stub):
    p, flags = run_script(stub, "run_train_text.sh", dataset_path=str(stub / "a.jsonl"), tokenizer_vocab_size="300")
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(flags["--tokenizer"]) and "trained from dataset_path" in p.stdout
    p, _ = run_script(stub, "run_train_vision_text.sh", dataset_path=str(stub / "a.jsonl"))
    assert p.returncode == 2 and "llama_tokenizer_path is not" in p.stderr      # vision: name it


def test_resume_on_other_data_names_the_flags(tok, tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(str(tmp_path / f"{name}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps({"text": f"{name} time market people idea {i}"}) + "\n" for i in range(40))
    config = lambda p: {"type": "json", "text_processor": {"fields": "text"}, "json_dataset": {"path": p, "seq_length": 16, "batch_size": 2}}
    first = DatasetFactory.load_dataset(config(paths[0]), tok)
    next(iter(first))
    state = first.get_state_dict()
    with pytest.raises(DatasetStateMismatch):
        DatasetFactory.load_dataset(config(paths[1]), tok).load_state_dict(state)
    with pytest.raises(FlagError) as e:
        _load_dataset_state(DatasetFactory.load_dataset(config(paths[1]), tok), state, "--autoresume continues X, whose")
    msg = str(e.value)
    assert "\n" not in msg and "--train_dataset.json_dataset.path=" in msg and "--logger.experiment_id" in msg
    _load_dataset_state(DatasetFactory.load_dataset(config(paths[0]), tok), state, "x")     # control: same data
