"""Every "the one X" sentence in lwm/ and docs/, checked on the source: X has one home, and no second copy or
bypass exists.

Each rule names its home, the other modules allowed to make the same kind of call (with the reason), and a
matcher over the syntax tree (docstrings are skipped: prose may name anything). `test_rule_holds` runs each rule
on the repository and also asserts the scan sees the home (so a rule whose matcher went blind fails);
`test_rule_catches_a_second_copy` is each rule's negative control: a tmp tree holding the home and one
`lwm/second_copy.py` with the rule's `copy` source must be reported. The claims these rules keep name them
(e.g. "the one chat template (tests/test_one_home.py::test_rule_holds[chat_template])").

Claims kept by other tests: the dtype table (tests/utils/test_dtypes.py::test_no_second_table_in_lwm), the
parameter-shape tracer (tests/model/test_param_shapes.py::test_no_other_copy_in_lwm_or_benchmarks), the
causal block rule (tests/attention/test_causal_blocks.py), the explicit prefill/decode mode
(tests/model/test_llama.py::test_cache_mode_is_explicit), the runner and the report of the evals
(tests/evals/test_runner.py::test_one_runner_is_the_only_batching_loop), the tree validator's users
(tests/utils/test_trees.py).
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import shutil
from typing import Callable

import pytest

from support.source import docstring_ids

REPO = pathlib.Path(__file__).resolve().parent.parent


def _with_parents(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node


def _function_of(node: ast.AST) -> str:
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
        node = getattr(node, "parent", None)
    return ""


def sites(root: pathlib.Path, match: Callable[[ast.AST], bool], dirs=("lwm",)) -> list[tuple[str, str, int]]:
    """(path relative to root, enclosing function, line) of every node `match` accepts in root/<dirs>/**/*.py,
    docstrings excluded."""
    out = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            _with_parents(tree)
            skip = docstring_ids(tree)
            for node in ast.walk(tree):
                if id(node) not in skip and match(node):
                    out.append((path.relative_to(root).as_posix(), _function_of(node), node.lineno))
    return out


# ------------------------------------------------------------------------------------------------ matchers

def refers_to(*names: str) -> Callable[[ast.AST], bool]:
    """A name, an attribute or an imported name spelled as one of `names` (a use, not a definition)."""
    names = set(names)

    def match(node):
        if isinstance(node, ast.Name):
            return node.id in names
        if isinstance(node, ast.Attribute):
            return node.attr in names
        if isinstance(node, ast.alias):
            return node.name.split(".")[-1] in names
        return False
    return match


def _strings(*parts: str):
    def match(node):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return False
        if not any(p in node.value for p in parts):
            return False
        parent = getattr(node, "parent", None)          # a console label (stdout.write / print) is no prompt
        if isinstance(parent, ast.Call):
            f = parent.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("write", "print"):
                return False
        return True
    return match


def _is_call_to(node, *names) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) in names


def _sharding_rule(node) -> bool:
    """A (regex string, P(...)) pair: one row of a parameter-sharding table."""
    return (isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant)
            and isinstance(node.elts[0].value, str) and _is_call_to(node.elts[1], "P", "PartitionSpec"))


def _modality_alias(node) -> bool:
    """A dict mapping the alias 'vision' to 'vision,text': a second modality parser."""
    return isinstance(node, ast.Dict) and any(
        isinstance(k, ast.Constant) and k.value == "vision" and isinstance(v, ast.Constant) and v.value == "vision,text"
        for k, v in zip(node.keys, node.values))


def _reads_attr(attr: str):
    def match(node):
        return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.ctx, ast.Load)
    return match


def _checkpoint_reader_import(node) -> bool:
    """An import of lwm.checkpoint.formats (its readers), other than its error class and dtype parser."""
    if isinstance(node, ast.ImportFrom) and node.module == "lwm.checkpoint.formats":
        return any(a.name not in ("CheckpointError", "parse_float_dtype") for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.module == "lwm.checkpoint":
        return any(a.name == "formats" for a in node.names)
    return isinstance(node, ast.Import) and any(a.name == "lwm.checkpoint.formats" for a in node.names)


def _pixel_reading(node) -> bool:
    """Decoding, orienting, resizing or cropping pixels: an image/video decoder imported, or Pillow's
    open / resize / crop / convert / exif_transpose / thumbnail called."""
    decoders = {"av", "decord", "cv2", "imageio", "torchvision"}
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] in decoders for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.module:
        return node.module.split(".")[0] in decoders or any(a.name == "ImageOps" for a in node.names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        if f.attr == "open" and isinstance(f.value, ast.Name) and f.value.id == "Image":
            return True
        return f.attr in ("resize", "crop", "convert", "exif_transpose", "thumbnail") and not (
            isinstance(f.value, ast.Name) and f.value.id in ("jax", "jnp", "np", "image"))  # jax.image.resize
    return False


def _validator_class(node) -> bool:
    """A class named *Validator* that is not lwm.utils.trees.TreeValidator or a subclass of it."""
    if not (isinstance(node, ast.ClassDef) and "Validator" in node.name):
        return False
    bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
    return "TreeValidator" not in bases


def _task_registry(node) -> bool:
    """A module-level dict named like a task registry (TASKS, *_TASKS, *REGISTRY)."""
    if not isinstance(node, (ast.Assign, ast.AnnAssign)) or not isinstance(getattr(node, "parent", None), ast.Module):
        return False
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    named = any(isinstance(t, ast.Name) and (t.id.endswith("TASKS") or t.id.endswith("REGISTRY")) for t in targets)
    return named and isinstance(node.value, (ast.Dict, ast.Call))


def _global_random(node) -> bool:
    """A draw from the global RNG: random.<fn>(...) other than random.Random(seed), or np.random.<fn>(...)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    v = node.func.value
    if isinstance(v, ast.Name) and v.id == "random":
        return node.func.attr != "Random"
    return isinstance(v, ast.Attribute) and v.attr == "random" and node.func.attr != "default_rng"


def _flag_parser(node) -> bool:
    """A command-line parser built outside lwm.cli: argparse.ArgumentParser, absl flags, click."""
    if _is_call_to(node, "ArgumentParser", "DEFINE_string", "DEFINE_integer", "DEFINE_bool", "DEFINE_float"):
        return True
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] in ("click", "absl", "typer") for a in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("click", "absl", "typer")


ATTENTION_KERNELS = {"dense", "blockwise", "pallas_gpu", "pallas_tpu", "pallas_common", "pallas_shared", "ring",
                     "all_gather", "ulysses", "context_parallel"}


def _attention_kernel_import(node) -> bool:
    """An import of a kernel module (lwm.attention.<kernel>, or decode's attention functions) rather than the
    package's one dispatch (`attention`, `cached_attention`). layout (the token-order boundary), causal_blocks
    and decode's cache writer are no kernels."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module.startswith("lwm.attention."):
            sub = node.module.split(".")[2]
            return sub in ATTENTION_KERNELS or (sub == "decode" and any("attention" in a.name for a in node.names))
        if node.module == "lwm.attention":
            return any(a.name in ATTENTION_KERNELS | {"decode"} for a in node.names)
    return isinstance(node, ast.Import) and any(
        a.name.startswith("lwm.attention.") and a.name.split(".")[2] in ATTENTION_KERNELS | {"decode"}
        for a in node.names)


# ------------------------------------------------------------------------------------------------ rules

@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    home: str                                  # the one module that holds X
    match: Callable[[ast.AST], bool]
    copy: str                                  # source of a second copy the rule must catch
    allowed: dict = dataclasses.field(default_factory=dict)   # path, path prefix/ or path::function -> why
    dirs: tuple = ("lwm",)
    include_home: bool = True                 # the home itself is found by the matcher (scan not blind)

    def outside(self, found):
        def ok(path, func):
            if path == self.home or f"{path}::{func}" in self.allowed or path in self.allowed:
                return True
            return any(k.endswith("/") and path.startswith(k) for k in self.allowed)
        return [f"{p}:{line} ({func or 'module'})" for p, func, line in found if not ok(p, func)]


RULES = [
    Rule("chat_template", "lwm/text/chat_template.py", _strings("USER:", "ASSISTANT:"),
         'def prompt(q):\n    return f"You are a helpful assistant. USER: {q} ASSISTANT:"\n',
         dirs=("lwm", "benchmarks")),
    Rule("sharding_table", "lwm/parallel/sharding.py", _sharding_rule,
         'from jax.sharding import PartitionSpec as P\nRULES = ((r"wq/kernel$", P("fsdp", "tp")),)\n',
         dirs=("lwm", "benchmarks")),
    Rule("logical_axes", "lwm/parallel/sharding.py",
         lambda n: isinstance(n, ast.Dict) and {"batch", "seq"} <= {k.value for k in n.keys
                                                                    if isinstance(k, ast.Constant)},
         'AXES = {"batch": ("dp", "fsdp"), "seq": "sp", "heads": "tp"}\n', dirs=("lwm", "benchmarks")),
    Rule("train_step_shardings", "lwm/training/compile.py", refers_to("train_step", "eval_step", "init_train_state"),
         "import jax\nfrom lwm.training.steps import train_step\nstep = jax.jit(train_step, in_shardings=None)\n",
         allowed={"lwm/training/steps.py": "defines them"}),
    Rule("loss_fn", "lwm/training/steps.py",
         lambda n: isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in ("loss_fn", "eval_loss"),
         "import jax\ndef loss_fn(params, batch):\n    return jax.numpy.mean(batch['loss'])\n"),
    Rule("engine", "lwm/inference/engine.py", refers_to("init_cache", "CacheMode"),
         "from lwm.model.llama import init_cache\ncache = init_cache(cfg, 1, 16)\n",
         allowed={"lwm/model/": "defines the cache and the mode the engine drives"},
         dirs=("lwm", "benchmarks")),
    Rule("read_back", "lwm/parallel/multihost.py", refers_to("process_allgather", "addressable_data"),
         "import numpy as np\nfrom jax.experimental import multihost_utils\n"
         "def host(x):\n    return np.asarray(multihost_utils.process_allgather(x))\n",
         dirs=("lwm", "benchmarks")),
    Rule("model_loader", "lwm/inference/loader.py", _checkpoint_reader_import,
         "from lwm.checkpoint.formats import load_checkpoint\nparams = load_checkpoint('params::x')\n",
         allowed={"lwm/checkpoint/": "the formats themselves",
                  "lwm/training/loop.py": "training resumes a train state (not an inference model)",
                  "lwm/tools/hf_convert.py": "conversion reads a checkpoint to export it"}),
    Rule("runtime_setup", "lwm/inference/runtime.py", refers_to("make_mesh", "initialize"),
         "from lwm.parallel.sharding import make_mesh\nmesh = make_mesh('1,-1,1,1')\n",
         allowed={"lwm/parallel/": "defines them",
                  "lwm/training/loop.py": "training's own set-up (lwm.train)",
                  "lwm/tools/memory_planner.py": "meshes of a plan's shape, no distributed start"}),
    Rule("data_sharded_loader_switch", "lwm/training/loop.py", _reads_attr("use_data_sharded_loader"),
         "def per_process(config):\n    return config.train_dataset.json_dataset.use_data_sharded_loader\n"),
    Rule("modality_parser", "lwm/cli/values.py", _modality_alias,
         'ALIASES = {"vision": "vision,text"}\n'),
    Rule("pixel_reading", "lwm/utils/vision_io.py", _pixel_reading,
         "from PIL import Image\nimport numpy as np\n"
         "def load(p):\n    return np.asarray(Image.open(p).convert('RGB').resize((256, 256)))\n",
         allowed={"lwm/serve/media.py::_image_format": "Image.open(...).verify(): the format name, no pixels"}),
    Rule("tree_validator", "lwm/utils/trees.py", _validator_class,
         "class ParamValidator:\n    def check(self, key, shape):\n        pass\n"),
    Rule("task_registry", "lwm/evals/runner.py", _task_registry,
         "MY_TASKS = {}\ndef register(t):\n    MY_TASKS[t.name] = t\n"),
    Rule("flag_parser", "lwm/cli/command.py", _flag_parser,
         "import argparse\np = argparse.ArgumentParser()\np.add_argument('--x')\n",
         allowed={"lwm/cli/": "the command-line layer"}, include_home=False),
    Rule("attention_dispatch", "lwm/attention/__init__.py", _attention_kernel_import,
         "from lwm.attention.ring import ring_attention\n",
         allowed={"lwm/attention/": "the kernels and their dispatch"}),
]
RULE_IDS = [r.name for r in RULES]


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_rule_holds(rule):
    found = sites(REPO, rule.match, rule.dirs)
    if rule.include_home:
        assert any(p == rule.home for p, _, _ in found), f"{rule.name}: the scan no longer sees {rule.home}"
    else:
        assert (REPO / rule.home).exists()
    assert rule.outside(found) == [], f"{rule.name}: a second home of what {rule.home} holds"


@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_rule_catches_a_second_copy(rule, tmp_path):
    """Negative control: the home plus one module holding a second copy; the copy (and only it) is reported."""
    for rel in {rule.home} | {k for k in rule.allowed if k.endswith(".py") and "::" not in k}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    (tmp_path / "lwm" / "second_copy.py").write_text(rule.copy)
    bad = rule.outside(sites(tmp_path, rule.match, ("lwm",)))
    assert bad and all(b.startswith("lwm/second_copy.py:") for b in bad), bad


# ------------------------------------------------------------------------------------------------ other checks

def _main_guard(tree: ast.Module):
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return node
    return None


def entry_points_without_cli(root: pathlib.Path) -> list[str]:
    """Every `python -m lwm.X` module (an `if __name__ == "__main__":` block) must import lwm.cli.command and
    call `cli` (its own or lwm.cli.command's) in that block: one --help, one error policy."""
    out = []
    for path in sorted((root / "lwm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guard = _main_guard(tree)
        if guard is None:
            continue
        imports_command = any(
            isinstance(n, ast.ImportFrom) and (n.module == "lwm.cli.command" or (
                n.module == "lwm.cli" and any(a.name == "command" for a in n.names)))
            for n in ast.walk(tree))
        calls_cli = any(_is_call_to(n, "cli") for n in ast.walk(guard))
        if not (imports_command and calls_cli):
            out.append(path.relative_to(root).as_posix())
    return out


def test_every_entry_point_goes_through_the_one_command_line_layer(tmp_path):
    assert entry_points_without_cli(REPO) == []
    n = sum(_main_guard(ast.parse(p.read_text())) is not None for p in (REPO / "lwm").rglob("*.py"))
    assert n >= 12, n                                             # the scan sees the entry points
    (tmp_path / "lwm").mkdir()                                     # negative control: an argparse entry point
    (tmp_path / "lwm" / "tool.py").write_text(
        "import argparse\nif __name__ == '__main__':\n    argparse.ArgumentParser().parse_args()\n")
    (tmp_path / "lwm" / "ok.py").write_text(
        "import sys\nfrom lwm.cli.command import cli\nif __name__ == '__main__':\n    sys.exit(cli('x', None, None))\n")
    assert entry_points_without_cli(tmp_path) == ["lwm/tool.py"]


KERNELS = ("blockwise.py", "pallas_gpu.py", "pallas_tpu.py", "ring.py")


def kernels_without_causal_blocks(attention_dir: pathlib.Path) -> list[str]:
    """The causal-skipping kernels that do not import lwm.attention.causal_blocks (the one causal block rule)."""
    out = []
    for name in KERNELS:
        tree = ast.parse((attention_dir / name).read_text())
        if not any((isinstance(n, ast.ImportFrom) and (n.module == "lwm.attention.causal_blocks" or (
                n.module == "lwm.attention" and any(a.name == "causal_blocks" for a in n.names))))
                or (isinstance(n, ast.Import) and any(a.name == "lwm.attention.causal_blocks" for a in n.names))
                for n in ast.walk(tree)):
            out.append(name)
    return out


def test_kernels_use_the_one_causal_block_rule(tmp_path):
    assert kernels_without_causal_blocks(REPO / "lwm" / "attention") == []
    for name in KERNELS:                               # negative control: a ring.py with its own rule
        text = (REPO / "lwm" / "attention" / name).read_text()
        if name == "ring.py":
            text = "from lwm.attention.blockwise import pad_to\n\ndef visible(q, k):\n    return k <= q\n"
        (tmp_path / name).write_text(text)
    assert kernels_without_causal_blocks(tmp_path) == ["ring.py"]


def test_vocab_draws_only_from_the_callers_rng():
    """lwm/evals/vocab.py: every draw goes through the caller's random.Random (no global RNG)."""
    tree = ast.parse((REPO / "lwm" / "evals" / "vocab.py").read_text())
    assert [n.lineno for n in ast.walk(tree) if _global_random(n)] == []
    copy = "import random\nimport numpy as np\ndef word():\n    return random.choice(WORDS) + str(np.random.rand())\n"
    assert len([n for n in ast.walk(ast.parse(copy)) if _global_random(n)]) == 2          # negative control


def test_adamw_is_the_only_optimizer():
    """docs/train.md: `--optimizer.type=adamw` (the only one); any other type is a one-line error."""
    from lwm.training.optimizer import make_optimizer

    make_optimizer({"type": "adamw"})
    with pytest.raises(ValueError, match=r"^--optimizer.type='sgd': only 'adamw' is supported$"):
        make_optimizer({"type": "sgd"})
