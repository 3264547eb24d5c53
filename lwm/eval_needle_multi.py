"""`python -m lwm.eval_needle_multi`: multi-needle retrieval eval. n_needles_total needles (distinct cities,
distinct random depths) in each haystack; the question asks for n_needles_retrieve of them; a needle counts
as found when the response contains its number. Flags as lwm.eval_needle, plus --n_needles_total and
--n_needles_retrieve (scripts/eval_needle_multi.py is a thin wrapper over this module).

Hardware: as lwm.eval_needle. Writes every trial to --output_file and a heatmap of per-needle accuracy by
context length and that needle's depth.
    python -m lwm.eval_needle_multi --load_llama_config=7b --load_checkpoint=params::/ckpt/params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --n_needles_total=4 \
        --n_needles_retrieve=2 --n_document_depth_intervals=10 --output_file=results/multi.json
"""
from __future__ import annotations

import random
import sys

from ml_collections import ConfigDict

from lwm.evals import needle_run


def get_default_config() -> ConfigDict:
    c = needle_run.needle_flags()
    c.n_needles_total = 4
    c.n_needles_retrieve = 4
    c.max_new_tokens = 128                    # several numbers to write
    c.lock()
    return c


def main(argv=None) -> list:
    """Run the eval; returns every result (earlier ones in --output_file included)."""
    from lwm.evals import needle
    from lwm.cli.flags import parse_flags

    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    needle_run.check_flags(config)
    if not 1 <= config.n_needles_retrieve <= config.n_needles_total:
        raise ValueError(f"need 1 <= --n_needles_retrieve={config.n_needles_retrieve} <= "
                         f"--n_needles_total={config.n_needles_total}")
    lengths = needle.context_lengths(config.context_lengths_min, config.context_lengths_max,
                                     config.n_context_length_intervals)
    depths = needle.depth_percents(config.n_document_depth_intervals)
    if config.n_needles_total > len(depths):
        raise ValueError(f"--n_needles_total={config.n_needles_total} needles need as many distinct depths; "
                         f"raise --n_document_depth_intervals (now {config.n_document_depth_intervals})")
    mesh, tokenizer, engine = needle_run.setup(config)
    results = needle.load_results(config.output_file)
    done = frozenset((r["context_length"], r["seed"]) for r in results)
    print(f"multi-needle eval: {config.n_needles_total} needles, {config.n_needles_retrieve} asked; lengths "
          f"{lengths}; {config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    haystacks = needle.read_haystacks(config.haystack_file, config.n_rounds, max(lengths), tokenizer)
    trials = needle.multi_needle_trials(haystacks, tokenizer, lengths, depths, random.Random(config.seed),
                                        config.n_needles_total, config.n_needles_retrieve,
                                        config.final_context_length_buffer, done)
    title = f"{config.n_needles_retrieve} of {config.n_needles_total} needles"
    return needle_run.run_and_write(config, mesh, engine, tokenizer, trials, results, title=title)


if __name__ == "__main__":
    from lwm.inference.runtime import cli

    sys.exit(cli("lwm.eval_needle_multi", main, get_default_config, __doc__))
