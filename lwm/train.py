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
from lwm.parallel import distributed
from lwm.training import metrics
from lwm.training import optimizer as optimizer_lib
from lwm.training.dataset import DatasetFactory
from lwm.training.loop import TrainingDiverged, train
from lwm.utils.logs import quiet_absent_backends

__all__ = ["get_default_config", "parse_flags", "main", "cli", "train", "TrainingDiverged"]

logger = logging.getLogger("lwm.train")


# --------------------------------------------------------------------------------------------- flags

def get_default_config() -> ConfigDict:
    """Every flag and its default; the names are the original LWM's."""
    c = ConfigDict()
    c.modality = "text"                        # 'text' | 'vision,text'
    c.use_data_sharded_loader = True           # each process builds only its share of every batch (the one switch:
    #                                            lwm.training.loop.data_sharded_loader)
    c.seed = 42
    c.mesh_dim = "1,-1,1,1"                    # dp, fsdp, tp, sp
    c.dtype = "fp32"                           # compute dtype (parameters and optimizer stay fp32)
    c.total_steps = 10000
    c.load_llama_config = ""                   # a preset ('tiny', 'debug', '7b', ...) or json::path
    c.update_llama_config = ""                 # "dict(theta=...,max_sequence_length=...)" or a dict/JSON literal
    c.load_checkpoint = ""                     # params::PATH | trainstate::PATH | trainstate_params::PATH | ...
    c.load_dataset_state = ""                  # a dataset.pkl / dataset.json / checkpoint folder
    c.log_freq = 50
    c.save_model_freq = 0
    c.save_milestone_freq = 0
    c.eval_steps = 0                           # eval batches per log step (eval_dataset.*)
    c.tokenizer = "LargeWorldModel/LWM-Text-1M"  # tokenizer.model, a folder, or a hub id in the local cache
    c.train_dataset = DatasetFactory.get_default_config()
    c.eval_dataset = DatasetFactory.get_default_config()
    c.optimizer = optimizer_lib.get_default_config()
    c.checkpointer = ConfigDict(dict(
        float_dtype="",                        # '' keeps every tensor's dtype (exact resume); 'bf16' as the original
        save_optimizer_state=False,            # the whole train state (needed for exact resume) or params only
        format="streaming",                    # 'streaming' (the original's files) | 'orbax' (sharded)
        keep=1,                                # regular checkpoints kept; milestones are never removed
    ))
    c.llama = ConfigDict()                     # --llama.<field>=value: any model config field
    c.logger = metrics.get_default_config()
    c.log_all_worker = False
    c.jax_distributed = ConfigDict(distributed.default_flags())
    c.autoresume = False                       # continue from the newest complete checkpoint in the output folder
    c.loss_chunk_size = 1024                   # tokens per chunk of the blockwise cross-entropy
    c.peak_flops = 0.0                         # FLOP/s of the run's hardware for MFU; 0 = measure a matmul
    c.lock()
    return c


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
