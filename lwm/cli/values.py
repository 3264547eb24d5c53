"""One parser per kind of flag value, shared by every `python -m lwm.*` command.

Each parser takes the flag's name (for the message) and its text, returns the value (or the text, checked),
and raises FlagError naming the flag and what is accepted. Values are parsed as data, never evaluated.

    parse_literal_dict("update_llama_config", "dict(theta=5e7)")   # {'theta': 50000000.0}
    parse_mesh_dim("mesh_dim", "dp:1,fsdp:-1")                      # '1,-1,1,1'-style text, checked
    mesh_sizes("mesh_dim", "1,1,4,64")                              # (1, 1, 4, 64): no devices to fill a -1
    parse_modality("modality", "vision")                            # 'vision,text' (the canonical spelling)
    check_checkpoint_spec("load_checkpoint", "params::/ckpt/p")     # the text, if the file exists
    parse_length_list("seq_len", "128K,1M")                         # [131072, 1048576]
    parse_size("device_memory", "80GiB")                            # 85899345920.0; '80' is refused

`FLAG_KINDS` maps flag names to these parsers; lwm.cli.flags.parse_flags applies them to every command's
flags of that name, so `--mesh_dim` or `--update_llama_config` mean the same in every command.
"""
from __future__ import annotations

import ast
import json
import os
from typing import Callable

from lwm.model.registry import MODALITIES     # the one list of modalities


class FlagError(ValueError):
    """A command-line flag that does not exist or does not parse."""


def parse_bool(name: str, text: str) -> bool:
    """'true' | '1' | 'yes' | 't' -> True; 'false' | '0' | 'no' | 'f' -> False (any case)."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "t"):
        return True
    if lowered in ("false", "0", "no", "f"):
        return False
    raise FlagError(f"--{name}={text!r}: expected True or False")


def parse_literal_dict(text: str, flag: str = "update_llama_config") -> dict:
    """"dict(theta=5e7, max_sequence_length=32768)", "{'theta': 5e7}" or JSON '{"theta": 5e7}' -> dict.
    Literal values only: nothing is evaluated; anything else raises FlagError naming the flag."""
    text = str(text).strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except ValueError:
        pass
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise FlagError(f"--{flag}={text!r}: not a dict literal ({e.msg}); expected dict(key=value, ...), "
                        "a {'key': value} literal or a JSON object") from None
    try:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            if node.args or any(kw.arg is None for kw in node.keywords):
                raise ValueError("only keyword arguments are allowed in dict(...)")
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        if isinstance(node, ast.Dict):
            value = ast.literal_eval(node)
            if all(isinstance(k, str) for k in value):
                return value
            raise ValueError("keys must be strings")
    except ValueError as e:
        why = str(e) if not str(e).startswith("malformed node") else "a name, call or expression is not data"
        raise FlagError(f"--{flag}={text!r}: only literal values (numbers, strings, True/False/None, lists, "
                        f"dicts) are accepted ({why})") from None
    raise FlagError(f"--{flag}={text!r}: expected dict(key=value, ...), a {{'key': value}} literal or a JSON "
                    "object")


def _check_literal_dict(name: str, text: str) -> str:
    parse_literal_dict(text, name)
    return text


def parse_mesh_dim(name: str, text: str) -> str:
    """The mesh text, checked for syntax (lwm.parallel.sharding.parse_mesh_dim: four sizes dp,fsdp,tp,sp, one
    may be -1; or named 'dp:1,fsdp:-1,...'; a leading '!' allows splitting physical axes). The device count
    is checked when the mesh is built."""
    from lwm.parallel.sharding import MeshError, parse_mesh_dim as parse

    try:
        parse(str(text), None)
    except MeshError as e:
        raise FlagError(str(e).replace("--mesh_dim=", f"--{name}=", 1)) from None
    return text


def mesh_sizes(name: str, text: str) -> tuple[int, int, int, int]:
    """(dp, fsdp, tp, sp) from mesh text where no devices exist to fill a -1 (the memory planner): the same
    syntax as everywhere; a -1 raises FlagError saying why."""
    from lwm.parallel.sharding import MeshError, parse_mesh_dim as parse

    try:
        dims, _ = parse(str(text), None)
    except MeshError as e:
        raise FlagError(str(e).replace("--mesh_dim=", f"--{name}=", 1)) from None
    if -1 in dims:
        raise FlagError(f"--{name}={text!r}: -1 means 'the remaining devices', but the planner has no devices; "
                        "give every size (dp,fsdp,tp,sp)")
    return tuple(dims)


MODALITY_ALIASES = {"vision": "vision,text", "text,vision": "vision,text"}


def parse_modality(name: str, text: str) -> str:
    """'text' | 'vision,text' (the original's spellings); 'vision' and 'text,vision' mean 'vision,text'."""
    value = str(text).strip().replace(" ", "")
    value = MODALITY_ALIASES.get(value, value)
    if value not in MODALITIES:
        raise FlagError(f"--{name}={text!r}: expected text or vision,text (alias: vision)")
    return value


CHECKPOINT_KINDS = ("params", "trainstate", "trainstate_params", "flax_params", "orbax", "hf")


def check_checkpoint_spec(name: str, text: str) -> str:
    """'' or TYPE::PATH (TYPE in CHECKPOINT_KINDS) whose local PATH exists (a URL such as gs://... is left to
    the loader). Returns the text."""
    text = str(text)
    if not text:
        return text
    kind, sep, path = text.partition("::")
    if not sep or kind not in CHECKPOINT_KINDS:
        raise FlagError(f"--{name}={text!r}: expected TYPE::PATH with TYPE one of {', '.join(CHECKPOINT_KINDS)}")
    if not path:
        raise FlagError(f"--{name}={text!r}: the path after {kind}:: is empty")
    if "://" not in path and not os.path.exists(path):
        raise FlagError(f"--{name}={text!r}: {path} does not exist")
    return text


def check_dtype(name: str, text: str) -> str:
    """'' (where a flag allows it: the stored or default dtype) or a float dtype name (fp32, bf16, fp16, fp64
    or float32, bfloat16, float16, float64). Returns the text."""
    from lwm.checkpoint.formats import CheckpointError, parse_float_dtype

    if text == "":
        return text
    try:
        parse_float_dtype(str(text))
    except CheckpointError as e:
        raise FlagError(f"--{name}={text!r}: {str(e).split(' is ', 1)[-1]}") from None
    return text


def parse_int_list(name: str, text: str, minimum: int | None = None) -> list[int]:
    """'1024,2048' -> [1024, 2048]; each value >= minimum when given; at least one value."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise FlagError(f"--{name}={text!r}: expected comma-separated integers") from None
    if not values or (minimum is not None and min(values) < minimum):
        raise FlagError(f"--{name}={text!r}: give at least one value" + (f", each >= {minimum}" if minimum is not None
                                                                         else ""))
    return values


_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_length(name: str, text: str, minimum: int = 1) -> int:
    """A token count: '4096', '128K' (= 131072), '1M' (= 1048576), '1.5K'; K and M are powers of two
    (2^10, 2^20), as context lengths are quoted. FlagError naming the flag otherwise, or below `minimum`."""
    t = str(text).strip()
    unit = t[-1:].lower() if t[-1:].isalpha() else ""
    try:
        value = float(t[:len(t) - len(unit)]) * _SUFFIX[unit]
    except (KeyError, ValueError):
        raise FlagError(f"--{name}={text!r}: expected a token count such as 4096, 128K or 1M") from None
    if value != int(value) or value < minimum:
        raise FlagError(f"--{name}={text!r}: expected a whole number of tokens >= {minimum}")
    return int(value)


def parse_length_list(name: str, text: str, minimum: int = 1) -> list[int]:
    """'32K,128K,1M' -> [32768, 131072, 1048576] (parse_length of each); at least one value."""
    values = [parse_length(name, x, minimum) for x in str(text).split(",") if x.strip()]
    if not values:
        raise FlagError(f"--{name}={text!r}: give at least one length (4096, 128K, 1M, comma-separated)")
    return values


_BYTE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
               "tib": 2**40}


def parse_size(name: str, text: str, named: dict | None = None) -> float:
    """Bytes from a size with its unit ('80GiB', '95GB', '512MiB', '1.5e9B') or a name in `named`
    (name -> bytes, e.g. the memory planner's device table). A bare number is refused: '80' could be 80 bytes
    or 80 GiB. Raises FlagError naming the flag, the units and the names."""
    t = str(text).strip()
    if named and t.lower() in named:
        return float(named[t.lower()])
    number = t.rstrip("bBkKmMgGtTiI ")
    unit = t[len(number):].strip().lower()
    names = f" or one of {', '.join(sorted(named))}" if named else ""
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in _BYTE_UNITS or value <= 0:
        why = "a bare number has no unit; " if value is not None and not unit else ""
        raise FlagError(f"--{name}={text!r}: {why}give a size with its unit (80GiB, 95GB, 512MiB){names}")
    return value * _BYTE_UNITS[unit]


def parse_choice(name: str, text: str, choices) -> str:
    """`text` if it is one of `choices`, else FlagError listing them."""
    if text not in choices:
        raise FlagError(f"--{name}={text!r}: expected one of {', '.join(repr(c) if c == '' else str(c) for c in choices)}")
    return text


def check_cache_dtype(name: str, text: str) -> str:
    """'' (the model's dtype) or a KV-cache dtype name: the float ones of check_dtype, or int8 / fp8
    (lwm.utils.dtypes.parse_cache_dtype). Returns the text."""
    from lwm.utils.dtypes import parse_cache_dtype

    try:
        parse_cache_dtype(str(text), what=f"--{name}")
    except ValueError as e:
        raise FlagError(str(e)) from None
    return text


# Flag name -> parser of its value (run as the flag is set, before anything is loaded or compiled).
FLAG_KINDS: dict[str, Callable[[str, str], object]] = {
    "update_llama_config": _check_literal_dict,
    "mesh_dim": parse_mesh_dim,
    "eval_mesh_dim": parse_mesh_dim,
    "modality": parse_modality,
    "load_checkpoint": check_checkpoint_spec,
    "dtype": check_dtype,
    "cache_dtype": check_cache_dtype,
}

# The original's (and older) spellings -> this codebase's flag; applied where the command has the target
# and not the alias itself.
ALIASES = {
    "tokenizer.vocab_file": "tokenizer",
    "llama_config": "load_llama_config",
    "sp_strategy": "context_parallel_strategy",
    "load_balance": "context_parallel_load_balance",
}
