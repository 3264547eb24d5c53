"""`python -m lwm.train`: train the text or vision+text LWM with the original's flags.

    python -m lwm.train --modality=text --mesh_dim=1,-1,1,1 --load_llama_config=tiny --total_steps=100 \
        --tokenizer=/data/tokenizer.model --train_dataset.type=json \
        --train_dataset.text_processor.fields=text --train_dataset.json_dataset.path=/data/train.jsonl \
        --logger.output_dir=/runs --logger.experiment_id=demo --logger.append_uuid=False --autoresume=True

From Python: `lwm.train.main(["--modality=text", ...])` or `lwm.train.train(config)` with a ConfigDict from
`get_default_config()`. This module holds the flags only; the run (setup, restore, the loop) is
`lwm.training.loop`, the step functions and their shardings `lwm.training.steps` and `lwm.training.compile`.
See docs/train.md.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from ml_collections import ConfigDict

from lwm.cli import command
from lwm.cli.flags import FlagError  # noqa: F401  (lwm.train.FlagError, as before)
from lwm.training.flags import get_default_config   # the flags and defaults (a library: lwm.tools.extension reads them)
from lwm.training.loop import TrainingDiverged, train
from lwm.utils.logs import quiet_absent_backends

__all__ = ["get_default_config", "parse_flags", "main", "cli", "train", "TrainingDiverged"]

logger = logging.getLogger("lwm.train")


# --------------------------------------------------------------------------------------------- flags


def parse_flags(argv: list[str], config: Optional[ConfigDict] = None) -> ConfigDict:
    """Training flags on top of `get_default_config()` (lwm.cli.command.parse: the one flag parser;
    tests/test_one_home.py::test_rule_holds[flag_parser])."""
    return command.parse(argv, config if config is not None else get_default_config())


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse flags (default: sys.argv[1:]) and train. `--help` prints the flags and returns {}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(command.usage("lwm.train", get_default_config(), __doc__))
        return {}
    return train(parse_flags(argv))


def _run(argv: list[str]) -> None:
    try:
        main(argv)
    except TrainingDiverged as e:
        print(f"lwm.train: stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cli(argv: Optional[list[str]] = None) -> int:
    """`python -m lwm.train`: lwm.cli.command.cli (bad flags or files: one line, exit 2); a diverged run
    exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_absent_backends()          # no "Unable to initialize backend 'tpu'" line on machines without a TPU
    return command.cli("lwm.train", _run, get_default_config, __doc__, argv)


if __name__ == "__main__":
    sys.exit(cli())
