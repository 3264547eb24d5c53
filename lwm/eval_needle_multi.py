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
    from lwm.cli.command import parse

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    return needle_run.run(config, multi=True)


if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("lwm.eval_needle_multi", main, get_default_config, __doc__))
