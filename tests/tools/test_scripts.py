"""Every shell script in scripts/ passes flags its entry point accepts (the train scripts are checked, with
their 7B shapes, in test_train.py). Each script runs under bash with `python3` / $PYTHON replaced by a
recorder, so nothing is computed; the recorded argv is parsed by the entry point's own defaults (or argparse),
and the model the flags name is shape-checked with jax.eval_shape (7B included) against the script's mesh."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from lwm.cli.flags import FlagError, model_config_from_flags, parse_flags
from lwm.model.registry import build_model
from lwm.parallel.sharding import check_divisible, check_model_mesh, make_mesh, match_partition_rules

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow          # each case runs a shell script in a subprocess

RECORDER = """#!/bin/sh
n=$(ls "{calls}" | wc -l)
printf '%s\\n' "$@" > "{calls}/call_$(printf %03d "$n")"
"""


def recorded_calls(tmp_path, script: str, **env) -> list[list[str]]:
    """The argv of every python call `script` makes (in order), with python replaced by a recorder."""
    calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
    calls.mkdir()
    bin_dir.mkdir()
    for name in ("python3", "python"):
        (bin_dir / name).write_text(RECORDER.format(calls=calls))
        (bin_dir / name).chmod(0o755)
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"), **env)
    subprocess.run(["bash", str(REPO / "scripts" / script)], env=run_env, check=True, timeout=60,
                   cwd=tmp_path)
    return [path.read_text().splitlines() for path in sorted(calls.iterdir())]


def entry_call(calls: list[list[str]], target: str) -> list[str]:
    """The flags of the call that runs `target` (`lwm.X` run with -m, or a `scripts/X.py` path)."""
    for argv in calls:
        args = [a for a in argv if a != "-u"]
        if args[:2] == ["-m", target] or args[:1] == [target]:
            return args[2:] if args[0] == "-m" else args[1:]
    raise AssertionError(f"no call of {target} among {calls}")


def load_entry(target: str):
    if target.startswith("lwm."):
        return importlib.import_module(target)
    spec = importlib.util.spec_from_file_location(pathlib.Path(target).stem, REPO / target)
    sys.path.insert(0, str(REPO / "scripts"))               # a script may import its sibling
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


def parse_entry_flags(target: str, flags: list[str]):
    module = load_entry(target)
    if hasattr(module, "get_default_config"):
        return parse_flags(flags, module.get_default_config())
    return module.parse_args(flags)                            # argparse entry points (lwm.demo)


def shape_check(config, modality: str, preset: str) -> int:
    """eval_shape of the model the flags name, every parameter matched by a sharding rule and divisible on
    the flags' mesh (8 simulated devices). Returns the parameter count."""
    flags = ConfigDict(dict(modality=modality, load_llama_config=config.load_llama_config,
                            llama=config.get("llama", ConfigDict()), update_llama_config=config.update_llama_config))
    model_config = model_config_from_flags(flags)
    assert config.load_llama_config == preset
    model = build_model(modality, model_config)
    ids = jnp.zeros((1, 8), jnp.int32)
    args = (ids, jnp.zeros((1, 8), bool)) if modality == "vision,text" else (ids,)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"])
    mesh = make_mesh(config.mesh_dim)
    check_model_mesh(model_config, mesh)
    check_divisible(shapes, match_partition_rules(shapes, model_config), mesh)
    return sum(x.size for x in jax.tree.leaves(shapes))


def placeholder_checkpoint(tmp_path) -> str:
    """An empty file standing for the released checkpoint: --load_checkpoint's path must exist when the flags
    are read (lwm.cli.values.check_checkpoint_spec); nothing here loads it."""
    path = tmp_path / "ckpt" / "params"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return str(path)


def needle_env(ckpt: str) -> dict:
    return dict(lwm_text_checkpoint=ckpt, haystack_file="/data/haystack.jsonl")


def vision_7b(ckpt: str) -> dict:
    return dict(llama_config="7b", update_llama_config="dict(theta=50000000,max_sequence_length=32768)",
                mesh_dim="!1,1,-1,1", lwm_checkpoint=ckpt, llama_tokenizer_path="/t/tokenizer.model",
                vqgan_checkpoint="/ckpt/vqgan", vqgan_config="released")


@pytest.mark.parametrize("script, target", [("run_eval_needle.sh", "scripts/eval_needle.py"),
                                            ("run_eval_needle_multi.sh", "scripts/eval_needle_multi.py")])
def test_needle_scripts_flags_and_7b_shapes(tmp_path, script, target):
    ckpt = placeholder_checkpoint(tmp_path)
    module, flags = target, entry_call(recorded_calls(tmp_path, script, **needle_env(ckpt)), target)
    config = parse_entry_flags(module, flags)
    assert config.load_checkpoint == f"params::{ckpt}" and config.haystack_file == "/data/haystack.jsonl"
    n_params = shape_check(config, "text", "7b")
    assert abs(n_params - 6.738e9) < 0.01e9                    # LLaMA-2 7B: 6.74B parameters
    with pytest.raises(FlagError, match="unknown flag --context_length_max"):   # control: a misspelt flag
        parse_entry_flags(module, flags + ["--context_length_max=5"])


@pytest.mark.parametrize("script, target", [("run_sample_image.sh", "lwm.vision_generation"),
                                            ("run_sample_video.sh", "lwm.vision_generation"),
                                            ("run_vision_chat.sh", "lwm.vision_chat")])
def test_vision_scripts_flags_and_shapes(tmp_path, script, target):
    for preset in ("tiny", "7b"):
        (tmp_path / preset).mkdir()
    flags = entry_call(recorded_calls(tmp_path / "tiny", script, output_dir=str(tmp_path / "out")), target)
    shape_check(parse_entry_flags(target, flags), "vision,text", "tiny")      # the default: a tiny model
    ckpt = placeholder_checkpoint(tmp_path)
    env = dict(vision_7b(ckpt), output_dir=str(tmp_path / "out"))
    config = parse_entry_flags(target, entry_call(recorded_calls(tmp_path / "7b", script, **env), target))
    assert config.load_checkpoint == f"params::{ckpt}" and config.vqgan_config == "released"
    n_params = shape_check(config, "vision,text", "7b")
    assert abs(n_params - 6.738e9 - 2 * 8448 * 4096) < 0.01e9  # + the vision embedding and head


def test_demo_script_flags(tmp_path):
    calls = recorded_calls(tmp_path, "run_demo.sh", OUT=str(tmp_path / "out"))
    args = parse_entry_flags("lwm.demo", entry_call(calls, "lwm.demo"))
    assert args.haystack_file == str(tmp_path / "out" / "haystack.jsonl")
    # The haystack step: scripts/create_needle_data.py is given only flags its --help lists.
    names = [a.split("=")[0] for a in entry_call(calls, "scripts/create_needle_data.py") if a.startswith("--")]
    help_text = subprocess.run([sys.executable, str(REPO / "scripts" / "create_needle_data.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert names and all(name in help_text for name in names), (names, help_text)
