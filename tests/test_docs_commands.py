"""Every `python -m lwm.X ...` command written in README.md and docs/*.md parses with the command's own flags.

Each command (in a fenced code block or an inline code span; `\\` line continuations joined) is cut out of its
shell line (up to `;`, `&`, `|`, `>` or a comment) and given to lwm.cli.flags.parse_flags against the
entry point's get_default_config() (for lwm.convert, its subcommand's), so a renamed or misspelled flag, a
value of the wrong kind or a module that does not exist fails here, naming the file and line. A value that
is a shell variable (`$OUT/...`), a command substitution or an elision (`...`, `<dir>`) is not known until it
runs: only its flag name is checked. Controls: a misspelled flag, a bad value and an unknown module in a
made-up doc are caught.

Then the commands run as written where that is cheap: one interpreter runs every named entry point's `--help`
as `python -m` does (runpy); the planner commands for one mesh (`lwm.memory --mesh_dim=...`, no `--check_xla`,
no file paths) run in-process, and those of docs/clusters.md must print the totals quoted beside them; the
README's terminal chat and tiny vision pair run (slow) with a test tokenizer and checkpoint for the demo's.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from ml_collections import ConfigDict

from lwm.cli.flags import FlagError, get_flag, known_flags, model_config_from_flags, parse_flags, resolve_alias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
COMMAND = re.compile(r"python3? -m (lwm(?:\.[a-z_][a-z0-9_]*)*)(?=\s|$)")
VISION_COMMANDS = {"lwm.vision_chat", "lwm.vision_generation", "lwm.eval_visual_needle"}
OPERATORS = {";", "&", "&&", "|", "||", ">", ">>", "<", "2>", "2>&1", ")", "("}


@dataclass
class Command:
    doc: str
    line: int
    module: str
    argv: list

    def __str__(self):
        return f"{self.doc}:{self.line}: python -m {self.module} {' '.join(self.argv)}"


def _mask_substitutions(text: str) -> str:
    """`$( ... )` (balanced, quotes inside allowed) -> `$SUBST`: its value is known only when it runs."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j = 0, i + 1
            while j < len(text):
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            out.append("$SUBST")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _code_lines(text: str):
    """(line number, text) of every shell line in fenced blocks (continuations joined) and every inline code
    span of prose that holds `python -m lwm.`."""
    lines = text.split("\n")
    fenced, start, buf = False, 0, ""
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            if not buf:
                start = n
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            yield start, buf + line
            buf = ""
        else:
            for span in re.findall(r"`([^`]*python3? -m lwm\.[^`]*)`", line):
                yield n, span


def extract(doc: str, text: Optional[str] = None) -> list[Command]:
    """Every `python -m lwm.X` command of the markdown file `doc` (relative to the repository root)."""
    if text is None:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
    commands = []
    for n, line in _code_lines(text):
        for m in COMMAND.finditer(line):
            rest = _mask_substitutions(line[m.end():])
            if line[:m.start()].count('"') % 2:                     # inside "...": e.g. gcloud --command="..."
                rest = rest.split('"', 1)[0]
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|<>()")
            lexer.whitespace_split, lexer.commenters = True, "#"
            argv = []
            try:
                for token in lexer:
                    if token in OPERATORS:
                        break
                    argv.append(token)
            except ValueError as e:                                 # an unbalanced quote
                argv = [f"<unparsable: {e}>"]
            commands.append(Command(doc, n, m.group(1), argv))
    return commands


def _elided(value: str) -> bool:
    """A value known only where the command runs: a shell variable or substitution, an elision (`...`,
    `<dir>`), or an absolute path (`/ckpt/...`, `params::/models/...`: the reader's own weights and folders)."""
    return "$" in value or "..." in value or bool(re.search(r"<[^>]*>|(^|::)/", value))


def _defaults(module: str):
    """get_default_config() of `python -m module`; LookupError when there is no such entry point."""
    try:
        mod = importlib.import_module(module)
        if not hasattr(mod, "get_default_config"):
            mod = importlib.import_module(module + ".__main__")
    except ImportError:
        raise LookupError(f"no entry point {module}") from None
    if not hasattr(mod, "get_default_config"):
        raise LookupError(f"{module} is not an lwm entry point (no get_default_config)")
    return mod.get_default_config()


def check(command: Command) -> None:
    """Parse `command` with its entry point's flags; raises FlagError / LookupError naming what is wrong."""
    defaults = _defaults(command.module)
    argv = [a for a in command.argv if a != "..."]
    if "--help" in argv or "-h" in argv:
        return                                                      # every entry point answers --help (below)
    if isinstance(defaults, dict):                                  # subcommands (lwm.convert)
        if not argv or argv[0] not in defaults:
            raise FlagError(f"the first argument is the subcommand, one of {', '.join(defaults)}")
        defaults, argv = defaults[argv[0]], argv[1:]
    known = set(known_flags(defaults))
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if arg.startswith("--") and not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, eq, i = argv[i + 1], "=", i + 1                  # --name value
        if name and eq and _elided(value):
            target = resolve_alias(name, known)
            if target in known:                                     # only the name is known before it runs
                value = str(get_flag(defaults, target))
            elif not target.startswith("llama."):
                value = ""
        out.append(f"--{name}={value}" if name and eq else arg)
        i += 1
    config = parse_flags(out, defaults)
    if "llama" in config and "load_llama_config" in config:        # --llama.* and --update_llama_config fields
        modality = config.modality if "modality" in config else (
            "vision,text" if command.module in VISION_COMMANDS else "text")
        view = ConfigDict(dict(modality=modality, load_llama_config=config.load_llama_config, llama=config.llama,
                               update_llama_config=config.update_llama_config))
        model_config_from_flags(view)


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in extract(doc)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_parses_with_its_entry_points_flags(doc):
    errors = []
    for command in extract(doc):
        if not command.argv:                                        # a mention in prose ("`python -m lwm.convert`")
            continue
        try:
            check(command)
        except (FlagError, LookupError, ValueError, TypeError) as e:
            errors.append(f"{command}\n    -> {e}")
    assert not errors, "\n".join(errors)


def test_the_extractor_finds_the_commands():
    commands = all_commands()
    modules = {c.module for c in commands}
    assert len(commands) >= 40 and {"lwm.train", "lwm.serve", "lwm.memory", "lwm.eval_needle", "lwm.text_chat",
                                    "lwm.vision_chat", "lwm.vision_generation", "lwm.eval_long"} <= modules
    clusters = [c for c in commands if c.doc == os.path.join("docs", "clusters.md")]
    assert {"lwm.train", "lwm.eval_needle", "lwm.serve"} <= {c.module for c in clusters}
    # Continuations joined, comments and shell operators cut off, substitutions masked.
    serve = next(c for c in commands if c.doc == "README.md" and c.module == "lwm.serve" and c.argv)
    assert serve.argv[-1] == "--port=8000" and any(a.startswith("--load_checkpoint=$SUBST") for a in serve.argv)


MADE_UP = """
```bash
python -m lwm.train --mesh_dim=1,1,1,4 --total_steps=10 \\
    --optimizer.adamw_optimizer.lr=1e-3 --logger.output_dir=$OUT   # a comment --not_a_flag
python -m lwm.train --mesh_dim=1,1,1,4 --totl_steps=10
python -m lwm.train --total_steps=ten
python -m lwm.trian --total_steps=10
python -m lwm.convert from_hf --hf_dir /models/x --output params::/ckpt/p
python -m lwm.convert from_hf --hf_dir /models/x --outptu params::/ckpt/p
gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd lwm && python -m lwm.eval_needle \\
    --jax_distributed.initialize_jax_distributed=True --llama.max_sequence_lenght=131072"
python -m lwm.train --llama.attention_impl=ring --update_llama_config="dict(theta=10, scan_query_chunk=4)"
```
Inline: `python -m lwm.memory --load_llama_config=7b --seq_len=32768 --mesh_dim=1,1,1,8`, and
`python -m lwm.memory --load_llama_config=7b --seqlen=32768`.
"""


def test_controls_a_misspelled_flag_a_bad_value_and_an_unknown_module_fail():
    results = []
    for command in extract("made_up.md", MADE_UP):
        try:
            check(command)
            results.append("ok")
        except (FlagError, LookupError, ValueError) as e:
            results.append(str(e))
    assert results[0] == "ok" and results[4] == "ok", results
    assert "unknown flag --totl_steps" in results[1] and "--total_steps" in results[1]
    assert "--total_steps='ten'" in results[2]
    assert "no entry point lwm.trian" in results[3]
    assert "unknown flag --outptu" in results[5]
    assert "max_sequence_lenght" in results[6] and "max_sequence_length" in results[6]   # a --llama.* field
    assert "scan_query_chunk" in results[7]                                              # in --update_llama_config
    assert results[8] == "ok"
    assert "unknown flag --seqlen" in results[9]
    assert len(results) == 10


HELP_SCRIPT = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    text = out.getvalue()
    ok = code in (0, None) and "flags and defaults" in text
    print(module, "ok" if ok else f"FAILED (exit {code!r}): {text[-300:]!r}", flush=True)
"""


def test_every_entry_point_named_in_the_docs_answers_help():
    """One interpreter runs `python -m X --help` for every X the docs name (runpy.run_module, as -m does)."""
    modules = sorted({c.module for c in all_commands()})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *modules], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("lwm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines == {m: "ok" for m in modules}, proc.stdout[-3000:]
    # Control: a module that is not an entry point does not pass.
    bad = subprocess.run([sys.executable, "-c", HELP_SCRIPT, "lwm.utils.dtypes"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert "lwm.utils.dtypes FAILED" in bad.stdout


def _runnable_memory_commands() -> list[Command]:
    """One mesh's table (a --mesh_dim, no --check_xla, no file): arithmetic, a second or two each."""
    return [c for c in all_commands() if c.module == "lwm.memory" and any(a.startswith("--mesh_dim") for a in c.argv)
            and not any("check_xla" in a or "::" in a or _elided(a) for a in c.argv)]


FIGURES = re.compile(r"#\s*->\s*train ([\d.]+), inference ([\d.]+) GiB")


def quoted_figures(command: Command) -> Optional[tuple[str, str]]:
    """(train, inference) GiB quoted on the line after a one-line command (`# -> train 21.96, inference 13.11 GiB`)."""
    with open(os.path.join(ROOT, command.doc), encoding="utf-8") as f:
        lines = f.read().split("\n")
    m = FIGURES.search(lines[command.line]) if command.line < len(lines) else None
    return m.groups() if m else None


def printed_totals(text: str) -> dict:
    """{mode: total} from the planner's table rows `| seq_len | mode | ... | total |`."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {r[1]: r[-1] for r in rows if len(r) > 2 and r[1] in ("train", "inference")}


def test_the_planner_commands_run_as_written_and_print_the_quoted_figures():
    """The lwm.memory commands of the docs for one mesh (no --check_xla, no file) print their tables; where a doc
    quotes the totals beside the command (docs/clusters.md), they are the ones printed today."""
    from lwm import memory

    commands = _runnable_memory_commands()
    assert commands, "no runnable lwm.memory command found in the docs"
    quoted = 0
    for command in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            memory.main(command.argv)
        assert "GiB" in out.getvalue(), f"{command}: printed {out.getvalue()[-500:]!r}"
        figures = quoted_figures(command)
        if figures:
            quoted += 1
            totals = printed_totals(out.getvalue())
            assert (totals.get("train"), totals.get("inference")) == figures, f"{command}: quoted {figures}, printed {totals}"
    assert quoted >= 4                                   # the four rows of docs/clusters.md
    # Control: a figure that is not the printed one is caught by the comparison.
    assert printed_totals("| 131072 | train | 1 | 2 | 21.96 |\n| 131072 | inference | 1 | 13.11 |") == {
        "train": "21.96", "inference": "13.11"}
    assert printed_totals("| 131072 | train | 1 | 2 | 21.97 |")["train"] != "21.96"


def _readme(module: str) -> Command:
    (command,) = [c for c in extract("README.md") if c.module == module and c.argv]
    return command


def _swap(argv: list, **values) -> list:
    """argv with `--name=...` replaced for each name in `values` (the files of one machine: the demo's outputs)."""
    return [f"--{a[2:].split('=', 1)[0]}={values[a[2:].split('=', 1)[0]]}"
            if a.startswith("--") and a[2:].split("=", 1)[0] in values else a for a in argv]


@pytest.mark.slow
def test_the_readme_vision_pair_runs_as_written(golden_workdir, tmp_path):
    """README's tiny vision commands, as written but for the demo's tokenizer (the golden workdir's) and the
    image path: the generation writes the PNG, the chat reads it; both print their speed without compiling."""
    tok, image = os.path.join(golden_workdir, "tokenizer.model"), str(tmp_path / "tiny_image.png")
    gen, chat = _readme("lwm.vision_generation"), _readme("lwm.vision_chat")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", gen.module, *_swap(gen.argv, tokenizer=tok, output_file=image)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and os.path.getsize(image) > 0, out.stderr[-3000:]
    assert re.search(r"tokens/s\) after [\d.]+ s compiling", out.stdout), out.stdout
    out = subprocess.run([sys.executable, "-m", chat.module, *_swap(chat.argv, tokenizer=tok, input_file=image)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Answer:" in out.stdout, out.stderr[-3000:]
    assert re.search(r"tokens/s\) after [\d.]+ s compiling", out.stderr), out.stderr


@pytest.mark.slow
def test_the_readme_text_chat_runs_as_written(golden_workdir):
    """README's terminal chat on a tiny checkpoint (the golden workdir's, for the demo's): one message, then
    'exit' as the README says."""
    from lwm import text_chat

    command = _readme("lwm.text_chat")
    argv = _swap(command.argv, tokenizer=os.path.join(golden_workdir, "tokenizer.model"),
                 load_checkpoint=f"params::{golden_workdir}/params")
    out = io.StringIO()
    answers = text_chat.main(argv + ["--max_new_tokens=8"], stdin=io.StringIO("hello\nexit\nnever read\n"),
                             stdout=out)
    assert len(answers) == 1 and out.getvalue().count("ASSISTANT: ") == 1
