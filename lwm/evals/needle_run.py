"""The library of the two needle entry points (`lwm.eval_needle`, `lwm.eval_needle_multi`): their flags
and `run`, which builds the trials of the original protocol (lwm.evals.needle), runs them as a task of the
one runner (lwm.evals.runner) on the JAX backend, saves the JSON after every batch (resuming an existing
--output_file), then writes the heatmap and prints the summary table of the one report (lwm.evals.report). The haystack before a
needle is the same at every depth: with the prefix cache (--prefix_cache_mb, lwm.evals.backends.JaxBackend) the
runner orders each length's prompts so that its KV blocks are computed once and reused; the results are those
of a run without it, and a last line says how many prompt tokens were reused."""
from __future__ import annotations

import os

from ml_collections import ConfigDict

from lwm.inference import runtime


def needle_flags() -> ConfigDict:
    """The original eval_needle.py flags and defaults."""
    c = ConfigDict()
    c.haystack_file = ""
    c.max_tokens_per_batch = 2000000
    c.output_file = "results.json"
    c.heatmap_file = ""                       # '' = output_file with .png
    c.context_lengths_min = 1000
    c.context_lengths_max = 32000
    c.n_context_length_intervals = 3
    c.n_document_depth_intervals = 3
    c.n_rounds = 2
    c.seed = 1234
    runtime.runtime_flags(c, tokenizer="LargeWorldModel/LWM-Text-1M")
    c.max_new_tokens = 32                     # the answer budget (the original allowed a whole block)
    c.final_context_length_buffer = 200       # haystack tokens left out for the template and question
    c.progress = True
    return c


def check_flags(config: ConfigDict) -> None:
    """ValueError / FileNotFoundError naming the flag, before anything is loaded."""
    if not config.haystack_file:
        raise ValueError("--haystack_file is empty: give a JSONL file with a \"text\" field per line "
                         "(the create_needle_data script writes one)")
    if not os.path.isfile(config.haystack_file) and "://" not in config.haystack_file:
        raise FileNotFoundError(f"--haystack_file={config.haystack_file}: no such file")
    for name in ("max_tokens_per_batch", "n_rounds", "max_new_tokens"):
        if config[name] < 1:
            raise ValueError(f"--{name}={config[name]}: must be >= 1")
    if config.final_context_length_buffer < 0:
        raise ValueError(f"--final_context_length_buffer={config.final_context_length_buffer}: must be >= 0")


def run(config: ConfigDict, multi: bool) -> list:
    """The eval of `lwm.eval_needle` (multi=False) or `lwm.eval_needle_multi` (multi=True) on parsed flags;
    returns every result, earlier ones in --output_file included. ValueError / FileNotFoundError naming the
    flag for bad flags, before anything is loaded."""
    import dataclasses
    import random

    import jax

    from lwm.evals import needle, report, runner
    from lwm.evals.backends import JaxBackend, prefix_cache_line

    check_flags(config)
    if multi and not 1 <= config.n_needles_retrieve <= config.n_needles_total:
        raise ValueError(f"need 1 <= --n_needles_retrieve={config.n_needles_retrieve} <= "
                         f"--n_needles_total={config.n_needles_total}")
    lengths = needle.context_lengths(config.context_lengths_min, config.context_lengths_max,
                                     config.n_context_length_intervals)
    depths = needle.depth_percents(config.n_document_depth_intervals)
    if multi and config.n_needles_total > len(depths):
        raise ValueError(f"--n_needles_total={config.n_needles_total} needles need as many distinct depths; "
                         f"raise --n_document_depth_intervals (now {config.n_document_depth_intervals})")
    backend = JaxBackend.from_flags(config, modality="text")
    tokenizer = backend.tokenizer
    results = report.load_results(config.output_file)
    rng = random.Random(config.seed)
    if multi:
        done = frozenset((r["context_length"], r["seed"]) for r in results)
        print(f"multi-needle eval: {config.n_needles_total} needles, {config.n_needles_retrieve} asked; lengths "
              f"{lengths}; {config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    else:
        done = frozenset((r["context_length"], r["depth_percent"], r["seed"]) for r in results)
        print(f"needle eval: {len(lengths)} context lengths {lengths[0]}..{lengths[-1]}, depths {depths}, "
              f"{config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    haystacks = needle.read_haystacks(config.haystack_file, config.n_rounds, max(lengths), tokenizer)
    if multi:
        trials = needle.multi_needle_trials(haystacks, tokenizer, lengths, depths, rng, config.n_needles_total,
                                            config.n_needles_retrieve, config.final_context_length_buffer, done)
        task, title = needle.MULTI, f"{config.n_needles_retrieve} of {config.n_needles_total} needles"
    else:
        trials = needle.single_needle_trials(haystacks, tokenizer, lengths, depths, rng,
                                             config.final_context_length_buffer, done)
        task, title = needle.SINGLE, "Single needle"
    task = dataclasses.replace(task, max_new_tokens=config.max_new_tokens)
    is_main = jax.process_index() == 0
    save = (lambda rs: report.write_json(config.output_file, list(rs))) if is_main else None
    results = runner.run(trials, backend, task, max_tokens_per_batch=config.max_tokens_per_batch, results=results,
                         on_batch=save, progress=config.progress and is_main, desc=task.name)
    if is_main:
        report.write_json(config.output_file, list(results))
        heatmap = config.heatmap_file or os.path.splitext(config.output_file)[0] + ".png"
        if results:
            report.plot_task(results, task.name, heatmap, title=title)
            print(report.summary_table(report.summarize(results)))
        print(f"overall accuracy {report.mean_accuracy(results):.3f} over {len(results)} trials")
        if backend.prefix_cache is not None:
            print(prefix_cache_line(backend.prefix_cache))
        print(f"results: {os.path.abspath(config.output_file)}\nheatmap: {os.path.abspath(heatmap)}")
    return results
