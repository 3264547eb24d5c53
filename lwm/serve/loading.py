"""Flags -> (engine, tokenizer, vqgan, mesh) for `python -m lwm.serve`: the one runtime set-up
(lwm.inference.runtime) and the one loader (lwm.inference.loader)."""
from __future__ import annotations

from ml_collections import ConfigDict


def check_flags(config: ConfigDict) -> None:
    """ValueError naming the flag, before anything is loaded."""
    is_vision(config)
    if not 0 <= config.port < 65536:
        raise ValueError(f"--port={config.port}: must be in [0, 65535]")
    for flag, low in (("max_batch_size", 1), ("max_queue", 0), ("max_n_frames", 1), ("default_max_tokens", 1),
                      ("max_body_bytes", 1), ("max_image_bytes", 1), ("max_video_pixels", 1), ("max_chars_per_token", 1),
                      ("keep_alive_s", 1), ("max_step_tokens", 0),
                      ("max_connections", 0)):
        if config[flag] < low:
            raise ValueError(f"--{flag}={config[flag]}: must be >= {low}")
    for flag in ("header_timeout_s", "body_timeout_s"):
        if not config[flag] > 0:                       # NaN included
            raise ValueError(f"--{flag}={config[flag]}: must be > 0 seconds")


def is_vision(config: ConfigDict) -> bool:
    """--modality through the one modality parser (lwm.cli.values; tests/test_one_home.py::
    test_rule_holds[modality_parser]): 'text', or 'vision,text' (alias 'vision'); FlagError otherwise."""
    from lwm.cli.values import parse_modality

    return parse_modality("modality", config.modality) == "vision,text"


def load_served(config: ConfigDict):
    import jax

    from lwm.inference import runtime
    from lwm.inference.engine import Engine
    from lwm.inference.loader import load_model

    check_flags(config)
    vision = is_vision(config)
    rt = runtime.setup(config, modality="vision,text" if vision else "text",
                       sample_mode="text" if vision else None)
    if jax.process_count() > 1:                   # across hosts: every process's flags are process 0's
        from lwm.serve.replicated import check_same_flags

        check_same_flags(config)
    vqgan = None
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, config.load_checkpoint, rt.dtype, rt.mesh,
                                   random_if_empty=vision, seed=config.seed)
    if vision:
        from lwm.model.vqgan import VQGAN, VQGANConfig

        vqgan = VQGAN.load(config.vqgan_checkpoint or None, VQGANConfig.load(config.vqgan_config), seed=config.seed)
    engine = Engine(model, params, eos_id=rt.tokenizer.eos_id, pad_id=rt.tokenizer.pad_id,
                    vocab_size=rt.tokenizer.vocab_size, cache_dtype=config.cache_dtype or None)
    return engine, rt.tokenizer, vqgan, rt.mesh


def prefill_settings(engine, config: ConfigDict, mesh=None) -> tuple:
    """(prefix_cache, prefill_chunk, max_step_tokens) for the scheduler from --prefix_cache_mb,
    --prefix_cache_block, --prefill_chunk and --max_step_tokens (`lwm.inference.runtime.prefix_cache_from_flags`,
    `prefill_chunk_from_flags`): None, None, None for a whole batched prefill. Checked under the server's mesh
    (a chunk must divide by its sp), after the weights are read and before anything compiles; ValueError, one
    line naming the flag (a budget that holds no block, a block that is not a multiple of decode_chunk_size, a
    chunk that is not a multiple of sp). Across hosts (jax.process_count() > 1) every process checks the same
    flags here alike; process 0 then makes the cache on every process (`ReplicatedEngine.prefix_cache` with
    this cache's budget and block, lwm.serve.__main__) and the followers drop theirs."""
    import contextlib

    import jax

    from lwm.inference import runtime

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        cache = runtime.prefix_cache_from_flags(engine, config)
        chunk = runtime.prefill_chunk_from_flags(engine, config)
    return cache, chunk, int(config.max_step_tokens) or None
