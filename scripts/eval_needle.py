"""Single-needle retrieval eval: a thin wrapper over `python -m lwm.eval_needle` (same flags; see that module).

Hardware: one CPU for the tiny/debug presets; a TPU/GPU slice for 7B at 100K+ tokens.
    python scripts/eval_needle.py --load_llama_config=7b --load_checkpoint=params::/ckpt/streaming_params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --output_file=results/needle.json
"""
import sys

from lwm.eval_needle import get_default_config, main  # noqa: F401  (importable as before)

if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("scripts/eval_needle.py", main, get_default_config, __doc__))
