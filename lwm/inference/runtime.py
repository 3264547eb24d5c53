"""The one runtime set-up of the inference entry points: flags shared by all of them, then jax.distributed
(from --jax_distributed.*), the tokenizer, the dtype, the model config and the ('dp','fsdp','tp','sp') mesh
from --mesh_dim. The command line itself (--help, parsing, the one-line errors) is lwm.cli.command. No other
inference module starts jax.distributed or builds a mesh (tests/test_one_home.py::test_rule_holds[runtime_setup]).

    defaults = runtime_flags(ConfigDict(), tokenizer="LargeWorldModel/LWM-Text-Chat-1M")
    rt = setup(parse(argv, defaults), modality="text")
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, config.load_checkpoint, rt.dtype, rt.mesh)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ml_collections import ConfigDict

from lwm.parallel import distributed


def runtime_flags(c: ConfigDict, *, tokenizer: str) -> ConfigDict:
    """Add the flags every inference entry point shares (the original's names and defaults) to `c`."""
    c.mesh_dim = "1,-1,1,1"                    # dp, fsdp, tp, sp (-1: the remaining devices)
    c.dtype = "fp32"                           # fp32 | bf16 | fp16 for the language model
    c.cache_dtype = ""                         # KV cache dtype (fp32 | bf16 | fp16 | int8 | fp8); '' = the model's
    c.prefix_cache_mb = -1                     # prefix cache budget, MiB; -1: a quarter of free memory; 0: off
    c.prefix_cache_block = 0                   # tokens per prefix-cache block; 0: the model's decode_chunk_size
    c.prefill_chunk = 0                        # tokens per prefill chunk; 0: whole prompts (2048 with a prefix cache)
    c.load_llama_config = ""                   # preset ('tiny', 'debug', '7b', ...) or json::path
    c.update_llama_config = ""                 # "dict(theta=50000000, max_sequence_length=32768)": literals only
    c.load_checkpoint = ""                     # params::PATH, trainstate_params::, flax_params::, orbax::DIR
    c.tokenizer = tokenizer                    # tokenizer.model, a folder, or a hub id in the local cache
    c.llama = ConfigDict()                     # --llama.<field>=value
    c.jax_distributed = ConfigDict(distributed.default_flags())
    return c


def vision_flags(c: ConfigDict) -> ConfigDict:
    """`runtime_flags` plus what the vision commands (lwm.vision_chat, lwm.vision_generation, lwm.serve,
    lwm.eval_visual_needle) share."""
    c.vqgan_checkpoint = ""                    # the released pickle or a .msgpack; '' = random weights (demos)
    c.vqgan_config = "released"                # VQGAN preset ('released', 'tiny') or json::path
    c.seed = 1234
    return runtime_flags(c, tokenizer="LargeWorldModel/LWM-Text-1M")


def prefix_cache_from_flags(engine, config: ConfigDict):
    """The PrefixCache that --prefix_cache_mb and --prefix_cache_block ask for on `engine`
    (`Engine.prefix_cache`), or None for --prefix_cache_mb=0. Raises ValueError (one line naming the flag) for a
    negative budget other than -1, a block that is not a multiple of decode_chunk_size, or a budget that holds
    no block."""
    mb = float(config.prefix_cache_mb)
    if mb == 0:
        return None
    if mb < 0 and mb != -1:
        raise ValueError(f"--prefix_cache_mb={config.prefix_cache_mb}: give MiB >= 0 (0 turns it off) or -1 "
                         "(a quarter of the free device memory)")
    block = int(config.prefix_cache_block) or None
    return engine.prefix_cache(None if mb < 0 else int(mb * 2**20), block)


def prefill_chunk_from_flags(engine, config: ConfigDict):
    """--prefill_chunk as `Engine.prefill`'s chunk: None for 0 (whole prompts), else checked now (a positive
    multiple of sp; ValueError naming the flag) so nothing compiles first."""
    chunk = int(config.prefill_chunk)
    if chunk == 0:
        return None
    engine.check_chunking(chunk)
    return chunk


def unused_cache_flags(config: ConfigDict, why: str, say=print) -> None:
    """Say once (one line through `say`) that --prefix_cache_mb / --prefix_cache_block / --prefill_chunk, where
    given other than their defaults, do not apply to this command; `why` names what, e.g. "the PyTorch path
    (--hf_model)" or "frame generation (its guidance rule draws from every row's logits at once)"."""
    given = [f"--{name}={config[name]}" for name, default in (("prefix_cache_mb", -1), ("prefix_cache_block", 0),
                                                               ("prefill_chunk", 0)) if config[name] != default]
    if given:
        say(f"{', '.join(given)}: not used by {why}")


def check_budget(prompt_len: int, new_tokens: int, max_sequence_length: int, what: str) -> None:
    """PromptTooLongError (naming `what`, e.g. the flags) unless prompt + new tokens fit the model's
    positions; the entry points call it before anything is loaded or compiled."""
    from lwm.inference.sampling import PromptTooLongError

    if prompt_len + new_tokens > max_sequence_length:
        raise PromptTooLongError(
            f"{what}: a prompt of {prompt_len} tokens + {new_tokens} new tokens = {prompt_len + new_tokens} exceeds "
            f"the model's max_sequence_length={max_sequence_length}; lower it, or raise max_sequence_length "
            "(--update_llama_config=\"dict(max_sequence_length=N)\")")


@dataclasses.dataclass
class Runtime:
    tokenizer: object
    dtype: object                              # a numpy floating dtype
    mesh: object                               # jax.sharding.Mesh over ('dp', 'fsdp', 'tp', 'sp')
    model_config: object                       # LLaMAConfig or VisionLLaMAConfig


def parse_dtype(name: str):
    """'fp32' | 'bf16' | 'fp16' (or the long names; the one table, lwm.utils.dtypes) -> a numpy dtype;
    raises ValueError naming --dtype."""
    from lwm.utils.dtypes import parse_float_dtype

    dtype = parse_float_dtype(name, what="--dtype")
    if dtype is None:
        raise ValueError("--dtype is empty: use fp32, bf16 or fp16")
    return dtype


def setup(config: ConfigDict, modality: str = "text", sample_mode: Optional[str] = None) -> Runtime:
    """jax.distributed (when --jax_distributed.* or LWM_* ask for it; before any other JAX call), the dtype,
    the tokenizer, the model config (--load_llama_config, --llama.*, --update_llama_config, the tokenizer's
    ids) and the mesh, checked against the model's heads. sample_mode ('text' | 'vision', the old way of
    choosing the sampled head, still accepted): set on the vision model's config, where it only supplies an
    Engine's default head (`Engine(head=...)` and the calls' `head=` choose it without rebuilding the model)."""
    import jax

    from lwm.cli.flags import model_config_from_flags
    from lwm.parallel.sharding import MeshError, check_model_mesh, make_mesh
    from lwm.text.tokenizer import load_tokenizer

    distributed.initialize(distributed.config_from_flags(config.jax_distributed))
    dtype = parse_dtype(config.dtype)
    tokenizer = load_tokenizer(config.tokenizer)
    view = ConfigDict(dict(modality=modality, load_llama_config=config.load_llama_config, llama=config.llama,
                           update_llama_config=config.update_llama_config))
    model_config = model_config_from_flags(view, tokenizer)
    if sample_mode is not None:
        model_config = model_config.replace(sample_mode=sample_mode)
    try:
        mesh = make_mesh(config.mesh_dim)
    except MeshError:
        raise                                   # names --mesh_dim=... and the device count already
    except (ValueError, AssertionError) as e:
        raise ValueError(f"--mesh_dim={config.mesh_dim!r} over {jax.device_count()} devices: {e}") from None
    try:
        check_model_mesh(model_config, mesh)
    except MeshError as e:                      # the model's heads, not the flag: say which flag to change
        raise MeshError(f"--mesh_dim={config.mesh_dim!r}: {e}") from None
    return Runtime(tokenizer, dtype, mesh, model_config)
