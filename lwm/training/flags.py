"""The flags of `python -m lwm.train` and their defaults (the original LWM's names), as a library: the entry
point (lwm/train.py) parses them, and lwm.tools.extension builds each stage's run from them.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from lwm.parallel import distributed
from lwm.training import metrics
from lwm.training import optimizer as optimizer_lib
from lwm.training.dataset import DatasetFactory


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
