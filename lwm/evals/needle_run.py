"""What the two needle entry points (`lwm.eval_needle`, `lwm.eval_needle_multi`) share: their flags, the
set-up (runtime, model, engine), and the run that writes the JSON after every batch, then the heatmap and
the summary table. The protocol itself (haystacks, needles, scoring, plots) is in `lwm.evals.needle`."""
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


def setup(config: ConfigDict):
    """Flags -> (mesh, tokenizer, engine): the runtime, the model from --load_checkpoint placed on the mesh,
    and the generation engine (lwm.inference.engine) over it."""
    import jax

    from lwm.inference.loader import load_model
    from lwm.inference.engine import Engine

    rt = runtime.setup(config, modality="text")
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, config.load_checkpoint, rt.dtype, rt.mesh)
    engine = Engine(model, params, eos_id=rt.tokenizer.eos_id, pad_id=rt.tokenizer.pad_id,
                    vocab_size=rt.tokenizer.vocab_size, cache_dtype=config.cache_dtype)
    return rt.mesh, rt.tokenizer, engine


def run_and_write(config, mesh, engine, tokenizer, trials, results: list, *, title: str) -> list:
    """Runs the trials (saving the JSON after every batch), then writes the JSON and the heatmap and prints
    the summary (process 0 only). Returns all results, earlier ones included."""
    import jax

    from lwm.evals import needle

    is_main = jax.process_index() == 0
    save = (lambda rs: needle.write_json(config.output_file, rs)) if is_main else None
    with jax.set_mesh(mesh):
        results = needle.run_trials(trials, engine, tokenizer, max_tokens_per_batch=config.max_tokens_per_batch,
                                    max_new_tokens=config.max_new_tokens, results=results, on_batch=save,
                                    progress=config.progress and is_main)
    if is_main:
        needle.write_json(config.output_file, results)
        heatmap = config.heatmap_file or os.path.splitext(config.output_file)[0] + ".png"
        needle.plot_heatmap(results, heatmap, title=title)
        print(needle.summary_table(results))
        print(f"results: {os.path.abspath(config.output_file)}\nheatmap: {os.path.abspath(heatmap)}")
    return results
