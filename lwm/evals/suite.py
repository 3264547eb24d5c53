"""The text suite: its tasks (registered in the one registry, lwm.evals.runner.TASKS;
tests/test_one_home.py::test_rule_holds[task_registry]) and samples fitted to
token lengths.

    samples = build_samples(["niah_single_noise", "vt"], tokenizer, lengths=[1024, 2048], depths=[0, 50, 100],
                            n_samples=4, seed=0)
    # each: dict(task, length, depth, index, seed, prompt (token ids), prompt_tokens, answers, meta)

A sample's prompt is the chat template's first user turn (lwm/text/chat_template.py, BOS included) holding the
task's message; its size is the largest number of filler units whose prompt has at most `length` tokens of
that tokenizer (a binary search over n_units), so two models with different tokenizers see the same
text up to the length each one measures. The sample seed is a stable function of (seed, task, length,
depth, index): samples are identical across runs, processes and machines.
"""
from __future__ import annotations

from typing import Optional, Sequence

from lwm.text.chat_template import user_turn_ids
from lwm.evals.haystack import Haystack
from lwm.evals.runner import TASKS, register
from lwm.evals.tasks import NeedleTask, Task, sub_seed
from lwm.evals.tasks_more import CommonWords, CoReference, FrequentWords, VariableTracking

for _task in (
    NeedleTask("niah_single_noise", haystack="noise", uses_depth=True),
    NeedleTask("niah_single_essay", haystack="essay", needs_essay=True, uses_depth=True),
    NeedleTask("niah_single_essay_uuid", haystack="essay", value_kind="uuid", needs_essay=True, uses_depth=True,
               max_new_tokens=48),
    NeedleTask("niah_single_essay_word", haystack="essay", value_kind="word", needs_essay=True, uses_depth=True),
    NeedleTask("niah_multikey_essay", haystack="essay", n_keys=4, needs_essay=True, uses_depth=True),
    NeedleTask("niah_multikey_dense", haystack="needles", key_kind="wordpair", uses_depth=True),
    NeedleTask("niah_multikey_uuid", haystack="needles", key_kind="uuid", value_kind="uuid", uses_depth=True,
               max_new_tokens=48),
    NeedleTask("niah_multivalue", haystack="noise", n_values=4, uses_depth=True, max_new_tokens=64),
    NeedleTask("niah_multiquery", haystack="noise", n_keys=4, n_queries=4, uses_depth=True, max_new_tokens=64),
    VariableTracking("vt"),
    CommonWords("cwe"),
    FrequentWords("fwe"),
    CoReference("coref"),
):
    register(_task)


def text_tasks() -> dict[str, Task]:
    """The registered text tasks (`Task`s: samples from `build_samples`), in registration order."""
    return {name: t for name, t in TASKS.items() if isinstance(t, Task)}


def select_tasks(spec: str) -> list[Task]:
    """'all' or a comma list of text task names; an unknown name raises naming it and the known ones."""
    known = text_tasks()
    if spec in ("", "all"):
        return list(known.values())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def prompt_ids(tokenizer, message: str) -> list[int]:
    return user_turn_ids(tokenizer, message, first=True)


def fit_sample(task: Task, tokenizer, length: int, seed: int, depth: Optional[float],
               haystack: Optional[Haystack]) -> dict:
    """The sample with the most filler units whose prompt has <= length tokens. Raises ValueError when even
    task.min_units units do not fit."""
    def build(n):
        s = task.make(seed, n, depth, haystack)
        s["prompt"] = prompt_ids(tokenizer, s["message"])
        return s

    lo = build(task.min_units)
    if len(lo["prompt"]) > length:
        raise ValueError(f"task {task.name}: length {length} is too short; its smallest prompt has "
                         f"{len(lo['prompt'])} tokens")
    good, n_good, n_bad = lo, task.min_units, None
    n = max(task.min_units * 2, 4)
    while n_bad is None:                     # grow until a prompt is too long
        s = build(n)
        if len(s["prompt"]) <= length:
            good, n_good, n = s, n, n * 2
        else:
            n_bad = n
    while n_bad - n_good > 1:                # then bisect
        mid = (n_good + n_bad) // 2
        s = build(mid)
        if len(s["prompt"]) <= length:
            good, n_good = s, mid
        else:
            n_bad = mid
    good["n_units"] = n_good
    return good


def build_samples(tasks: Sequence[Task], tokenizer, lengths: Sequence[int], depths: Sequence[float],
                  n_samples: int, seed: int, haystack: Optional[Haystack] = None) -> list[dict]:
    """n_samples per (task, length, depth) for tasks with a depth axis, n_samples * len(depths) per (task,
    length) otherwise (the same number of prompts per cell of a length), each fitted to its length."""
    out = []
    for task in tasks:
        if task.needs_essay and haystack is None:
            raise ValueError(f"task {task.name} needs an essay haystack: give --haystack_file (a JSONL with a "
                             "\"text\" field, e.g. from the create_needle_data script with --source=essays, or a .txt)")
        for length in lengths:
            grid = [(float(d), i) for d in depths for i in range(n_samples)] if task.uses_depth else \
                [(None, i) for i in range(n_samples * max(1, len(depths)))]
            for depth, i in grid:
                s_seed = sub_seed(seed, task.name, int(length), depth, i)
                s = fit_sample(task, tokenizer, int(length), s_seed, depth, haystack)
                out.append(dict(task=task.name, length=int(length), depth=depth, index=i, seed=s_seed,
                                prompt=s["prompt"], prompt_tokens=len(s["prompt"]), message=s["message"],
                                answers=s["answers"], meta=s["meta"], n_units=s["n_units"]))
    return out
