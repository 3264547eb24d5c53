"""Flags -> (engine, tokenizer, vqgan, mesh) for `python -m lwm.serve`."""
from __future__ import annotations

from ml_collections import ConfigDict


def check_flags(config: ConfigDict) -> None:
    if config.modality not in ("text", "vision"):
        raise ValueError(f"--modality={config.modality!r}: choose text or vision")
    if not 0 <= config.port < 65536:
        raise ValueError(f"--port={config.port}: must be in [0, 65535]")
    if config.max_batch_size < 1:
        raise ValueError(f"--max_batch_size={config.max_batch_size}: must be >= 1")
    if config.max_queue < 0:
        raise ValueError(f"--max_queue={config.max_queue}: must be >= 0")
    if config.max_n_frames < 1:
        raise ValueError(f"--max_n_frames={config.max_n_frames}: must be >= 1")
    if config.default_max_tokens < 1:
        raise ValueError(f"--default_max_tokens={config.default_max_tokens}: must be >= 1")


def load_served(config: ConfigDict):
    import jax

    from lwm.checkpoint import parse_float_dtype
    from lwm.flags import model_config_from_flags
    from lwm.inference.engine import Engine
    from lwm.sharding import check_model_mesh, make_mesh
    from lwm.tokenizer import load_tokenizer

    check_flags(config)
    dtype = parse_float_dtype(config.dtype)
    if dtype is None:
        raise ValueError("--dtype is empty: use fp32, bf16 or fp16")
    tokenizer = load_tokenizer(config.tokenizer)
    vision = config.modality == "vision"
    flags = ConfigDict(dict(modality="vision,text" if vision else "text", load_llama_config=config.load_llama_config,
                            llama=config.llama, update_llama_config=config.update_llama_config))
    model_config = model_config_from_flags(flags, tokenizer)
    if vision:
        model_config = model_config.replace(sample_mode="text")
    mesh = make_mesh(config.mesh_dim)
    check_model_mesh(model_config, mesh)
    vqgan = None
    with jax.set_mesh(mesh):
        if vision:
            from lwm.vision_generation import load_vision_model
            from lwm.vqgan import VQGAN, VQGANConfig

            model, params = load_vision_model(model_config, config.load_checkpoint, dtype, mesh, config.seed)
            vqgan = VQGAN.load(config.vqgan_checkpoint or None, VQGANConfig.load(config.vqgan_config),
                               seed=config.seed)
        else:
            from lwm.sampling import load_model

            model, params = load_model(model_config, config.load_checkpoint, dtype, mesh)
    engine = Engine(model, params, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    vocab_size=tokenizer.vocab_size)
    return engine, tokenizer, vqgan, mesh
