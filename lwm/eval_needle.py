"""`python -m lwm.eval_needle`: single-needle retrieval eval ("needle in a haystack") with the original LWM's
flags (scripts/eval_needle.py is a thin wrapper over this module).

Hardware: one CPU for the tiny/debug presets (a 4K-token prompt of `debug` takes well under a second); a
TPU/GPU slice for 7B at 100K+ tokens. Writes every trial to --output_file (JSON) and the accuracy heatmap
by context length and depth next to it (--heatmap_file, default: output_file with .png).
    python -m lwm.eval_needle --load_llama_config=7b --load_checkpoint=params::/ckpt/streaming_params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --output_file=results/needle.json \
        --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" --context_lengths_max=128000
An existing --output_file is resumed: trials already in it are skipped. Several hosts: the same command on
each, with --jax_distributed.coordinator_address, num_processes and process_id (docs/needle.md).
"""
from __future__ import annotations

import random
import sys

from ml_collections import ConfigDict

from lwm.evals import needle_run


def get_default_config() -> ConfigDict:
    c = needle_run.needle_flags()
    c.lock()
    return c


def main(argv=None) -> list:
    """Run the eval; returns every result (earlier ones in --output_file included)."""
    from lwm.evals import needle
    from lwm.cli.flags import parse_flags

    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    needle_run.check_flags(config)
    lengths = needle.context_lengths(config.context_lengths_min, config.context_lengths_max,
                                     config.n_context_length_intervals)
    depths = needle.depth_percents(config.n_document_depth_intervals)
    mesh, tokenizer, engine = needle_run.setup(config)
    results = needle.load_results(config.output_file)
    done = frozenset((r["context_length"], r["depth_percent"], r["seed"]) for r in results)
    print(f"needle eval: {len(lengths)} context lengths {lengths[0]}..{lengths[-1]}, depths {depths}, "
          f"{config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    haystacks = needle.read_haystacks(config.haystack_file, config.n_rounds, max(lengths), tokenizer)
    trials = needle.single_needle_trials(haystacks, tokenizer, lengths, depths, random.Random(config.seed),
                                         config.final_context_length_buffer, done)
    return needle_run.run_and_write(config, mesh, engine, tokenizer, trials, results, title="Single needle")


if __name__ == "__main__":
    from lwm.inference.runtime import cli

    sys.exit(cli("lwm.eval_needle", main, get_default_config, __doc__))
