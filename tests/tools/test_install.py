"""A complete install: the declared runtime dependencies are exactly what lwm/ and scripts/ import, and a
wheel installed (not editable) into a fresh virtual environment gives working entry points and video I/O."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# Imported only by optional features, each behind a clear error, and declared in the extra of that name.
OPTIONAL = {"torch": "torch", "wandb": "wandb"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _canon(re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0])


def _third_party_imports() -> dict[str, str]:
    """{top-level module: first file importing it} for lwm/ and scripts/, stdlib and lwm excluded."""
    found = {}
    scripts = {path.stem for path in REPO.glob("scripts/*.py")}     # a script may import its sibling
    for path in sorted(REPO.glob("lwm/**/*.py")) + sorted(REPO.glob("scripts/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"lwm", "__future__", *scripts}:
                    found.setdefault(top, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_declared_dependencies_are_what_the_code_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()
    imported = {}
    for module, where in _third_party_imports().items():
        names = {_canon(d) for d in dists.get(module, [module])}
        imported[module] = (names, where)
    problems = []
    for module, (names, where) in sorted(imported.items()):
        if module in OPTIONAL:
            if not names & extras.get(OPTIONAL[module], set()):
                problems.append(f"{where}: imports {module}, not in the [{OPTIONAL[module]}] extra")
        elif not names & runtime:
            problems.append(f"{where}: imports {module} ({', '.join(sorted(names))}), not a runtime dependency")
    used = set().union(*(names for names, _ in imported.values()))
    for dist in sorted(runtime - used):
        problems.append(f"pyproject.toml: runtime dependency {dist} is imported nowhere in lwm/ or scripts/")
    assert not problems, "\n".join(problems)


def _entry_modules(package_dir: pathlib.Path) -> list[str]:
    """lwm modules with a `if __name__ == "__main__":` block, read from the installed package."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) for n in tree.body):
            rel = path.relative_to(package_dir.parent).with_suffix("")
            out.append(".".join(rel.parts))
    return out


VIDEO_CHECK = """
import numpy as np, lwm, lwm.utils.vision_io as io
frames = np.zeros((3, 32, 32, 3), np.uint8)
frames[:, :, :16] = 255                    # left half white, right half black
frames[1, :16] = 128                       # the middle frame differs
io.write_video("clip.mp4", frames, fps=4)
back = io.load_frames("clip.mp4", size=32, max_n_frames=3)     # model range [-1, 1]
assert back.shape == (3, 32, 32, 3), back.shape
back = (back + 1) * 127.5
assert np.abs(back - frames).mean() < 12, np.abs(back - frames).mean()
assert np.abs(back[1] - frames[0]).mean() > 20          # frames keep their order: the middle one differs
print("video ok", lwm.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_working_entry_points(tmp_path):
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for rel in tracked:                                   # build from a clean copy: no build/ in the checkout
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist,
                    src], check=True, env=env, cwd=tmp_path)
    wheel = next(dist.glob("lwm-*.whl"))
    venv = tmp_path / "venv"
    # --system-site-packages: jax, torch, ... come from this environment; lwm itself only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel],
                   check=True, env=env)
    work = tmp_path / "work"
    work.mkdir()

    def run(*args):
        return subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run("-c", "import lwm, pathlib; print(pathlib.Path(lwm.__file__).parent)")
    package_dir = pathlib.Path(where.stdout.strip())
    assert where.returncode == 0 and str(venv) in str(package_dir), where.stdout + where.stderr
    entries = _entry_modules(package_dir)
    assert "lwm.train" in entries and len(entries) >= 2, entries
    failed = []
    for module in entries:
        out = run("-m", module, "--help")
        if out.returncode != 0 or "Traceback" in out.stderr:
            failed.append(f"python -m {module} --help: exit {out.returncode}\n{out.stderr[-600:]}")
    for script in sorted((REPO / "scripts").glob("*.py")):  # scripts run from a checkout against the wheel
        out = run(str(script), "--help")
        if out.returncode != 0 or "Traceback" in out.stderr:
            failed.append(f"python {script.relative_to(REPO)} --help: exit {out.returncode}\n{out.stderr[-600:]}")
    video = run("-c", VIDEO_CHECK)
    if video.returncode != 0 or str(venv) not in video.stdout:
        failed.append(f"video round trip: exit {video.returncode}\n{video.stdout}{video.stderr[-600:]}")
    assert not failed, "\n\n".join(failed)
