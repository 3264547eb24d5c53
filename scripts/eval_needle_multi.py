"""Multi-needle retrieval eval: n_needles_total needles (distinct cities, distinct random depths) in each
haystack, the question asks for n_needles_retrieve of them; a needle counts as found when the response
contains its number. Flags as scripts/eval_needle.py, plus --n_needles_total and --n_needles_retrieve.

Hardware: as eval_needle.py. Writes every trial to --output_file and a heatmap of per-needle accuracy by
context length and that needle's depth.
    python scripts/eval_needle_multi.py --load_llama_config=7b --load_checkpoint=params::/ckpt/params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --n_needles_total=4 \
        --n_needles_retrieve=2 --n_document_depth_intervals=10 --output_file=results/multi.json
"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_needle  # noqa: E402  (the sibling script: flags and model set-up)


def get_default_config():
    c = eval_needle.get_default_config()
    c.n_needles_total = 4
    c.n_needles_retrieve = 4
    c.max_new_tokens = 128                    # several numbers to write
    return c


def main(argv=None) -> list:
    import jax

    from lwm import needle
    from lwm.train import parse_flags

    config = parse_flags(list(sys.argv[1:] if argv is None else argv), get_default_config())
    eval_needle.check_flags(config)
    if not 1 <= config.n_needles_retrieve <= config.n_needles_total:
        raise ValueError(f"need 1 <= --n_needles_retrieve={config.n_needles_retrieve} <= "
                         f"--n_needles_total={config.n_needles_total}")
    lengths = needle.context_lengths(config.context_lengths_min, config.context_lengths_max,
                                     config.n_context_length_intervals)
    depths = needle.depth_percents(config.n_document_depth_intervals)
    if config.n_needles_total > len(depths):
        raise ValueError(f"--n_needles_total={config.n_needles_total} needles need as many distinct depths; "
                         f"raise --n_document_depth_intervals (now {config.n_document_depth_intervals})")
    mesh, tokenizer, sampler = eval_needle.setup(config)
    is_main = jax.process_index() == 0
    results = needle.load_results(config.output_file)
    done = frozenset((r["context_length"], r["seed"]) for r in results)
    print(f"multi-needle eval: {config.n_needles_total} needles, {config.n_needles_retrieve} asked; lengths "
          f"{lengths}; {config.n_rounds} rounds; {len(done)} trials already in {config.output_file}")
    haystacks = needle.read_haystacks(config.haystack_file, config.n_rounds, max(lengths), tokenizer)
    trials = needle.multi_needle_trials(haystacks, tokenizer, lengths, depths, random.Random(config.seed),
                                        config.n_needles_total, config.n_needles_retrieve,
                                        config.final_context_length_buffer, done)
    save = (lambda rs: needle.write_json(config.output_file, rs)) if is_main else None
    with jax.set_mesh(mesh):
        results = needle.run_trials(trials, sampler, tokenizer, max_tokens_per_batch=config.max_tokens_per_batch,
                                    max_new_tokens=config.max_new_tokens, results=results, on_batch=save,
                                    progress=config.progress and is_main)
    if is_main:
        needle.write_json(config.output_file, results)
        heatmap = config.heatmap_file or os.path.splitext(config.output_file)[0] + ".png"
        needle.plot_heatmap(results, heatmap, title=f"{config.n_needles_retrieve} of {config.n_needles_total} needles")
        print(needle.summary_table(results))
        print(f"results: {os.path.abspath(config.output_file)}\nheatmap: {os.path.abspath(heatmap)}")
    return results


if __name__ == "__main__":
    main()
