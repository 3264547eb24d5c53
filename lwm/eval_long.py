"""`python -m lwm.eval_long`: the synthetic long-context suite (RULER-style needles, variable tracking, word
extraction, co-reference; lwm/evals/) on an LWM JAX checkpoint or a local Hugging Face causal LM, with the
same prompts and scoring for both. Writes results.json, summary.md and plots/<task>.png to --output_dir and
prints the table with the effective length (threshold 85.6, RULER's Llama-2-7B at 4K).

Hardware: one CPU for the tiny model (about 0.1-1 s per prompt at 1K-4K tokens on 2 cores); a TPU/GPU slice
for 7B at 128K+ (use --update_llama_config="dict(attention_impl='ring')" with --mesh_dim=1,1,1,-1).
    python -m lwm.eval_long --load_llama_config=tiny --load_checkpoint=params::outputs/demo/.../params \
        --tokenizer=outputs/demo/tokenizer.model --haystack_file=outputs/demo/eval_haystack.jsonl \
        --lengths=1024,2048,4096 --output_dir=results/long
    python -m lwm.eval_long --hf_model=/models/llama-2-7b-chat --lengths=4096,8192 --output_dir=results/hf
Tasks needing the essay haystack (niah_*_essay*) need --haystack_file; --tasks=all (default) runs every task,
or give a comma list (--tasks=vt,cwe,niah_single_noise).
On the JAX path the prefix cache (--prefix_cache_mb, default -1: on where the mesh has dp = fsdp = 1) reuses each
haystack's KV blocks across the depths of its needles; the runner orders the prompts so that it does
(lwm.evals.runner); the records are those of a run without it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from ml_collections import ConfigDict


def get_default_config() -> ConfigDict:
    from lwm.evals.haystack import MAX_HAYSTACK_CHARS
    from lwm.inference import runtime

    c = ConfigDict()
    c.tasks = "all"
    c.lengths = "1024,2048,4096"              # token lengths of the whole prompt
    c.depths = "0,25,50,75,100"               # needle depths (%), for the tasks that have a depth axis
    c.n_samples = 2                           # per (task, length, depth); tasks without depth get as many per length
    c.seed = 0
    c.haystack_file = ""                      # JSONL with "text" (or .txt) for the essay haystack
    c.haystack_max_chars = MAX_HAYSTACK_CHARS # read at most this many characters of it (64 M)
    c.threshold = 85.6                        # effective-length bar (RULER: Llama-2-7B at 4K)
    c.output_dir = "results/eval_long"
    c.max_tokens_per_batch = 32768
    c.progress = True
    c.plots = True
    c.hf_model = ""                           # a local Hugging Face model directory: the PyTorch path
    c.device = "cpu"                          # torch device of the PyTorch path
    # The LWM JAX path: the inference entry points' flags (--load_llama_config, --update_llama_config,
    # --load_checkpoint, --tokenizer (default: the --hf_model directory on the PyTorch path), --mesh_dim,
    # --dtype, --llama.*, --jax_distributed.*).
    return runtime.runtime_flags(c, tokenizer="")


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={text}: expected comma-separated integers") from None
    if not values or min(values) < 1 and flag == "lengths":
        raise ValueError(f"--{flag}={text}: give at least one positive value")
    return values


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from lwm.evals import backends, report, runner, suite
    from lwm.inference import runtime
    from lwm.cli.command import parse
    from lwm.evals.haystack import essay_haystack

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    lengths, depths = _ints("lengths", config.lengths), _ints("depths", config.depths)
    if any(not 0 <= d <= 100 for d in depths):
        raise ValueError(f"--depths={config.depths}: depths are percents in [0, 100]")
    if config.n_samples < 1 or config.max_tokens_per_batch < 1:
        raise ValueError("--n_samples and --max_tokens_per_batch must be >= 1")
    tasks = suite.select_tasks(config.tasks)
    haystack = essay_haystack(config.haystack_file, max_chars=config.haystack_max_chars) \
        if config.haystack_file else None
    if haystack is None and any(t.needs_essay for t in tasks):
        skipped = [t.name for t in tasks if t.needs_essay]
        if config.tasks != "all":
            raise ValueError(f"--tasks: {', '.join(skipped)} need --haystack_file (the essay haystack)")
        print(f"eval_long: no --haystack_file, so the essay tasks are left out: {', '.join(skipped)}")
        tasks = [t for t in tasks if not t.needs_essay]
    if config.hf_model:
        if config.cache_dtype or config.load_checkpoint:
            raise ValueError("--cache_dtype and --load_checkpoint are for the LWM JAX path; --hf_model runs "
                             "the PyTorch path (its --dtype sets the model's dtype)")
        runtime.unused_cache_flags(config, "the PyTorch path (--hf_model)")
        backend = backends.TorchBackend(config.hf_model, config.dtype, config.device, config.tokenizer)
    else:
        if not config.load_checkpoint or not config.tokenizer:
            raise ValueError("give --hf_model=DIR (PyTorch path), or --load_checkpoint and --tokenizer (LWM JAX path)")
        backend = backends.JaxBackend.from_flags(config, modality="text")
    t0 = time.perf_counter()
    samples = suite.build_samples(tasks, backend.tokenizer, lengths, depths, config.n_samples, config.seed, haystack)
    print(f"eval_long: {len(samples)} prompts ({len(tasks)} tasks x lengths {lengths}) built in "
          f"{time.perf_counter() - t0:.1f} s; model {backend.name}")
    records = runner.run(samples, backend, {t.name: t for t in tasks}, max_tokens_per_batch=config.max_tokens_per_batch,
                         progress=config.progress and _is_main(), desc="eval_long")
    info = dict(model=backend.name, tasks=[t.name for t in tasks], lengths=lengths, depths=depths,
                n_samples=config.n_samples, seed=config.seed, haystack_file=config.haystack_file,
                argv=list(sys.argv[1:] if argv is None else argv))
    if not _is_main():
        return {}
    summary = report.write_results(config.output_dir, records, info, config.threshold, config.plots)
    print(report.summary_table(summary))
    if getattr(backend, "prefix_cache", None) is not None:
        print(backends.prefix_cache_line(backend.prefix_cache))
    print(f"results: {os.path.abspath(os.path.join(config.output_dir, 'results.json'))}")
    return summary


def _is_main() -> bool:
    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("lwm.eval_long", main, get_default_config, __doc__))
