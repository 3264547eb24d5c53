"""Multi-needle retrieval eval: a thin wrapper over `python -m lwm.eval_needle_multi` (same flags; see that
module).

Hardware: as scripts/eval_needle.py.
    python scripts/eval_needle_multi.py --load_llama_config=7b --load_checkpoint=params::/ckpt/params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --n_needles_total=4 \
        --n_needles_retrieve=2 --n_document_depth_intervals=10 --output_file=results/multi.json
"""
import sys

from lwm.eval_needle_multi import get_default_config, main  # noqa: F401  (importable as before)

if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("scripts/eval_needle_multi.py", main, get_default_config, __doc__))
