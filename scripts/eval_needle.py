"""Single-needle retrieval eval ("needle in a haystack") with the original LWM's flags.

Hardware: one CPU for the tiny/debug presets (a 4K-token prompt of `debug` takes well under a second); a
TPU/GPU slice for 7B at 100K+ tokens. Writes every trial to --output_file (JSON) and the accuracy heatmap
by context length and depth next to it (--heatmap_file, default: output_file with .png).
    python scripts/eval_needle.py --load_llama_config=7b --load_checkpoint=params::/ckpt/streaming_params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --output_file=results/needle.json \
        --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" --context_lengths_max=128000
An existing --output_file is resumed: trials already in it are skipped.
"""
from __future__ import annotations

import os
import random
import sys

from ml_collections import ConfigDict

from lwm import distributed


def get_default_config() -> ConfigDict:
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
    c.mesh_dim = "1,-1,1,1"
    c.dtype = "fp32"
    c.load_llama_config = ""
    c.update_llama_config = ""
    c.load_checkpoint = ""
    c.tokenizer = "LargeWorldModel/LWM-Text-1M"
    c.max_new_tokens = 32                     # the answer budget (the original allowed a whole block)
    c.final_context_length_buffer = 200       # haystack tokens left out for the template and question
    c.progress = True
    c.llama = ConfigDict()                    # --llama.<field>=value
    c.jax_distributed = ConfigDict(distributed.default_flags())
    return c


def setup(config: ConfigDict):
    """Flags -> (mesh, tokenizer, Engine), shared with eval_needle_multi.py."""
    import jax

    from lwm.checkpoint import parse_float_dtype
    from lwm.inference.engine import Engine
    from lwm.sampling import load_model
    from lwm.sharding import check_model_mesh, make_mesh
    from lwm.tokenizer import load_tokenizer
    from lwm.train import model_config_from_flags

    distributed.initialize(distributed.config_from_flags(config.jax_distributed))
    dtype = parse_float_dtype(config.dtype)
    if dtype is None:
        raise ValueError("--dtype is empty; use fp32, bf16 or fp16")
    tokenizer = load_tokenizer(config.tokenizer)
    flags = ConfigDict(dict(modality="text", load_llama_config=config.load_llama_config, llama=config.llama,
                            update_llama_config=config.update_llama_config))
    model_config = model_config_from_flags(flags, tokenizer)
    mesh = make_mesh(config.mesh_dim)
    check_model_mesh(model_config, mesh)
    with jax.set_mesh(mesh):
        model, params = load_model(model_config, config.load_checkpoint, dtype, mesh)
    sampler = Engine(model, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     vocab_size=tokenizer.vocab_size)
    return mesh, tokenizer, sampler


def check_flags(config: ConfigDict) -> None:
    if not config.haystack_file:
        raise ValueError("--haystack_file is empty: give a JSONL file with a \"text\" field per line "
                         "(scripts/create_needle_data.py writes one)")
    if not os.path.isfile(config.haystack_file) and "://" not in config.haystack_file:
        raise FileNotFoundError(f"--haystack_file={config.haystack_file}: no such file")
    for name in ("max_tokens_per_batch", "n_rounds", "max_new_tokens"):
        if config[name] < 1:
            raise ValueError(f"--{name}={config[name]}: must be >= 1")
    if config.final_context_length_buffer < 0:
        raise ValueError(f"--final_context_length_buffer={config.final_context_length_buffer}: must be >= 0")


def main(argv=None) -> list:
    from lwm import needle
    from lwm.train import parse_flags

    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    check_flags(config)
    lengths = needle.context_lengths(config.context_lengths_min, config.context_lengths_max,
                                     config.n_context_length_intervals)
    depths = needle.depth_percents(config.n_document_depth_intervals)
    mesh, tokenizer, sampler = setup(config)
    results = needle.load_results(config.output_file)
    done = frozenset((r["context_length"], r["depth_percent"], r["seed"]) for r in results)
    print(f"needle eval: {len(lengths)} context lengths {lengths[0]}..{lengths[-1]}, depths {depths}, "
          f"{config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    haystacks = needle.read_haystacks(config.haystack_file, config.n_rounds, max(lengths), tokenizer)
    trials = needle.single_needle_trials(haystacks, tokenizer, lengths, depths, random.Random(config.seed),
                                         config.final_context_length_buffer, done)
    return run_and_write(config, mesh, sampler, tokenizer, trials, results, title="Single needle")


def run_and_write(config, mesh, sampler, tokenizer, trials, results: list, *, title: str) -> list:
    """Runs the trials (saving the JSON after every batch), then writes the JSON and the heatmap and prints
    the summary; shared with eval_needle_multi.py. Returns all results, earlier ones included."""
    import jax

    from lwm import needle

    is_main = jax.process_index() == 0
    save = (lambda rs: needle.write_json(config.output_file, rs)) if is_main else None
    with jax.set_mesh(mesh):
        results = needle.run_trials(trials, sampler, tokenizer, max_tokens_per_batch=config.max_tokens_per_batch,
                                    max_new_tokens=config.max_new_tokens, results=results, on_batch=save,
                                    progress=config.progress and is_main)
    if is_main:
        needle.write_json(config.output_file, results)
        heatmap = config.heatmap_file or os.path.splitext(config.output_file)[0] + ".png"
        needle.plot_heatmap(results, heatmap, title=title)
        print(needle.summary_table(results))
        print(f"results: {os.path.abspath(config.output_file)}\nheatmap: {os.path.abspath(heatmap)}")
    return results


if __name__ == "__main__":
    main()
