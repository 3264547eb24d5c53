"""The layers of lwm/ and the rules between them, read from the source.

Layers, lowest first (a module may import its own layer or a lower one, never a higher one):
  foundation    lwm.utils, lwm.parallel (mesh axes, specs, multi-host arrays), lwm.text (tokenizer, chat template),
                lwm.data (synthetic data worlds)
  kernels       lwm.attention
  model         lwm.model
  formats       lwm.checkpoint (checkpoint formats, Hugging Face tensors), lwm.cli (the one command-line layer)
  engines       lwm.training, lwm.inference
  applications  lwm.evals, lwm.serve, lwm.tools
  entry points  every module with an `if __name__ == "__main__":` block (the `python -m lwm.X` commands and
                lwm.serve.__main__) and every script in scripts/
A library module in no listed package is itself a violation: every module has a layer.

The graph is every `import` / `from ... import`, at module level or inside a function, so a lazy import
counts like any other. Rules checked on lwm/, scripts/ and tests/:
  1. no module imports one from a higher layer ("upward import");
  2. the "never" rules (NEVER below), which hold within a layer as across layers: the model and the kernels
     import neither training nor inference; training never imports inference, serving or evals; inference
     never imports training; serving and evals never import training, and neither imports the other;
  3. no module imports an entry point, so no entry point imports another. The one exception is a wrapper
     script: a file in scripts/ whose body is only its docstring, imports and the `__main__` block, and which
     imports `main` from exactly one lwm entry point (the original's command lines over `python -m lwm.X`);
  4. no import cycle among lwm modules;
  5. no lwm module runs a file from scripts/ (a "scripts/....py" string outside a docstring);
  6. no test file (tests/**/test_*.py) imports another test file: shared fixtures live in conftest.py files,
     shared helpers in modules that are not test files.
`test_every_rule_catches_a_violation` is the negative control: a small tree that breaks each rule once.
docs/architecture.md draws this graph; `python tests/test_layers.py` prints the edges it was drawn from.
"""
from __future__ import annotations

import ast
import pathlib
import sys

from support.source import docstring_ids

REPO = pathlib.Path(__file__).resolve().parent.parent

# Lower index = lower layer. Each member is a package (everything under it) or a module.
LAYERS = (
    ("foundation", {"lwm", "lwm.utils", "lwm.parallel", "lwm.text", "lwm.data"}),
    ("kernels", {"lwm.attention"}),
    ("model", {"lwm.model"}),
    ("formats", {"lwm.checkpoint", "lwm.cli"}),
    ("engines", {"lwm.training", "lwm.inference"}),
    ("applications", {"lwm.evals", "lwm.serve", "lwm.tools"}),
    ("entry points", set()),                              # modules with a __main__ block, scripts/*.py
)
LAYER_NAMES = [name for name, _ in LAYERS]

# (importer package, packages it must never import, why): checked before the layer order, at any layer.
NEVER = (
    ("lwm.attention", ("lwm.training", "lwm.inference"), "the kernels know nothing of training or inference"),
    ("lwm.model", ("lwm.training", "lwm.inference"), "the model knows nothing of training or inference"),
    ("lwm.training", ("lwm.inference", "lwm.serve", "lwm.evals"),
     "training never imports inference, serving or evals"),
    ("lwm.inference", ("lwm.training",), "inference never imports training"),
    ("lwm.serve", ("lwm.training", "lwm.evals"), "serving never imports training or evals"),
    ("lwm.evals", ("lwm.training", "lwm.serve"), "evals never import training or serving"),
)


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def never_rule(importer: str, imported: str):
    """The reason of the NEVER rule that `importer imports imported` breaks, or None."""
    for package, banned, why in NEVER:
        if _under(importer, package) and any(_under(imported, b) for b in banned):
            return why
    return None


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def wrapped_entry(name: str, tree: ast.Module) -> str | None:
    """The lwm entry point a wrapper script stands for (see rule 2), or None when `name` is no wrapper."""
    if not name.startswith("scripts."):
        return None
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if not body or not all(isinstance(n, (ast.Import, ast.ImportFrom)) or _is_main_guard(n) for n in body):
        return None
    targets = {n.module for n in body if isinstance(n, ast.ImportFrom) and n.module
               and n.module.startswith("lwm") and "main" in {a.name for a in n.names}}
    return targets.pop() if len(targets) == 1 else None


def read_graph(root: pathlib.Path):
    """-> (modules {name: path}, edges {(importer, imported): line}, entry points, script references,
    wrappers {script: the lwm entry point it wraps})."""
    files = sorted((root / "lwm").rglob("*.py")) + sorted((root / "scripts").glob("*.py"))
    modules = {module_name(root, f): f for f in files}
    edges, entries, script_refs, wrappers = {}, set(), [], {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if wrapped_entry(name, tree):
            wrappers[name] = wrapped_entry(name, tree)
        if name.startswith("scripts.") or any(_is_main_guard(n) for n in tree.body):
            entries.add(name)
        docstrings = docstring_ids(tree)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from lwm.attention import ring` names the submodule when there is one, else the package.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            if name.startswith("scripts."):      # a script's bare `import eval_needle` is its sibling script
                targets = [f"scripts.{t}" if f"scripts.{t.split('.')[0]}" in modules else t for t in targets]
            for target in targets:
                if target.split(".")[0] in ("lwm", "scripts") and target != name:
                    edges.setdefault((name, target), node.lineno)
            if (name.startswith("lwm") and isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings and "scripts/" in node.value and ".py" in node.value):
                script_refs.append((name, node.lineno, node.value))
    return modules, edges, entries, script_refs, wrappers




def layer_of(name: str, entries: set[str]):
    """The layer index of a module, or None for a library module in no listed package."""
    if name in entries:
        return LAYER_NAMES.index("entry points")
    for i, (_, members) in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "lwm"):
            return i
    return None


def _cycles(nodes, edges) -> list[list[str]]:
    graph = {n: sorted(b for a, b in edges if a == n and b in nodes) for n in nodes}
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(nodes):
        if n not in state:
            visit(n)
    return found




def imports_between_tests(root: pathlib.Path) -> list[str]:
    """Rule 6: one line per import of a test file (tests/**/test_*.py) by another test file."""
    tests = sorted((root / "tests").rglob("test_*.py"))
    names = {p.stem for p in tests}
    out = []
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = ([node.module] if node.module else []) + [a.name for a in node.names if node.level]
            for target in targets:
                stem = target.split(".")[-1]
                if stem in names and stem != path.stem:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: {path.stem} imports {target}: "
                               "a test file imports another test file")
    return out


def violations(root: pathlib.Path) -> list[str]:
    modules, edges, entries, script_refs, wrappers = read_graph(root)
    out = []
    for name in sorted(modules):
        if name.startswith("lwm") and layer_of(name, entries) is None:
            out.append(f"{modules[name].relative_to(root)}: {name} is in no layer (add its package to LAYERS)")
    for (a, b), line in sorted(edges.items()):
        where = f"{modules[a].relative_to(root)}:{line}"
        if b not in modules:
            continue                                  # e.g. `import lwm` names the package's __init__ too
        if b in entries and wrappers.get(a) == b:
            continue                                  # a wrapper script over the entry point it names
        la, lb = layer_of(a, entries), layer_of(b, entries)
        why = never_rule(a, b)
        if b in entries:
            kind = "an entry point imports another entry point" if a in entries else "a library imports an entry point"
            out.append(f"{where}: {a} imports {b}: {kind}")
        elif why:
            out.append(f"{where}: {a} imports {b}: never ({why})")
        elif la is not None and lb is not None and lb > la:
            out.append(f"{where}: {a} ({LAYER_NAMES[la]}) imports {b} ({LAYER_NAMES[lb]}): upward import")
    lwm_modules = {m for m in modules if m.startswith("lwm")}
    for cycle in _cycles(lwm_modules, edges):
        out.append("import cycle: " + " -> ".join(cycle))
    for name, line, text in script_refs:
        out.append(f"{modules[name].relative_to(root)}:{line}: {name} runs a file from scripts/ ({text!r})")
    if (root / "tests").is_dir():
        out += imports_between_tests(root)
    return out


def test_imports_flow_one_way():
    found = violations(REPO)
    assert not found, "imports that break the layering (see docs/architecture.md):\n" + "\n".join(found)


def test_every_rule_catches_a_violation(tmp_path):
    """Negative control: a small tree that breaks each rule once (and the Pallas cycle as it once was), beside
    imports that every rule permits."""
    files = {
        "lwm/__init__.py": "",
        "lwm/model/__init__.py": "",
        "lwm/model/llama.py": "from lwm.training.steps import loss_fn\n",              # never: model -> training
        "lwm/model/vqgan.py": "from lwm.checkpoint.formats import load\n",              # upward: model -> formats
        "lwm/checkpoint/__init__.py": "",
        "lwm/checkpoint/formats.py": "from lwm.model.llama import LLaMAConfig\n",       # downward: fine
        "lwm/training/__init__.py": "",
        "lwm/training/steps.py": "import numpy\n",
        "lwm/training/loop.py": "def f():\n    from lwm.inference.engine import Engine\n",   # never, lazily
        "lwm/inference/__init__.py": "",
        "lwm/inference/engine.py": "from lwm.model import llama\n",
        "lwm/inference/loader.py": "from lwm.training import steps\n",                  # never: same layer
        "lwm/serve/__init__.py": "",
        "lwm/serve/app.py": "from lwm.inference.engine import Engine\nfrom lwm.training.steps import x\n",
        "lwm/evals/__init__.py": "",
        "lwm/evals/runner.py": "import lwm.serve.app\n",                               # never: evals -> serve
        "lwm/tools/__init__.py": "",
        "lwm/tools/planner.py": "from lwm.training.steps import loss_fn\n",             # tools -> training: fine
        "lwm/parallel/__init__.py": "",
        "lwm/parallel/multihost.py": "from lwm.training.steps import x\n",              # upward
        "lwm/stray.py": "X = 1\n",                                                     # in no layer
        "lwm/cli/__init__.py": "def f():\n    from lwm.train import main\n",             # library -> entry point
        "lwm/train.py": "import lwm.training.steps\nif __name__ == '__main__':\n    pass\n",
        "lwm/chat.py": "from lwm.train import parse_flags\nif __name__ == '__main__':\n    pass\n",
        "lwm/demo.py": ('"""Runs scripts/eval.py (a docstring: fine)."""\nCMD = ["python", "scripts/eval.py"]\n'
                        "if __name__ == '__main__':\n    pass\n"),
        "lwm/attention/__init__.py": "",
        "lwm/attention/pallas_common.py": "def k():\n    from lwm.attention import pallas_gpu\n",
        "lwm/attention/pallas_gpu.py": "from lwm.attention.pallas_common import check_inputs\n",
        "lwm/attention/ring.py": "from lwm.inference import engine\n",                  # never: kernels -> inference
        "scripts/eval.py": "from lwm.train import parse_flags\n",
        "scripts/eval_multi.py": "import eval\n",
        # a wrapper over one entry point is fine; one that also does work of its own is not
        "scripts/train_wrapper.py": '"""Wraps lwm.train."""\nfrom lwm.train import main\nif __name__ == "__main__":\n    main()\n',
        "scripts/chat_wrapper.py": "from lwm.chat import main\nX = 1\nif __name__ == '__main__':\n    main()\n",
        "tests/conftest.py": "import support\n",
        "tests/support.py": "X = 1\n",
        "tests/model/test_llama.py": "from support import X\nfrom conftest import Y\n",     # helpers: fine
        "tests/model/test_vqgan.py": "from test_llama import tiny\n",                     # a test imports a test
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = "\n".join(violations(tmp_path))
    expected = [
        "lwm.model.llama imports lwm.training.steps: never (the model knows nothing of training or inference)",
        "lwm.model.vqgan (model) imports lwm.checkpoint.formats (formats): upward import",
        "lwm.training.loop imports lwm.inference.engine: never (training never imports inference, serving or evals)",
        "lwm.inference.loader imports lwm.training.steps: never (inference never imports training)",
        "lwm.serve.app imports lwm.training.steps: never (serving never imports training or evals)",
        "lwm.evals.runner imports lwm.serve.app: never (evals never import training or serving)",
        "lwm.attention.ring imports lwm.inference.engine: never (the kernels know nothing of training or inference)",
        "lwm.parallel.multihost (foundation) imports lwm.training.steps (engines): upward import",
        "lwm.stray is in no layer",
        "lwm.cli imports lwm.train: a library imports an entry point",
        "lwm.chat imports lwm.train: an entry point imports another entry point",
        "scripts.eval imports lwm.train: an entry point imports another entry point",
        "scripts.eval_multi imports scripts.eval: an entry point imports another entry point",
        "scripts.chat_wrapper imports lwm.chat: an entry point imports another entry point",
        "import cycle: lwm.attention.pallas_common -> lwm.attention.pallas_gpu -> lwm.attention.pallas_common",
        "lwm.demo runs a file from scripts/ ('scripts/eval.py')",
        "test_vqgan imports test_llama: a test file imports another test file",
    ]
    for line in expected:
        assert line in found, f"not detected: {line}\n--- found:\n{found}"
    for fine in ("lwm.checkpoint.formats imports", "lwm.tools.planner imports", "lwm.train imports",
                 "lwm.inference.engine imports", "scripts.train_wrapper", "test_llama imports"):
        assert fine not in found, f"flagged a permitted import: {fine}\n{found}"
    assert len(found.splitlines()) == len(expected), found


if __name__ == "__main__":
    modules, edges, entries, _, _ = read_graph(REPO)
    layer_name = lambda i: "none" if i is None else LAYER_NAMES[i]
    for (a, b) in sorted(edges):
        if b in modules:
            print(f"{layer_name(layer_of(a, entries)):>12}  {a:35} -> {b} ({layer_name(layer_of(b, entries))})")
    print("\n".join(violations(REPO)) or "no violations", file=sys.stderr)
