"""The one runner of every evaluation, the task protocol it runs, and the task registry.

A task (`EvalTask`) says what to ask and how to score; the runner (`run`) decides how to ask: it groups the
samples by (task, length), cuts each group into batches that fit `max_tokens_per_batch`, pads every batch of
a group to one shape (same rows, same padded prompt length: one compiled shape per group on the JAX
backend), generates greedily through a backend (`lwm.evals.backends`), times each batch and turns each answer
into a record with the task's rule. Nothing else in lwm/evals batches, pads or times:
tests/evals/test_runner.py::test_one_runner_is_the_only_batching_loop keeps it so.

A sample is a dict the task made (its prompt token ids under "prompt", unless the task builds prompts per
batch, as the visual needle does from video frames); a record is what the task's `record` returns for it,
plus "seconds" (the batch's wall time, prompt building included, divided by its samples).

Batch size (prompts per generate call), for a group of n samples whose prompts pad to P tokens with a
budget of M new tokens, a backend that shards rows over `data_size` devices (the JAX mesh's dp x fsdp; 1 for
PyTorch) and the optional `max_rows` cap:
    b = max(data, (max_tokens_per_batch // (P + M)) // data * data), then min(b, data * ceil(n / data)),
    then min(b, max_rows) when given (not below data)
Worked example: max_tokens_per_batch=3000, P=416, M=16, data=2, n=9 -> 3000 // 432 = 6 -> b = 6; the last
batch of 3 prompts is padded to 6 rows with copies of its first prompt (their answers are dropped).

Order. With a backend that reuses prompt prefixes (`backend.prefix_cache` set: the JAX backend's KV-block cache,
lwm.inference.prefix_cache), each group runs in the order of `task.prefix_order(sample)`: by default the prompt's
token ids, sorted, so prompts that share a prefix run one after another (a depth-first walk of their prefix tree,
as SGLang's radix cache schedules): a needle eval's prompts of one haystack go from the needle at the start to
the needle at the end, and each reuses the haystack blocks before its needle that the one before it stored (a
shallower needle's prompt never has its needle where a deeper one has haystack, so nothing is recomputed that
an unbounded cache holds). Only the order of the calls changes: the records come back in sample order, each
prompt gets the answer it gets alone, and without a prefix cache the order is the samples'.

Add an eval: write a task (a subclass of `EvalTask`, or of `lwm.evals.tasks.Task` for a text task fitted to
token lengths by `lwm.evals.suite`), then `register(MyTask("my_task"))`; docs/evals.md walks through it.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence, Union

# ----------------------------------------------------------------------------------------------- the task

@dataclasses.dataclass(frozen=True)
class EvalTask:
    """What the runner needs of a task. name: the registry key; max_new_tokens: the answer budget (M)."""
    name: str
    max_new_tokens: int = 32

    def length(self, sample: dict) -> int:
        """The sample's grid length (batches never mix lengths): its token length for text tasks."""
        return sample["length"]

    def prompt_length(self, sample: dict) -> Optional[int]:
        """Prompt tokens known before the batch is built, or None (then each call pads to its own longest)."""
        return len(sample["prompt"])

    def prefix_order(self, sample: dict):
        """Sort key of the sample within its group when the backend caches prefixes (module docstring): its
        prompt ids; None (for every sample of a group) keeps the samples' order, as for prompts built per
        batch."""
        return list(sample["prompt"]) if "prompt" in sample else None

    def prompts(self, chunk: Sequence[dict]) -> tuple[list[list[int]], Optional[list]]:
        """(token ids per sample, vision inputs per sample or None), built inside the timed section."""
        return [list(s["prompt"]) for s in chunk], None

    def record(self, sample: dict, response: str, new_tokens: Sequence[int], prompt: Sequence[int]) -> dict:
        """The stored result of one sample: its fields (without prompt inputs) plus the task's score."""
        raise NotImplementedError


TaskLike = Union[EvalTask, Mapping[str, EvalTask]]
TASKS: dict[str, EvalTask] = {}     # filled as the task modules are imported (needle, suite, visual, yours)


def register(task: EvalTask) -> EvalTask:
    """Add `task` to the registry under task.name; a second task of the same name raises ValueError."""
    if task.name in TASKS:
        raise ValueError(f"eval task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


# ----------------------------------------------------------------------------------------------- the runner

def batch_rows(max_tokens_per_batch: Optional[int], padded_length: int, max_new_tokens: int, data: int, n: int,
               max_rows: Optional[int] = None) -> int:
    """Prompts per generate call (module docstring's formula; max_tokens_per_batch None: no token limit)."""
    fit = n if max_tokens_per_batch is None else max_tokens_per_batch // (padded_length + max_new_tokens)
    b = min(max(data, fit // data * data), data * -(-n // data))
    if max_rows is not None:
        b = min(b, max(data, max_rows))
    return b


def run(samples: Sequence[dict], backend, tasks: TaskLike, *, max_tokens_per_batch: Optional[int] = 32768,
        max_rows: Optional[int] = None, results: Optional[list] = None,
        on_batch: Optional[Callable[[list], None]] = None, progress: bool = True, desc: str = "eval") -> list:
    """Every sample through `backend` (module docstring). tasks: one task for every sample, or a mapping
    from sample["task"] to its task. Groups run in the order their first sample appears. Appends the records
    to `results` (a new list by default) and returns it; `on_batch(results)` after every batch (e.g. to save
    the JSON). Raises the backend's error (lwm.inference.engine.PromptTooLongError on the JAX backend) before
    any compile when a prompt + budget exceeds the model's length."""
    from lwm.utils.progress import progress as progress_bar     # tqdm on a terminal, plain lines in a log

    task_of = (lambda s: tasks) if isinstance(tasks, EvalTask) else (lambda s: tasks[s["task"]])
    results = [] if results is None else results
    start = len(results)
    groups: dict = defaultdict(list)
    for i, s in enumerate(samples):
        task = task_of(s)
        groups[(task.name, task.length(s))].append((task, i, s))
    plan = []
    reorder = getattr(backend, "prefix_cache", None) is not None
    for (_, length), items in groups.items():
        task = items[0][0]
        known = [task.prompt_length(s) for _, _, s in items]
        longest = None if None in known else max(known)
        if longest is not None:
            backend.check_length(longest, task.max_new_tokens)            # before any compile
        if reorder:
            keys = [task.prefix_order(s) for _, _, s in items]
            if None not in keys:
                items = [items[j] for j in sorted(range(len(items)), key=keys.__getitem__)]
        plan.append((task, length, [(i, s) for _, i, s in items], longest))
    index = []                                                             # sample index of each new record
    data = backend.data_size
    bar = progress_bar(total=len(samples), desc=f"{desc} {backend.name}", unit="prompt", disable=not progress)
    for task, length, group, longest in plan:
        budget = task.max_new_tokens
        padded = backend.padded_length(longest) if longest is not None else None
        b = batch_rows(max_tokens_per_batch, padded or length, budget, data, len(group), max_rows)
        for i in range(0, len(group), b):
            index += [j for j, _ in group[i:i + b]]
            chunk = [s for _, s in group[i:i + b]]
            t0 = time.perf_counter()
            prompts, vision = task.prompts(chunk)
            fill = b - len(chunk)                                          # one shape for the last batch too
            outs = backend.generate(prompts + [prompts[0]] * fill, budget, padded_length=padded,
                                    vision=None if vision is None else vision + [vision[0]] * fill)[:len(chunk)]
            seconds = (time.perf_counter() - t0) / len(chunk)
            for s, prompt, out in zip(chunk, prompts, outs):
                record = task.record(s, backend.tokenizer.decode(out), out, prompt)
                record["seconds"] = round(seconds, 4)
                results.append(record)
            if on_batch is not None:
                on_batch(results)
            bar.update(len(chunk))
            bar.set_postfix(task=task.name, length=length)
    bar.close()
    results[start:] = [r for _, r in sorted(zip(index, results[start:]), key=lambda x: x[0])]   # sample order
    return results
