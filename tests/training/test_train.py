"""lwm.train in-process: flag parsing (the run scripts' flags, literal-only config updates, bad flags), the one
loss_fn against a full-logits float64 reference, the optimizer against a NumPy AdamW, and the FLOP count.
End-to-end runs of `python -m lwm.train` are in test_train_runs.py."""
import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwm.training import optimizer as optimizer_lib
from lwm.training import steps as ts
from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
from lwm.model.registry import build_model
from lwm.parallel.sharding import check_divisible, make_mesh, match_partition_rules
from lwm.cli.flags import FlagError, model_config_from_flags, parse_literal_dict
from lwm.train import parse_flags
from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------ flags

def test_update_llama_config_is_literal_data_only():
    want = {"theta": 50000000, "max_sequence_length": 32768, "scan_attention": True}
    for text in ("dict(theta=50000000,max_sequence_length=32768,scan_attention=True)",
                 "{'theta': 50000000, 'max_sequence_length': 32768, 'scan_attention': True}",
                 '{"theta": 50000000, "max_sequence_length": 32768, "scan_attention": true}'):
        assert parse_literal_dict(text) == want
    assert parse_literal_dict("") == {}
    for bad in ("__import__('os').system('echo pwned')", "dict(theta=10 ** 6)", "dict(**{'theta': 1})",
                "dict(theta=x)", "dict([('theta', 1)])", "os.environ", "[1, 2]", "dict(theta=1"):
        with pytest.raises(FlagError, match="--update_llama_config="):
            parse_literal_dict(bad)


def test_flags_parse_to_typed_config_and_bad_flags_are_named():
    config = parse_flags(["--modality=vision,text", "--total_steps", "7", "--noautoresume", "--log_all_worker",
                          "--optimizer.adamw_optimizer.lr=8e-5", "--train_dataset.json_dataset.seq_length=64",
                          "--jax_distributed.num_processes=2", "--llama.scan_mlp=True",
                          "--load_llama_config=tiny", "--update_llama_config=dict(theta=5e7)"])
    assert config.total_steps == 7 and config.autoresume is False and config.log_all_worker is True
    assert config.optimizer.adamw_optimizer.lr == 8e-5 and config.train_dataset.json_dataset.seq_length == 64
    assert config.jax_distributed.num_processes == 2
    model_config = model_config_from_flags(config)
    assert isinstance(model_config, VisionLLaMAConfig)
    assert model_config.scan_mlp is True and model_config.theta == 5e7 and model_config.hidden_size == 64

    with pytest.raises(FlagError, match=r"unknown flag --optimizer.adamw_optimizer.learning_rate; did you mean"):
        parse_flags(["--optimizer.adamw_optimizer.learning_rate=1"])
    with pytest.raises(FlagError, match=r"--total_steps='ten': expected int"):
        parse_flags(["--total_steps=ten"])
    with pytest.raises(FlagError, match=r"--autoresume='maybe': expected True or False"):
        parse_flags(["--autoresume=maybe"])
    with pytest.raises(FlagError, match=r"--optimizer is a group"):
        parse_flags(["--optimizer=adamw"])
    with pytest.raises(FlagError, match=r"unexpected argument 'train'"):
        parse_flags(["train"])
    with pytest.raises(FlagError, match=r"unknown flag --llama.hidden_sise.*llama.hidden_size"):
        model_config_from_flags(parse_flags(["--llama.hidden_sise=8"]))
    with pytest.raises(FlagError, match=r"--llama.num_hidden_layers='two': expected int"):
        model_config_from_flags(parse_flags(["--llama.num_hidden_layers=two"]))
    with pytest.raises(FlagError, match=r"--update_llama_config: .*unknown .*'thetta'"):
        model_config_from_flags(parse_flags(["--update_llama_config=dict(thetta=1.0)"]))


def _script_args(tmp_path, script: str, **env) -> list[str]:
    """The argv that a run script passes to `python -m lwm.train` (its python replaced by a recorder)."""
    out = tmp_path / f"{script}.args"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{out}"\n')
    fake.chmod(0o755)
    run_env = dict(os.environ, PYTHON=str(fake), dataset_path="/data/train.jsonl",
                   llama_tokenizer_path="/data/tokenizer.model", output_dir=str(tmp_path / "out"), **env)
    subprocess.run(["bash", os.path.join(REPO, "scripts", script)], env=run_env, check=True, timeout=60)
    args = out.read_text().splitlines()
    assert args[:2] == ["-u", "-m"] and args[2] == "lwm.train"
    return args[3:]


@pytest.mark.parametrize("script, modality", [("run_train_text.sh", "text"),
                                              ("run_train_vision_text.sh", "vision,text")])
@pytest.mark.slow
def test_run_script_flags_parse_and_big_presets_shape_check(tmp_path, script, modality):
    text = open(os.path.join(REPO, "scripts", script)).read()
    assert not any(line.strip() == "read" for line in text.splitlines())  # no stray `read`
    assert text.splitlines()[1].startswith("# Purpose:")
    shapes_by_preset = {}
    for preset in ("tiny", "7b"):
        config = parse_flags(_script_args(tmp_path, script, llama_config=preset))
        assert config.modality == modality and config.load_llama_config == preset
        model_config = model_config_from_flags(config)
        task = ts.Task(build_model(modality, model_config), modality)
        tx, _ = optimizer_lib.make_optimizer(config.optimizer)
        shapes = jax.eval_shape(functools.partial(ts.init_train_state, task=task, tx=tx), jax.random.PRNGKey(0))
        specs = match_partition_rules(shapes, model_config)  # every parameter and optimizer leaf has a rule
        check_divisible(shapes, specs, make_mesh(config.mesh_dim))
        n_params = sum(x.size for x in jax.tree.leaves(shapes.params))
        mu = shapes.opt_state[1][0].mu
        assert jax.tree.structure(mu) == jax.tree.structure(shapes.params)
        shapes_by_preset[preset] = n_params
    embeddings = 32000 * 4096 * 2 + (2 * 8448 * 4096 if modality == "vision,text" else 0)
    assert abs(shapes_by_preset["7b"] - embeddings - 6.476e9) < 0.01e9   # 7B: 6.48B outside the embeddings
    assert shapes_by_preset["tiny"] < 2e6


# --------------------------------------------------------------------------------------------- loss_fn

def _reference_losses(logits_text, logits_vision, batch, text_weight, vision_weight):
    """Plain float64 NumPy: per-modality sum(w * nll) / sum(w), each head scoring its own targets."""
    def nll_and_correct(logits, targets):
        logits = np.asarray(logits, np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        safe = np.clip(targets, 0, logits.shape[-1] - 1)
        return -np.take_along_axis(logp, safe[..., None], -1)[..., 0], logits.argmax(-1) == targets

    w = np.asarray(batch["loss_masks"], np.float64)
    vision = np.asarray(batch["target_vision_masks"])
    targets = np.asarray(batch["target_tokens"])
    out = {}
    for name, logits, mask in (("text", logits_text, ~vision), ("vision", logits_vision, vision)):
        if logits is None:
            continue
        nll, correct = nll_and_correct(logits, targets)
        wm = w * mask
        out[f"{name}_loss"] = (wm * nll).sum() / wm.sum()
        out[f"{name}_accuracy"] = (wm * correct).sum() / wm.sum()
    out["loss"] = text_weight * out["text_loss"] + vision_weight * out.get("vision_loss", 0.0)
    return out


@pytest.fixture(scope="module")
def vision_setup():
    cfg = VisionLLaMAConfig.load("tiny").replace(vision_vocab_size=8200, attention_impl="dense")
    model = VisionLLaMAForCausalLM(cfg)
    b, t = 2, 32
    rng = np.random.default_rng(0)
    vision = np.zeros((b, t + 1), bool)
    vision[0, 5:20] = vision[1, 10:30] = True
    tokens = np.where(vision, rng.integers(0, 8194, (b, t + 1)), rng.integers(0, 512, (b, t + 1)))
    batch = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], input_vision_masks=vision[:, :-1],
                 target_vision_masks=vision[:, 1:],
                 loss_masks=rng.choice([0.0, 0.5, 1.0, 2.0], (b, t)).astype(np.float32),
                 segment_ids=np.repeat(np.array([[1] * 20 + [2] * 12]), b, 0).astype(np.int32),
                 position_ids=np.repeat(np.concatenate([np.arange(20), np.arange(12)])[None], b, 0).astype(np.int32))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["input_tokens"][:, :8],
                                 batch["input_vision_masks"][:, :8])
    task = ts.Task(model, "vision,text", text_loss_weight=0.3, vision_loss_weight=0.7, loss_chunk_size=8)
    return model, params["params"], batch, task, jax.jit(functools.partial(ts.loss_fn, task=task))


def test_loss_fn_vision_text_matches_full_logits_reference(vision_setup):
    model, params, batch, task, jitted_loss = vision_setup
    loss, metrics = jitted_loss(params, batch)
    kw = dict(position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    vision_logits, text_logits = jax.jit(model.apply)({"params": params}, batch["input_tokens"],
                                                      batch["input_vision_masks"], **kw)
    want = _reference_losses(text_logits, vision_logits, batch, 0.3, 0.7)
    for key, value in want.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, err_msg=key)
    assert float(loss) == float(metrics["loss"])
    # Negative control: the heads swapped (text targets scored by the vision head and back) is far off.
    swapped = _reference_losses(vision_logits, text_logits, batch, 0.3, 0.7)
    assert abs(swapped["loss"] - float(loss)) > 0.1
    # A batch without a single vision target: vision_loss is 0, not NaN.
    text_only = {**batch, "target_vision_masks": np.zeros_like(batch["target_vision_masks"]),
                 "target_tokens": batch["target_tokens"] % 512}
    _, no_vision = jitted_loss(params, text_only)
    assert float(no_vision["vision_loss"]) == 0.0 and math.isfinite(float(no_vision["loss"]))

    # Gradients equal those of the full-logits jnp loss.
    def full_logits_loss(p):
        vl, tl = model.apply({"params": p}, batch["input_tokens"], batch["input_vision_masks"], **kw)
        total = 0.0
        for logits, mask, mix in ((tl, ~batch["target_vision_masks"], 0.3), (vl, batch["target_vision_masks"], 0.7)):
            w = batch["loss_masks"] * mask
            tgt = jnp.where(mask, batch["target_tokens"], 0)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
            total = total + mix * jnp.sum(w * nll) / jnp.sum(w)
        return total

    g_ref = jax.jit(jax.grad(full_logits_loss))(params)
    g = jax.jit(jax.grad(lambda p: ts.loss_fn(p, batch, task=task)[0]))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_loss_fn_text_matches_reference():
    cfg = LLaMAConfig.load("tiny").replace(attention_impl="dense", initializer_range=0.5)  # peaked logits
    model = LLaMAForCausalLM(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 512, (2, 17))
    batch = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:],
                 loss_masks=(rng.random((2, 16)) > 0.3).astype(np.float32),
                 input_vision_masks=np.zeros((2, 16), bool), target_vision_masks=np.zeros((2, 16), bool))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["input_tokens"])["params"]
    task = ts.Task(model, "text")
    loss, metrics = jax.jit(functools.partial(ts.loss_fn, task=task))(params, batch)
    logits = jax.jit(model.apply)({"params": params}, batch["input_tokens"])
    want = _reference_losses(logits, None, batch, 1.0, 0.0)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=2e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), want["text_accuracy"], rtol=1e-6)
    # Negative control: targets off by one position (the classic shift bug) fail the same check by far.
    shifted = _reference_losses(logits, None, {**batch, "target_tokens": batch["input_tokens"]}, 1.0, 0.0)
    assert abs(shifted["loss"] - float(loss)) > 100 * 2e-5 * float(loss)


# ------------------------------------------------------------------------------------------- optimizer

def _numpy_adamw(params, grads_per_step, lrs, b1, b2, wd, clip, eps=1e-8):
    """Reference AdamW (decoupled weight decay) with global-norm clipping, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, clip / norm)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p[k])
    return p


def test_optimizer_matches_numpy_adamw_schedule_and_accumulation():
    flags = {"adamw_optimizer": {"lr": 0.1, "init_lr": 0.01, "end_lr": 0.02, "lr_warmup_steps": 2,
                                 "lr_decay_steps": 6, "weight_decay": 0.1, "clip_gradient": 1.0, "b2": 0.9}}
    tx, schedule = optimizer_lib.make_optimizer(flags)
    # Schedule, written out: linear warmup 0.01 -> 0.1 over 2 steps, cosine 0.1 -> 0.02 over steps 2..6.
    want = [0.01, 0.055, 0.1] + [0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (1, 2, 3, 4)] + [0.02]
    np.testing.assert_allclose([float(schedule(s)) for s in range(8)], want, rtol=1e-6)
    const = optimizer_lib.learning_rate_schedule(optimizer_lib.get_default_config(
        {"adamw_optimizer": {"lr": 0.1, "lr_warmup_steps": 4, "lr_schedule_type": "warmup_constant"}}).adamw_optimizer)
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 100)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)

    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()} for s in (3, 0.1, 1)]
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    ref = _numpy_adamw(params, grads, want[:3], 0.9, 0.9, 0.1, 1.0)  # step 0's grads (norm > 1) are clipped
    for k in params:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6)
    unclipped = _numpy_adamw(params, grads, want[:3], 0.9, 0.9, 0.1, 1e9)      # negative control
    assert max(np.abs(unclipped[k] - ref[k]).max() for k in params) > 1e-3

    # Accumulation over 2 micro-steps = one AdamW step on the mean gradient.
    tx2, _ = optimizer_lib.make_optimizer({**flags, "accumulate_gradient_steps": 2})
    state, p = tx2.init(params), params
    for g in grads[:2]:
        updates, state = tx2.update(g, state, p)
        p = optax.apply_updates(p, updates)
    mean = {k: (grads[0][k] + grads[1][k]) / 2 for k in params}
    ref = _numpy_adamw(params, [mean], want[:1], 0.9, 0.9, 0.1, 1.0)
    for k in params:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="lr_decay_steps=2 must exceed lr_warmup_steps=2"):
        optimizer_lib.make_optimizer({"adamw_optimizer": {"lr_warmup_steps": 2, "lr_decay_steps": 2}})
    with pytest.raises(KeyError, match="optimizer.adamw_optimizer.beta1"):
        optimizer_lib.get_default_config({"adamw_optimizer": {"beta1": 0.9}})


def test_flops_per_token_counts_matmul_parameters():
    cfg = LLaMAConfig.load("tiny")
    params = jax.eval_shape(lambda: LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    d, f, v, l, n, k, h = 64, 128, 512, 2, 4, 2, 16
    matmul = l * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + d * v     # no embedding, no norms
    assert ts.matmul_params(params["params"], cfg) == matmul
    assert ts.flops_per_token(params["params"], cfg, 1024) == 6 * matmul + 6 * l * 1024 * d
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    tied_params = jax.eval_shape(lambda: LLaMAForCausalLM(tied).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    assert ts.matmul_params(tied_params["params"], tied) == matmul               # the embedding does the head's work


def test_metrics_logger_json_lines_and_missing_wandb(tmp_path, monkeypatch):
    from lwm.training import metrics

    cfg = metrics.get_default_config({"output_dir": str(tmp_path), "experiment_id": "run"})
    assert metrics.experiment_id(cfg, "abc") == "run_abc"                 # append_uuid by default
    cfg.append_uuid = False
    log = metrics.MetricsLogger(cfg, {}, run_id=metrics.experiment_id(cfg, "abc"))
    log.log({"step": 3, "loss": np.float32(2.5), "mfu": jnp.asarray(0.25), "dataset_epoch": 1})
    log.close()
    assert metrics.read_metrics(str(tmp_path / "run")) == [
        {"step": 3, "loss": 2.5, "mfu": 0.25, "dataset_epoch": 1}]
    monkeypatch.setitem(sys.modules, "wandb", None)                           # as if not installed
    cfg.use_wandb = True
    with pytest.raises(ImportError, match="use_wandb=True but wandb is not installed"):
        metrics.MetricsLogger(cfg, {}, run_id="run")
    with pytest.raises(KeyError, match="unknown flag logger.project"):
        metrics.get_default_config({"project": "x"})


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(monkeypatch):
    import io

    from tqdm import tqdm

    from lwm.training import metrics

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = metrics.progress(total=10, file=Terminal(), desc="train")
    assert isinstance(bar, tqdm)                              # control: a terminal keeps tqdm's bar
    bar.close()
    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = metrics.progress(total=100, initial=20, file=log, desc="train", unit="step", interval=25.0)
    for t in range(10, 70, 10):                               # one step every 10 s
        now[0] = float(t)
        bar.update(1)
        bar.set_postfix(loss="2.3000")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # Steps at t = 10 .. 60 s: a line at 30 s (25 s after the start) and at 60 s, none again at close.
    assert len(lines) == 2, lines
    assert lines[0] == "train:  23% 23/100 [00:30<12:50, 10.00s/step, loss=2.3000]"
    assert lines[1].startswith("train:  26% 26/100 [01:00<")
    assert list(metrics.progress(range(3), file=io.StringIO())) == [0, 1, 2]


def test_help_flag_prints_every_flag_and_exits_zero(capsys):
    from lwm.train import get_default_config

    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["--total_steps=3", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--total_steps=" in out and "--llama.<field>=value" in out and "--tokenizer=" in out
    assert parse_flags(["--total_steps=3"], get_default_config()).total_steps == 3   # control: no --help


def test_use_data_sharded_loader_is_one_switch():
    """--use_data_sharded_loader decides; the original's per-dataset spelling is accepted when it agrees and
    refused (one line naming both flags) when it says False under True, so the loader and the batch assembly
    never differ."""
    from lwm.training.loop import check_config, data_sharded_loader

    assert data_sharded_loader(parse_flags([])) is True
    assert data_sharded_loader(parse_flags(["--train_dataset.json_dataset.use_data_sharded_loader=True"])) is True
    assert data_sharded_loader(parse_flags(["--use_data_sharded_loader=False"])) is False
    assert data_sharded_loader(parse_flags(["--use_data_sharded_loader=False",
                                            "--eval_dataset.json_dataset.use_data_sharded_loader=False"])) is False
    for section in ("train_dataset.json_dataset", "train_dataset.json_vision_dataset",
                    "eval_dataset.huggingface_dataset"):
        with pytest.raises(FlagError, match=f"--{section}.use_data_sharded_loader=False disagrees with "
                                            "--use_data_sharded_loader=True"):
            check_config(parse_flags([f"--{section}.use_data_sharded_loader=False"]))
