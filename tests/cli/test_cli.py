"""The one command-line layer (lwm/cli/): every `python -m lwm.*` command (the modules at lwm/'s top level with a
`__main__` block, and lwm.serve) answers --help with exit 0, and turns each kind of bad flag (an unknown flag,
a bad int, a bad --mesh_dim, a bad --update_llama_config, a missing --load_checkpoint path) into exactly one
line on stderr naming the flag, exit status 2, no traceback. Most cases run the command's `__main__` block in
this process (runpy); a few run as real subprocesses, started together. Also: --update_llama_config reads
dict(...), a Python literal and JSON identically in lwm.train, lwm.convert and lwm.memory; the original's
spellings are aliases; --mesh_dim is one syntax (the planner refuses -1 with its reason)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

from support import run_module

from lwm.cli import values
from lwm.cli.command import parse
from lwm.cli.flags import FlagError, known_flags

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    """lwm.<name> for every lwm/<name>.py with an `if __name__ == "__main__":` block, plus lwm.serve."""
    names = []
    for path in sorted((ROOT / "lwm").glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and getattr(n.test.left, "id", "") ==
               "__name__" for n in tree.body):
            names.append(f"lwm.{path.stem}")
    return names + ["lwm.serve"]


COMMANDS = _commands()
SUBCOMMAND = {"lwm.convert": ["to_hf"], "lwm.tokenizer": ["train"]}   # flags follow the subcommand
BAD_CHECKPOINT = "params::/nowhere/params"


def test_every_command_is_found():
    expected = {"lwm.train", "lwm.convert", "lwm.memory", "lwm.demo", "lwm.text_chat", "lwm.vision_chat",
                "lwm.vision_generation", "lwm.eval_needle", "lwm.eval_needle_multi", "lwm.eval_long",
                "lwm.eval_visual_needle", "lwm.serve", "lwm.tokenizer", "lwm.extend", "lwm.train_vqgan",
                "lwm.vision_demo"}
    assert set(COMMANDS) == expected, set(COMMANDS) ^ expected


def _defaults(name: str):
    module = __import__("lwm.serve.__main__" if name == "lwm.serve" else name, fromlist=["get_default_config"])
    return module.get_default_config()


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name, capsys):
    code, out, err = run_module(name, ["--help"], capsys)
    assert code == 0, err
    assert f"python -m {name}" in out and "flags and defaults:" in out
    defaults = _defaults(name)
    for config in (defaults.values() if isinstance(defaults, dict) else [defaults]):
        for flag in known_flags(config):
            assert f"--{flag}" in out, flag


def _int_flag(config) -> str:
    from lwm.cli.flags import get_flag

    return next((f for f in known_flags(config) if type(get_flag(config, f)) is int), None)   # lwm.extend: none


def _cases():
    """(command, argv, the flag the one line must name) for each kind of bad flag the command has."""
    out = []
    for name in COMMANDS:
        defaults = _defaults(name)
        config = defaults[SUBCOMMAND[name][0]] if isinstance(defaults, dict) else defaults
        pre = SUBCOMMAND.get(name, [])
        flags = set(known_flags(config))
        out.append((name, pre + ["--no_such_flag=1"], "--no_such_flag"))
        if name == "lwm.convert":     # to_hf has no int flag; from_hf does
            out.append((name, ["from_hf", "--param_scan_axis=two"], "--param_scan_axis"))
        elif _int_flag(config):
            flag = _int_flag(config)
            out.append((name, pre + [f"--{flag}=two"], f"--{flag}"))
        if "mesh_dim" in flags:
            out.append((name, pre + ["--mesh_dim=1,2"], "--mesh_dim"))
        if "update_llama_config" in flags:
            out.append((name, pre + ["--update_llama_config=__import__('os').system('true')"],
                        "--update_llama_config"))
        if "load_checkpoint" in flags:
            out.append((name, pre + [f"--load_checkpoint={BAD_CHECKPOINT}"], "--load_checkpoint"))
    return out


CASES = _cases()


def test_each_kind_is_covered():
    kinds = {(name, needle.split("=")[0]) for name, _, needle in CASES}
    for name in COMMANDS:
        assert (name, "--no_such_flag") in kinds
    for name in ("lwm.train", "lwm.memory", "lwm.text_chat", "lwm.serve", "lwm.eval_long"):
        assert (name, "--mesh_dim") in kinds and (name, "--update_llama_config") in kinds
    for name in ("lwm.train", "lwm.convert", "lwm.demo", "lwm.vision_chat", "lwm.eval_needle"):
        assert (name, "--load_checkpoint") in kinds
    assert len(CASES) >= 45


def _assert_one_line(name, code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{name}: error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_bad_flag_is_one_line(case, capsys):
    name, argv, needle = case
    code, _, err = run_module(name, argv, capsys)
    _assert_one_line(name, code, err, needle)


def test_subprocesses():
    """A few commands as real processes (their own interpreter, no pytest capture), started together."""
    runs = [("lwm.train", [f"--load_checkpoint={BAD_CHECKPOINT}"], "--load_checkpoint"),
            ("lwm.memory", ["--mesh_dim=1,-1,1,1"], "--mesh_dim"),
            ("lwm.convert", ["from_hf", "--update_llama_config=dict(theta=x)"], "--update_llama_config"),
            ("lwm.serve", ["--prompt=hi"], "--prompt")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LWM_DEBUG", None)
    procs = [(name, needle, subprocess.Popen([sys.executable, "-m", name, *argv], cwd=ROOT, env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for name, argv, needle in runs]
    help_proc = subprocess.Popen([sys.executable, "-m", "lwm.train", "--help"], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, needle, proc in procs:
        _, err = proc.communicate(timeout=120)
        _assert_one_line(name, proc.returncode, err, needle)
    out, err = help_proc.communicate(timeout=120)
    assert help_proc.returncode == 0 and "--load_checkpoint=''" in out, err


def test_memory_refuses_minus_one_with_the_reason(capsys):
    code, _, err = run_module("lwm.memory", ["--mesh_dim=1,-1,1,1"], capsys)
    _assert_one_line("lwm.memory", code, err, "no devices")
    # Control: the same syntax as every command (named axes, '!') is accepted there.
    code, out, err = run_module("lwm.memory", ["--load_llama_config=tiny", "--seq_len=256", "--mesh_dim=!dp:1,sp:2"],
                                capsys)
    assert code == 0 and "1,1,1,2" not in err and "| 256 | train |" in out, err


@pytest.mark.parametrize("mesh, needle", [("1,1,1,16", "needs 16 devices but 8 are available"),
                                           ("1,1,3,1", "needs 3 devices"),
                                           ("1,1,4,2", "num_key_value_heads=2 is not divisible by tp=4"),
                                           ("!1,1,-1,1", "is not divisible by tp=8"),
                                           ("1,1,1,0", "sizes must be positive"), ("a,b,c,d", "integers")])
def test_mesh_that_does_not_fit_is_one_line(mesh, needle, tok, capsys):
    """Meshes the syntax check passes but the devices or the model's heads (tiny: 4 query, 2 KV) refuse, found
    where the runtime builds the mesh: one line naming --mesh_dim once, no traceback."""
    code, _, err = run_module("lwm.text_chat", ["--load_llama_config=tiny", f"--tokenizer={tok.source}", "--prompt=hi",
                                                f"--mesh_dim={mesh}"], capsys)
    _assert_one_line("lwm.text_chat", code, err, needle)
    assert err.count("--mesh_dim") == 1, err


def test_demo_checks_its_meshes_before_training(tmp_path, capsys):
    haystack = tmp_path / "h.jsonl"
    haystack.write_text('{"text": "a b c"}\n')
    base = [f"--haystack_file={haystack}", f"--workdir={tmp_path / 'w'}"]
    for argv, needle in ((["--eval_mesh_dim=1,2"], "--eval_mesh_dim='1,2'"), (["--devices=0"], "--devices=0")):
        code, _, err = run_module("lwm.demo", base + argv, capsys)
        _assert_one_line("lwm.demo", code, err, needle)
    assert not (tmp_path / "w").exists()                 # refused before any work


SPELLINGS = ["dict(num_hidden_layers=3, theta=50000.0)", "{'num_hidden_layers': 3, 'theta': 50000.0}",
             '{"num_hidden_layers": 3, "theta": 50000.0}']


def test_update_llama_config_spellings_train(monkeypatch):
    from lwm import train
    from lwm.cli.flags import model_config_from_flags

    seen = []
    monkeypatch.setattr(train, "train", lambda config: seen.append(model_config_from_flags(config)) or {})
    for text in SPELLINGS + ["dict(num_hidden_layers=4, theta=50000.0)"]:        # the last: a control
        train.main(["--load_llama_config=tiny", f"--update_llama_config={text}"])
    assert seen[0] == seen[1] == seen[2] and seen[0].num_hidden_layers == 3 and seen[0].theta == 50000.0
    assert seen[3] != seen[0]


def test_update_llama_config_spellings_convert(monkeypatch, tmp_path):
    from lwm import convert
    from lwm.tools import hf_convert

    seen = []
    monkeypatch.setattr(hf_convert, "convert_to_hf", lambda *a, **kw: seen.append(kw["updates"]) or "ok")
    monkeypatch.setattr(hf_convert, "convert_from_hf", lambda *a, **kw: seen.append(kw["updates"]) or "ok")
    (tmp_path / "p").write_text("")
    for text in SPELLINGS:
        convert.main(["to_hf", f"--load_checkpoint=params::{tmp_path / 'p'}", "--llama_config=tiny",
                      f"--output_dir={tmp_path}", f"--update_llama_config={text}"])
        convert.main(["from_hf", f"--hf_dir={tmp_path}", f"--output=params::{tmp_path}/o",
                      f"--config_out={tmp_path}/c.json", f"--update_llama_config={text}"])
    assert seen == [{"num_hidden_layers": 3, "theta": 50000.0}] * 6


def test_update_llama_config_spellings_memory(capsys):
    from lwm import memory

    tables = []
    for text in SPELLINGS + ["dict(num_hidden_layers=4, theta=50000.0)"]:        # the last: a control
        memory.main(["--load_llama_config=tiny", "--seq_len=512", f"--update_llama_config={text}"])
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] == tables[2] and tables[3] != tables[0]


def test_one_parser_per_kind():
    assert values.parse_literal_dict("dict(a=1, b='x')") == values.parse_literal_dict("{'a': 1, 'b': 'x'}") \
        == values.parse_literal_dict('{"a": 1, "b": "x"}') == {"a": 1, "b": "x"}
    for bad in ("__import__('os')", "dict(a=f())", "[1, 2]", "{1: 2}", "dict(**x)"):
        with pytest.raises(FlagError, match="--update_llama_config"):
            values.parse_literal_dict(bad)
    assert values.parse_modality("modality", "vision") == values.parse_modality("modality", "vision,text")
    with pytest.raises(FlagError, match="--modality"):
        values.parse_modality("modality", "audio")
    assert values.mesh_sizes("mesh_dim", "tp:4,sp:2") == (1, 1, 4, 2)
    for bad in ("1,2", "1,-1,-1,1", "0,1,1,1", "xp:2"):
        with pytest.raises(FlagError, match="--mesh_dim"):
            values.parse_mesh_dim("mesh_dim", bad)


def test_original_spellings_are_aliases(tmp_path):
    """--tokenizer.vocab_file and --llama_config name the same flags in every command that has the target."""
    for name in COMMANDS:
        defaults = _defaults(name)
        for config in (defaults.values() if isinstance(defaults, dict) else [defaults]):
            flags = set(known_flags(config))
            for alias, target in values.ALIASES.items():
                if target in flags and alias not in flags:
                    got = parse([f"--{alias}=tiny"] if target != "tokenizer" else [f"--{alias}={tmp_path}"],
                                config.copy_and_resolve_references())
                    assert got[target] in ("tiny", str(tmp_path)), (name, alias)
    with pytest.raises(FlagError, match="unknown flag --tokenizer.vocab_fil"):      # control: not any name
        parse(["--tokenizer.vocab_fil=x"], _defaults("lwm.text_chat"))


def test_serve_modality_vocabulary():
    from lwm.serve.loading import is_vision

    config = parse(["--modality=vision"], _defaults("lwm.serve"))
    assert config.modality == "vision,text" and is_vision(config)
    assert not is_vision(parse(["--modality=text"], _defaults("lwm.serve")))
    with pytest.raises(FlagError, match="--prompt"):
        parse(["--prompt=hi"], _defaults("lwm.serve"))
