"""`python -m lwm.eval_needle`: single-needle retrieval eval ("needle in a haystack") with the original LWM's
flags (scripts/eval_needle.py is a thin wrapper over this module).

Hardware: one CPU for the tiny/debug presets (a 4K-token prompt of `debug` takes well under a second); a
TPU/GPU slice for 7B at 100K+ tokens. Writes every trial to --output_file (JSON) and the accuracy heatmap
by context length and depth next to it (--heatmap_file, default: output_file with .png).
    python -m lwm.eval_needle --load_llama_config=7b --load_checkpoint=params::/ckpt/streaming_params \
        --tokenizer=/ckpt/tokenizer.model --haystack_file=data/pg19.jsonl --output_file=results/needle.json \
        --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" --context_lengths_max=128000
The haystack before the needle is reused across depths through the prefix cache (--prefix_cache_mb, default -1:
on where the mesh has dp = fsdp = 1, e.g. --mesh_dim=1,1,1,-1; docs/long_context.md); the results are the same.
An existing --output_file is resumed: trials already in it are skipped. Several hosts: the same command on
each, with --jax_distributed.coordinator_address, num_processes and process_id (docs/needle.md).
"""
from __future__ import annotations

import sys

from ml_collections import ConfigDict

from lwm.evals import needle_run


def get_default_config() -> ConfigDict:
    c = needle_run.needle_flags()
    c.lock()
    return c


def main(argv=None) -> list:
    """Run the eval; returns every result (earlier ones in --output_file included)."""
    from lwm.cli.command import parse

    config = parse(sys.argv[1:] if argv is None else argv, get_default_config())
    return needle_run.run(config, multi=False)


if __name__ == "__main__":
    from lwm.cli.command import cli

    sys.exit(cli("lwm.eval_needle", main, get_default_config, __doc__))
