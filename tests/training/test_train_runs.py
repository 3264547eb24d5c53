"""`python -m lwm.train` end to end, in subprocesses on the tiny preset: text and vision+text train and evaluate,
a NaN stops the run and keeps the last good checkpoint, SIGKILL (at a random step, and inside a checkpoint save)
then --autoresume repeats the uninterrupted run's losses bit for bit, and 2 processes x 2 CPU devices with the
ring across them give the single-process losses (to float32 rounding of the cross-process sums). Subprocesses share a persistent compilation cache."""
import json
import math
import os
import random
import shutil
import signal

import pytest

from lwm.checkpoint import manager as ckpt
from lwm.training.metrics import read_metrics
from support.train_runs import losses, run_train, text_args, train_two_processes

pytestmark = pytest.mark.slow          # every test here runs lwm.train in subprocesses

REQUIRED = {"step", "loss", "accuracy", "tokens_per_second", "mfu", "learning_rate", "param_norm", "gradient_norm",
            "step_time", "dataset_total_tokens", "dataset_packing_efficiency"}


def test_text_trains_evaluates_logs_and_checkpoints(corpus, tmp_path):
    args = text_args(corpus, tmp_path, "text", steps=12, batch=4) + [
        "--eval_steps=2", "--eval_dataset.type=json", "--eval_dataset.text_processor.fields=text",
        f"--eval_dataset.json_dataset.path={corpus / 'text.jsonl'}", "--eval_dataset.json_dataset.seq_length=64",
        "--eval_dataset.json_dataset.batch_size=4", "--log_freq=5", "--save_model_freq=6",
        "--checkpointer.save_optimizer_state=True"]
    run_train(corpus, args)
    rows = read_metrics(str(tmp_path / "text"))
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert REQUIRED | {"eval_loss", "eval_accuracy", "eval_text_loss"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0 and rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 1.0
    assert all(r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert rows[0]["learning_rate"] == 0.0 and rows[1]["learning_rate"] > 0.009    # warmup from init_lr=0
    newest = ckpt.latest(str(tmp_path / "text"))
    assert os.path.basename(newest) == "step_00000012"                     # keep=1: step 6 was pruned
    meta = ckpt.read_metadata(newest)
    assert meta["step"] == 12 and len(meta["rng"]) == 2 and meta["modality"] == "text"
    assert ckpt.read_dataset_state(newest)["total_tokens"] == 12 * 4 * 64
    assert ckpt.checkpoint_spec(newest).startswith("trainstate::")
    # --load_checkpoint=trainstate_params:: starts a new run (step 0, fresh optimizer) from the trained weights.
    spec = f"trainstate_params::{newest}/streaming_train_state"
    run_train(corpus, [*args, "--logger.experiment_id=finetune", "--total_steps=1", f"--load_checkpoint={spec}"])
    (row,) = read_metrics(str(tmp_path / "finetune"))
    assert row["step"] == 0 and row["loss"] < rows[0]["loss"] - 1.0


def test_vision_text_trains_both_losses_fall(corpus, tmp_path):
    args = ["--modality=vision,text", "--load_llama_config=tiny", "--llama.vision_vocab_size=8200",
            f"--tokenizer={corpus / 'tokenizer.model'}", "--train_dataset.type=json_vision",
            "--train_dataset.vision_text_processor.fields_from_example=fields",
            "--train_dataset.vision_text_processor.n_tokens_per_frame=4",
            f"--train_dataset.json_vision_dataset.path={corpus / 'vision.jsonl'}",
            "--train_dataset.json_vision_dataset.seq_length=64", "--train_dataset.json_vision_dataset.batch_size=2",
            "--optimizer.adamw_optimizer.lr=1e-2", "--optimizer.adamw_optimizer.lr_warmup_steps=2",
            "--optimizer.adamw_optimizer.lr_decay_steps=100", "--total_steps=14", "--log_freq=13",
            f"--logger.output_dir={tmp_path}", "--logger.experiment_id=vision", "--logger.append_uuid=False",
            "--peak_flops=1e11"]
    run_train(corpus, args)
    first, last = read_metrics(str(tmp_path / "vision"))
    assert REQUIRED | {"text_loss", "vision_loss", "text_accuracy", "vision_accuracy"} <= set(first)
    assert last["text_loss"] < first["text_loss"] - 1.0 and last["vision_loss"] < first["vision_loss"] - 2.0
    assert abs(first["loss"] - 0.5 * (first["text_loss"] + first["vision_loss"])) < 1e-5   # json_vision: 0.5/0.5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    args = text_args(corpus, tmp_path, "nan", steps=20) + [
        "--optimizer.adamw_optimizer.lr=1e30", "--optimizer.adamw_optimizer.lr_warmup_steps=0",
        "--optimizer.adamw_optimizer.lr_schedule_type=warmup_constant", "--save_model_freq=1"]
    proc = run_train(corpus, args, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = read_metrics(str(tmp_path / "nan"))
    bad = rows[-1]
    assert not (math.isfinite(bad["loss"]) and math.isfinite(bad["gradient_norm"])) and bad["step"] > 0
    assert all(math.isfinite(r["loss"]) for r in rows[:-1])
    newest = ckpt.latest(str(tmp_path / "nan"))
    assert f"lwm.train: stopped: step {bad['step']}:" in proc.stderr
    assert f"the last good checkpoint is {newest}" in proc.stderr
    assert ckpt.read_metadata(newest)["step"] == bad["step"]           # saved after the last finite step, no later


# ------------------------------------------------------------------------- exact resume and many hosts

RING = ["--mesh_dim=1,1,1,4", "--llama.attention_impl=ring", "--llama.scan_query_chunk_size=16",
        "--llama.scan_key_chunk_size=16", "--llama.resid_pdrop=0.1", "--save_model_freq=3",
        "--checkpointer.save_optimizer_state=True", "--autoresume=True"]
STEPS = 12


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run: 4 devices, the ring over sp=4, dropout on (so the RNG stream matters)."""
    out = tmp_path_factory.mktemp("reference")
    run_train(corpus, text_args(corpus, out, "ref", STEPS) + RING, devices=4)
    want = losses(out / "ref")
    assert sorted(want) == list(range(STEPS))
    return want


def first_step_of_last_run(folder) -> int:
    steps = [r["step"] for r in read_metrics(str(folder))]
    return next(s for i, s in reversed(list(enumerate(steps))) if i == 0 or steps[i - 1] >= s)


def test_sigkill_at_random_step_then_autoresume_is_bitwise_identical(corpus, tmp_path, reference):
    kill_step = random.SystemRandom().randint(3, STEPS - 3)
    args = text_args(corpus, tmp_path, "killed", STEPS) + RING
    proc = run_train(corpus, args, devices=4, wrapper=True, env={"KILL_AFTER_STEP": str(kill_step)}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    saved = ckpt.read_metadata(ckpt.latest(str(tmp_path / "killed")))["step"]
    assert saved == (kill_step // 3) * 3 and saved > 0, (kill_step, saved)
    run_train(corpus, args, devices=4)
    assert first_step_of_last_run(tmp_path / "killed") == saved          # it resumed, it did not start over
    assert losses(tmp_path / "killed") == reference, f"killed after step {kill_step}"


def test_sigkill_during_checkpoint_save_then_autoresume_is_bitwise_identical(corpus, tmp_path, reference):
    args = text_args(corpus, tmp_path, "killed_in_save", STEPS) + RING
    proc = run_train(corpus, args, devices=4, wrapper=True, env={"KILL_IN_SAVE": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    folder = tmp_path / "killed_in_save"
    assert (folder / ".tmp-step_00000006" / "streaming_train_state").exists()      # the save was under way
    assert os.path.basename(ckpt.latest(str(folder))) == "step_00000003"            # the previous one is intact
    # Negative control, from a copy of the same checkpoint with another dropout RNG state: not the reference.
    control = tmp_path / "control"
    shutil.copytree(folder / "step_00000003", control / "step_00000003")
    meta = json.loads((control / "step_00000003" / "metadata.json").read_text())
    meta["rng"] = [meta["rng"][0] ^ 1, meta["rng"][1]]
    (control / "step_00000003" / "metadata.json").write_text(json.dumps(meta))

    run_train(corpus, args, devices=4)
    assert first_step_of_last_run(folder) == 3
    assert losses(folder) == reference
    run_train(corpus, text_args(corpus, tmp_path, "control", 5) + RING, devices=4)
    got = losses(control)
    assert sorted(got) == [3, 4] and got[3] != reference[3] and got[4] != reference[4]


def test_two_processes_ring_across_hosts_match_single_process(corpus, tmp_path, reference):
    train_two_processes(corpus, text_args(corpus, tmp_path, "multihost", STEPS) + RING)
    got = losses(tmp_path / "multihost")
    # Not bitwise: the loss and gradient sums over sp are all-reduced by gloo across processes and in-process
    # within one, in different orders (step 0 already differs in the last bit or two of float32).
    assert sorted(got) == sorted(reference)
    assert max(abs(got[s] - reference[s]) / reference[s] for s in got) < 1e-5
    state = ckpt.read_dataset_state(ckpt.latest(str(tmp_path / "multihost")))
    hosts = [s["host"] for s in state["process_states"]]                # each process's own data stream
    assert hosts == [dict(dp_rank=0, dp_size=1, sp_rank=i, sp_size=2) for i in range(2)]
