"""Results of the long-context suite: the JSON, one plot per task, and the summary with the effective length.

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

RULER_THRESHOLD = 85.6


def effective_length(scores: dict, threshold: float = RULER_THRESHOLD) -> Optional[int]:
    """scores: {length: average score 0-100} -> the effective length (module docstring)."""
    best = None
    for length in sorted(scores):
        if scores[length] < threshold:
            break
        best = length
    return best


def cell_scores(records: Sequence[dict]):
    """{task: {length: mean score}} and {task: {(length, depth): mean score}} (depth tasks only)."""
    by_len, by_cell = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for r in records:
        by_len[r["task"]][r["length"]].append(r["score"])
        if r.get("depth") is not None:
            by_cell[r["task"]][(r["length"], r["depth"])].append(r["score"])
    mean = lambda d: {k: float(np.mean(v)) for k, v in d.items()}
    return {t: mean(v) for t, v in by_len.items()}, {t: mean(v) for t, v in by_cell.items()}


def summarize(records: Sequence[dict], threshold: float = RULER_THRESHOLD) -> dict:
    """Per task and on average: score by length, effective length, and seconds per prompt by length."""
    per_task, _ = cell_scores(records)
    lengths = sorted({r["length"] for r in records})
    average = {n: float(np.mean([per_task[t][n] for t in per_task if n in per_task[t]])) for n in lengths}
    secs = defaultdict(list)
    for r in records:
        secs[r["length"]].append(r["seconds"])
    return dict(threshold=threshold, lengths=lengths,
                tasks={t: dict(scores={str(n): round(s, 2) for n, s in sorted(v.items())},
                               effective_length=effective_length(v, threshold)) for t, v in per_task.items()},
                average={str(n): round(s, 2) for n, s in average.items()},
                effective_length=effective_length(average, threshold),
                seconds_per_prompt={str(n): round(float(np.mean(v)), 4) for n, v in sorted(secs.items())})


def summary_table(summary: dict) -> str:
    """Markdown table: one row per task (score by length, effective length), the average, seconds/prompt."""
    lengths = summary["lengths"]
    fmt = lambda n: f"{n // 1024}K" if n % 1024 == 0 else str(n)
    eff = lambda e: fmt(e) if e is not None else f"< {fmt(lengths[0])}"
    lines = ["| task | " + " | ".join(fmt(n) for n in lengths) + " | effective length |",
             "|---" * (len(lengths) + 2) + "|"]
    for t, v in summary["tasks"].items():
        lines.append(f"| {t} | " + " | ".join(f"{v['scores'].get(str(n), float('nan')):.1f}" for n in lengths)
                     + f" | {eff(v['effective_length'])} |")
    lines.append("| **average** | " + " | ".join(f"**{summary['average'][str(n)]:.1f}**" for n in lengths)
                 + f" | **{eff(summary['effective_length'])}** |")
    lines.append("| s/prompt | " + " | ".join(f"{summary['seconds_per_prompt'][str(n)]:.2f}" for n in lengths) + " | |")
    return "\n".join(lines)


def plot_task(records: Sequence[dict], task: str, path: str) -> str:
    """Score by length and depth (a heatmap, red 0 to green 100) for depth tasks, by length (a line) else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    per_task, cells = cell_scores([r for r in records if r["task"] == task])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if cells.get(task):
        lengths = sorted({k[0] for k in cells[task]})
        depths = sorted({k[1] for k in cells[task]})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), s in cells[task].items():
            grid[depths.index(d), lengths.index(n)] = s
        cmap = LinearSegmentedColormap.from_list("score", ["#F0496E", "#EBB839", "#0CD79F"])
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0f}" for d in depths])
        ax.set_ylabel("needle depth (%)")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="score")
    else:
        lengths = sorted(per_task[task])
        ax.plot(lengths, [per_task[task][n] for n in lengths], marker="o")
        ax.set_ylim(-5, 105)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylabel("score")
    ax.set_xlabel("context length (tokens)")
    ax.set_title(task)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(output_dir: str, records: Sequence[dict], run_info: dict, threshold: float = RULER_THRESHOLD,
                  plots: bool = True) -> dict:
    """results.json (run_info, summary, every record), summary.md and plots/<task>.png under output_dir;
    returns the summary."""
    os.makedirs(output_dir, exist_ok=True)
    summary = summarize(records, threshold)
    tmp = os.path.join(output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(dict(run=run_info, summary=summary, records=list(records)), f, indent=1)
    os.replace(tmp, os.path.join(output_dir, "results.json"))
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(summary_table(summary) + "\n")
    if plots:
        for task in summary["tasks"]:
            plot_task(records, task, os.path.join(output_dir, "plots", f"{task}.png"))
    return summary
