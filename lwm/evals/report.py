"""The one report of every evaluation: records -> JSON, grids, heatmaps, the summary table and the effective
length (nothing else in lwm/evals writes JSON or figures: tests/evals/test_runner.py::
test_one_runner_is_the_only_batching_loop). Records come from the one runner (lwm.evals.runner); two layouts
are read:
  scored records   task, length, depth (None for tasks without a depth axis), score (0-100)
                   (the text suite, the visual needle)
  needle records   context_length, depth_percent, correct: the original LWM needle JSON, kept as it was;
                   single needle (task "needle"): one depth and a bool; multi-needle (task "needle_multi"):
                   a list of depths and a list of bools, one point per retrieved needle at its own depth
Both become points (task, length, depth, score 0-100) (`points`), and everything below is computed on points.

Effective length (RULER, Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv:2404.06654, sec. 4): the longest length L of the grid such that the score averaged
over the tasks is >= the threshold at L and at every shorter length of the grid. The default threshold,
85.6, is Llama-2-7B (chat)'s RULER average at 4K, the figure RULER uses as its bar. None when the shortest
length already falls below it.
Worked example: averages {1024: 92.0, 2048: 86.0, 4096: 70.0, 8192: 88.0}, threshold 85.6 -> 2048.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from lwm.utils.atomic import replace_file

RULER_THRESHOLD = 85.6


def points(record: dict) -> list[tuple]:
    """[(task, length, depth or None, score 0-100)] of one record (module docstring).
    points(dict(context_length=400, depth_percent=[0.0, 50.0], correct=[True, False]))
        == [("needle_multi", 400, 0.0, 100.0), ("needle_multi", 400, 50.0, 0.0)]"""
    if "score" in record:
        return [(record["task"], record["length"], record.get("depth"), float(record["score"]))]
    depths, correct = record["depth_percent"], record["correct"]
    if isinstance(correct, list):
        return [("needle_multi", record["context_length"], float(d), 100.0 * bool(c)) for d, c in zip(depths, correct)]
    return [("needle", record["context_length"], float(depths), 100.0 * bool(correct))]


def effective_length(scores: dict, threshold: float = RULER_THRESHOLD) -> Optional[int]:
    """scores: {length: average score 0-100} -> the effective length (module docstring)."""
    best = None
    for length in sorted(scores):
        if scores[length] < threshold:
            break
        best = length
    return best


def cell_scores(records: Sequence[dict]):
    """{task: {length: mean score}} and {task: {(length, depth): mean score}} (points with a depth only)."""
    by_len, by_cell = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for r in records:
        for task, length, depth, score in points(r):
            by_len[task][length].append(score)
            if depth is not None:
                by_cell[task][(length, depth)].append(score)
    mean = lambda d: {k: float(np.mean(v)) for k, v in d.items()}
    return {t: mean(v) for t, v in by_len.items()}, {t: mean(v) for t, v in by_cell.items()}


def grid(records: Sequence[dict], task: str):
    """(lengths, depths, scores (len(depths), len(lengths)), NaN where no point) of one task's depth points."""
    _, cells = cell_scores(records)
    cells = cells.get(task, {})
    lengths, depths = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    out = np.full((len(depths), len(lengths)), np.nan)
    for (n, d), s in cells.items():
        out[depths.index(d), lengths.index(n)] = s
    return lengths, depths, out


def mean_accuracy(records: Sequence[dict]) -> float:
    """The mean over records of each record's fraction right (a multi-needle record: its needles' mean), 0-1."""
    if not records:
        return 0.0
    return float(np.mean([np.mean([p[3] for p in points(r)]) / 100.0 for r in records]))


def _length(r: dict) -> int:
    return r["length"] if "length" in r else r["context_length"]


def summarize(records: Sequence[dict], threshold: float = RULER_THRESHOLD) -> dict:
    """Per task and on average: score by length, effective length, and seconds per prompt by length."""
    per_task, _ = cell_scores(records)
    lengths = sorted({_length(r) for r in records})
    average = {n: float(np.mean([per_task[t][n] for t in per_task if n in per_task[t]])) for n in lengths}
    secs = defaultdict(list)
    for r in records:
        secs[_length(r)].append(r.get("seconds", np.nan))
    return dict(threshold=threshold, lengths=lengths,
                tasks={t: dict(scores={str(n): round(s, 2) for n, s in sorted(v.items())},
                               effective_length=effective_length(v, threshold)) for t, v in per_task.items()},
                average={str(n): round(s, 2) for n, s in average.items()},
                effective_length=effective_length(average, threshold),
                seconds_per_prompt={str(n): round(float(np.mean(v)), 4) for n, v in sorted(secs.items())})


def summary_table(summary: dict, length_name: str = "") -> str:
    """Markdown table: one row per task (score by length, effective length), the average, seconds/prompt.
    length_name: what the columns count, shown in the corner (e.g. 'frames')."""
    lengths = summary["lengths"]
    fmt = lambda n: f"{n // 1024}K" if n % 1024 == 0 else str(n)
    eff = lambda e: fmt(e) if e is not None else f"< {fmt(lengths[0])}"
    corner = f"task \\ {length_name}" if length_name else "task"
    lines = [f"| {corner} | " + " | ".join(fmt(n) for n in lengths) + " | effective length |",
             "|---" * (len(lengths) + 2) + "|"]
    for t, v in summary["tasks"].items():
        lines.append(f"| {t} | " + " | ".join(f"{v['scores'].get(str(n), float('nan')):.1f}" for n in lengths)
                     + f" | {eff(v['effective_length'])} |")
    lines.append("| **average** | " + " | ".join(f"**{summary['average'][str(n)]:.1f}**" for n in lengths)
                 + f" | **{eff(summary['effective_length'])}** |")
    lines.append("| s/prompt | " + " | ".join(f"{summary['seconds_per_prompt'][str(n)]:.2f}" for n in lengths) + " | |")
    return "\n".join(lines)


def plot_task(records: Sequence[dict], task: str, path: str, title: str = "", xlabel: str = "context length (tokens)"
              ) -> str:
    """Score by length and depth (a heatmap, red 0 to green 100, the LWM paper's colours) for a task with
    depth points, by length (a line) else. Returns path (a PNG; folders made). ValueError with no points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    per_task, _ = cell_scores(records)
    if task not in per_task:
        raise ValueError(f"plot_task: no results of task {task!r} to plot")
    lengths, depths, scores = grid(records, task)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.6 * len(lengths) + 3), max(4.2, 0.4 * len(depths) + 2)))
    if depths:
        cmap = LinearSegmentedColormap.from_list("score", ["#F0496E", "#EBB839", "#0CD79F"])
        im = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45 if len(lengths) > 8 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:.0f}" for d in depths])
        ax.set_ylabel("needle depth (%)")
        if scores.size <= 400:
            for i in range(scores.shape[0]):
                for j in range(scores.shape[1]):
                    if not np.isnan(scores[i, j]):
                        ax.text(j, i, f"{scores[i, j]:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="score")
    else:
        lengths = sorted(per_task[task])
        ax.plot(lengths, [per_task[task][n] for n in lengths], marker="o")
        ax.set_ylim(-5, 105)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylabel("score")
    mean = np.mean([p[3] for r in records for p in points(r) if p[0] == task])
    ax.set_xlabel(xlabel)
    ax.set_title(f"{title or task} (score {mean:.1f})")
    fig.tight_layout()
    try:
        with replace_file(path) as tmp:            # a reader never sees a half-written PNG
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_json(path: str, data) -> None:
    """JSON to path, atomically (lwm.utils.atomic.replace_file: a partial file never replaces a good one);
    folders made."""
    with replace_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)


def load_results(path: str) -> list[dict]:
    """A JSON list of records written by an earlier run (to resume), or [] if there is no file. ValueError
    naming the file when it is not a JSON list."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"output_file={path}: exists but is not valid JSON ({e}); move it away") from None
    if not isinstance(results, list):
        raise ValueError(f"output_file={path}: expected a JSON list of results")
    return results


def write_results(output_dir: str, records: Sequence[dict], run_info: dict, threshold: float = RULER_THRESHOLD,
                  plots: bool = True, xlabel: str = "context length (tokens)") -> dict:
    """results.json (run_info, summary, every record), summary.md and plots/<task>.png under output_dir;
    returns the summary. Written aside and renamed into place (lwm.utils.atomic.replace_dir): a folder that
    held an earlier result holds it whole until the new one is complete, then the new one alone."""
    from lwm.utils.atomic import replace_dir

    summary = summarize(records, threshold)
    with replace_dir(output_dir) as tmp:
        write_json(os.path.join(tmp, "results.json"), dict(run=run_info, summary=summary, records=list(records)))
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(summary_table(summary) + "\n")
        if plots:
            for task in summary["tasks"]:
                plot_task(records, task, os.path.join(tmp, "plots", f"{task}.png"), xlabel=xlabel)
    return summary
