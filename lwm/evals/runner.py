"""Run samples through a model and score them.

A backend is anything with `tokenizer`, `name` and `generate(prompts, max_new_tokens) -> new token ids per
prompt` (greedy, cut before EOS); `lwm.evals.backends` has the LWM JAX one (through the inference engine) and
the Hugging Face PyTorch one. Samples are batched per (task, length): every prompt of a batch has the same
token budget and about the same length (one compiled shape per length on the JAX path), as many per batch
as `max_tokens_per_batch` allows.

Each record is the sample without its prompt and message, plus response (text), score (0-100, the task's
rule) and seconds (the batch's wall time divided by its prompts).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional, Sequence

from lwm.evals.suite import TASKS


def batch_size(max_tokens_per_batch: int, length: int, max_new_tokens: int, n: int) -> int:
    """Prompts per batch: as many as fit (length + budget each), at least 1, no more than n."""
    return max(1, min(n, max_tokens_per_batch // (length + max_new_tokens)))


def run(samples: Sequence[dict], backend, *, max_tokens_per_batch: int = 32768, progress: bool = True,
        on_batch: Optional[Callable[[list], None]] = None) -> list[dict]:
    from tqdm import tqdm

    groups = defaultdict(list)
    for s in samples:
        groups[(s["task"], s["length"])].append(s)
    records: list[dict] = []
    bar = tqdm(total=len(samples), desc=f"eval_long {backend.name}", unit="prompt", disable=not progress)
    for (name, length), group in groups.items():
        task = TASKS[name]
        b = batch_size(max_tokens_per_batch, length, task.max_new_tokens, len(group))
        for i in range(0, len(group), b):
            chunk = group[i:i + b]
            t0 = time.perf_counter()
            outs = backend.generate([s["prompt"] for s in chunk], task.max_new_tokens)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for s, out in zip(chunk, outs):
                response = backend.tokenizer.decode(out)
                record = {k: v for k, v in s.items() if k not in ("prompt", "message")}
                record.update(response=response, score=task.score(response, s["answers"]),
                              new_tokens=len(out), seconds=round(seconds, 4))
                records.append(record)
            if on_batch is not None:
                on_batch(records)
            bar.update(len(chunk))
            bar.set_postfix(task=name, length=length)
    bar.close()
    return records
