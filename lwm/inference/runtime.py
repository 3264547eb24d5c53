"""The one runtime set-up of the inference entry points: flags shared by all of them, then jax.distributed
(from --jax_distributed.*), the tokenizer, the dtype, the model config and the ('dp','fsdp','tp','sp') mesh
from --mesh_dim; and the command-line wrapper that answers --help and turns bad input into one line.

    defaults = runtime_flags(ConfigDict(), tokenizer="LargeWorldModel/LWM-Text-Chat-1M")
    rt = setup(parse_flags(argv, defaults), modality="text")
    with jax.set_mesh(rt.mesh):
        model, params = load_model(rt.model_config, config.load_checkpoint, rt.dtype, rt.mesh)

Entry points: `if __name__ == "__main__": sys.exit(cli("lwm.text_chat", main, get_default_config))`.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from typing import Callable, Optional

from ml_collections import ConfigDict

from lwm.parallel import distributed

# What a user can get wrong (a flag, a file, a length, the mesh): ValueError covers FlagError,
# CheckpointError, PromptTooLongError, MeshError and DataFormatError; OSError covers missing or
# unreadable files; UnpicklingError a pickle that lwm.utils.safe_pickle refuses. LWM_DEBUG=1 shows the
# traceback instead.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


def runtime_flags(c: ConfigDict, *, tokenizer: str) -> ConfigDict:
    """Add the flags every inference entry point shares (the original's names and defaults) to `c`."""
    c.mesh_dim = "1,-1,1,1"                    # dp, fsdp, tp, sp (-1: the remaining devices)
    c.dtype = "fp32"                           # fp32 | bf16 | fp16 for the language model
    c.cache_dtype = ""                         # KV cache dtype (fp32 | bf16 | fp16); '' = the model's (--dtype)
    c.load_llama_config = ""                   # preset ('tiny', 'debug', '7b', ...) or json::path
    c.update_llama_config = ""                 # "dict(theta=50000000, max_sequence_length=32768)": literals only
    c.load_checkpoint = ""                     # params::PATH, trainstate_params::, flax_params::, orbax::DIR
    c.tokenizer = tokenizer                    # tokenizer.model, a folder, or a hub id in the local cache
    c.llama = ConfigDict()                     # --llama.<field>=value
    c.jax_distributed = ConfigDict(distributed.default_flags())
    return c


def vision_flags(c: ConfigDict) -> ConfigDict:
    """`runtime_flags` plus what both vision entry points (lwm.vision_chat, lwm.vision_generation) share."""
    c.prompt = ""
    c.vqgan_checkpoint = ""                    # the released pickle or a .msgpack; '' = random weights (demos)
    c.vqgan_config = "released"                # VQGAN preset ('released', 'tiny') or json::path
    c.seed = 1234
    return runtime_flags(c, tokenizer="LargeWorldModel/LWM-Text-1M")


def parse(argv, defaults: ConfigDict) -> ConfigDict:
    """The entry points' flags (lwm.cli.flags.parse_flags) on `defaults`; `--tokenizer.vocab_file=X` (the
    original scripts' spelling) means --tokenizer=X."""
    import re

    from lwm.cli.flags import parse_flags

    argv = [re.sub(r"^--tokenizer\.vocab_file(?==|$)", "--tokenizer", a) for a in argv]
    return parse_flags(list(argv), defaults)


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
    """'fp32' | 'bf16' | 'fp16' (or numpy names) -> a numpy dtype; raises ValueError naming --dtype."""
    from lwm.checkpoint.formats import parse_float_dtype

    try:
        dtype = parse_float_dtype(name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--dtype={name!r}: {e}") from None
    if dtype is None:
        raise ValueError("--dtype is empty: use fp32, bf16 or fp16")
    return dtype


def setup(config: ConfigDict, modality: str = "text", sample_mode: Optional[str] = None) -> Runtime:
    """jax.distributed (when --jax_distributed.* or LWM_* ask for it; before any other JAX call), the dtype,
    the tokenizer, the model config (--load_llama_config, --llama.*, --update_llama_config, the tokenizer's
    ids; `sample_mode` for the vision model) and the mesh, checked against the model's heads."""
    import jax

    from lwm.cli.flags import model_config_from_flags
    from lwm.parallel.sharding import check_model_mesh, make_mesh
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
    except (ValueError, AssertionError) as e:
        raise ValueError(f"--mesh_dim={config.mesh_dim!r} over {jax.device_count()} devices: {e}") from None
    check_model_mesh(model_config, mesh)
    return Runtime(tokenizer, dtype, mesh, model_config)


def usage(prog: str, defaults: ConfigDict, doc: str = "") -> str:
    """The entry point's docstring, then every flag with its default."""
    from lwm.cli.flags import get_flag, known_flags

    lines = [doc.strip(), ""] if doc else []
    lines.append(f"python -m {prog} [--flag=value ...]; flags and defaults:")
    for name in known_flags(defaults):
        lines.append("  --llama.<field>=value   (any model config field)" if name == "llama"
                     else f"  --{name}={get_flag(defaults, name)!r}")
    return "\n".join(lines)


def cli(prog: str, main: Callable, get_default_config: Callable[[], ConfigDict], doc: str = "",
        argv=None) -> int:
    """Run `main(argv)` as a command: --help / -h prints `usage`; a user error (USER_ERRORS) prints
    "{prog}: error: {message}" on one line to stderr and returns 2 (LWM_DEBUG=1 re-raises it); Ctrl-C
    returns 130. Returns 0 otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage(prog, get_default_config(), doc))
        return 0
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get("LWM_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
