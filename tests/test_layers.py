"""Imports flow one way: utilities <- kernels <- model <- engines (training, inference) <- entry points.

The graph is read from the source (every `import` / `from ... import`, at module level or inside a
function), so a lazy import counts like any other. Rules checked on lwm/ and scripts/:
  1. no module imports one from a higher layer (LAYERS below; a module not listed is an engine);
  2. no module imports an entry point (a module with an `if __name__ == "__main__":` block, or a script),
     so in particular no entry point imports another. The one exception is a wrapper script: a file in
     scripts/ whose body is only its docstring, imports and the `__main__` block, and which imports `main`
     from exactly one lwm entry point (the original's command lines, kept working over `python -m lwm.X`);
  3. no import cycle among lwm modules;
  4. no lwm module runs a file from scripts/ (a "scripts/....py" string outside a docstring).
docs/architecture.md draws this graph; `python tests/test_layers.py` prints the edges it was drawn from.
"""
from __future__ import annotations

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

# Lower index = lower layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = (
    # lwm.parallel.sharding is the vocabulary of mesh axes and specs that the kernels (the ring) ask for.
    ("utilities", {"lwm", "lwm.utils.config_dict", "lwm.utils.safe_pickle", "lwm.parallel.distributed", "lwm.training.metrics",
                   "lwm.text.chat_template", "lwm.parallel.sharding"}),
    ("kernels", {"lwm.attention"}),                       # the package and everything under it
    ("model", {"lwm.model.llama", "lwm.model.vision_llama", "lwm.model.vqgan", "lwm.model.loss", "lwm.model.registry"}),
    ("engines", set()),                                   # every other library module
    ("entry points", set()),                              # modules with a __main__ block, scripts/*.py
)
LAYER_NAMES = [name for name, _ in LAYERS]


def module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


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
        docstrings = _docstring_nodes(tree)
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


def layer_of(name: str, entries: set[str]) -> int:
    if name in entries:
        return LAYER_NAMES.index("entry points")
    for i, (_, members) in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "lwm"):
            return i
    return LAYER_NAMES.index("engines")


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


def violations(root: pathlib.Path) -> list[str]:
    modules, edges, entries, script_refs, wrappers = read_graph(root)
    out = []
    for (a, b), line in sorted(edges.items()):
        where = f"{modules[a].relative_to(root)}:{line}"
        if b not in modules:
            continue                                  # e.g. `import lwm` names the package's __init__ too
        la, lb = layer_of(a, entries), layer_of(b, entries)
        if b in entries and wrappers.get(a) == b:
            continue                                  # a wrapper script over the entry point it names
        if b in entries:
            kind = "an entry point imports another entry point" if a in entries else "a library imports an entry point"
            out.append(f"{where}: {a} imports {b}: {kind}")
        elif lb > la:
            out.append(f"{where}: {a} ({LAYER_NAMES[la]}) imports {b} ({LAYER_NAMES[lb]}): upward import")
    lwm_modules = {m for m in modules if m.startswith("lwm")}
    for cycle in _cycles(lwm_modules, edges):
        out.append("import cycle: " + " -> ".join(cycle))
    for name, line, text in script_refs:
        out.append(f"{modules[name].relative_to(root)}:{line}: {name} runs a file from scripts/ ({text!r})")
    return out


def test_imports_flow_one_way():
    found = violations(REPO)
    assert not found, "imports that break the layering (see docs/architecture.md):\n" + "\n".join(found)


def test_every_rule_catches_a_violation(tmp_path):
    """Negative control: a small tree with one violation of each rule, and the Pallas cycle as it was."""
    files = {
        "lwm/__init__.py": "",
        "lwm/model/llama.py": "from lwm.training.steps import loss_fn\n",                 # model -> engine
        "lwm/training/steps.py": "from lwm.model.llama import LLaMAConfig\n",
        "lwm/cli/flags.py": "def f():\n    from lwm.train import main\n",          # library -> entry point
        "lwm/train.py": "import lwm.training.steps\nif __name__ == '__main__':\n    pass\n",
        "lwm/chat.py": "from lwm.train import parse_flags\nif __name__ == '__main__':\n    pass\n",
        "lwm/demo.py": '"""Runs scripts/eval.py (a docstring: fine)."""\nCMD = ["python", "scripts/eval.py"]\n',
        "lwm/attention/__init__.py": "",
        "lwm/attention/pallas_common.py": "def k():\n    from lwm.attention import pallas_gpu\n",
        "lwm/attention/pallas_gpu.py": "from lwm.attention.pallas_common import check_inputs\n",
        "scripts/eval.py": "from lwm.train import parse_flags\n",
        "scripts/eval_multi.py": "import eval\n",
        # a wrapper over one entry point is fine; one that also does work of its own is not
        "scripts/train_wrapper.py": '"""Wraps lwm.train."""\nfrom lwm.train import main\nif __name__ == "__main__":\n    main()\n',
        "scripts/chat_wrapper.py": "from lwm.chat import main\nX = 1\nif __name__ == '__main__':\n    main()\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = "\n".join(violations(tmp_path))
    expected = [
        "lwm.model.llama (model) imports lwm.training.steps (engines): upward import",
        "lwm.cli.flags imports lwm.train: a library imports an entry point",
        "lwm.chat imports lwm.train: an entry point imports another entry point",
        "scripts.eval imports lwm.train: an entry point imports another entry point",
        "scripts.eval_multi imports scripts.eval: an entry point imports another entry point",
        "scripts.chat_wrapper imports lwm.chat: an entry point imports another entry point",
        "import cycle: lwm.attention.pallas_common -> lwm.attention.pallas_gpu -> lwm.attention.pallas_common",
        "import cycle: lwm.training.steps -> lwm.model.llama -> lwm.training.steps",
        "lwm.demo runs a file from scripts/ ('scripts/eval.py')",
    ]
    for line in expected:
        assert line in found, f"not detected: {line}\n--- found:\n{found}"
    assert "lwm.train (entry points) imports lwm.training.steps" not in found          # downward imports are fine
    assert len(found.splitlines()) == len(expected), found


if __name__ == "__main__":
    modules, edges, entries, _, _ = read_graph(REPO)
    for (a, b) in sorted(edges):
        if b in modules:
            print(f"{LAYER_NAMES[layer_of(a, entries)]:>12}  {a:35} -> {b} ({LAYER_NAMES[layer_of(b, entries)]})")
    print("\n".join(violations(REPO)) or "no violations", file=sys.stderr)
