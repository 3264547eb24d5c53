"""Command-line flags shared by every entry point: the original LWM's `--a.b=value` syntax on ConfigDicts.

Entry points (`lwm.train`, `lwm.vision_generation`, `lwm.vision_chat`, `lwm.text_chat`, the needle evals)
define their defaults as a locked ConfigDict and call `parse_flags(argv, defaults)`; an unknown flag fails
with the closest known names. `update_llama_config` strings are parsed as literal data, never evaluated.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import os
import sys
from typing import Any, Optional

from ml_collections import ConfigDict

from lwm.model.registry import model_config_class


class FlagError(ValueError):
    """A command-line flag that does not exist or does not parse."""


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "t"):
        return True
    if lowered in ("false", "0", "no", "f"):
        return False
    raise FlagError(f"--{name}={text!r}: expected True or False")


def convert_value(name: str, text: Any, template: Any, template_type: Optional[type] = None) -> Any:
    """A flag's text -> the type of its default (`template`); None defaults take a Python literal or text."""
    if not isinstance(text, str):
        return text
    kind = template_type or (type(template) if template is not None else None)
    if kind is bool:
        return _parse_bool(name, text)
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:
        raise FlagError(f"--{name}={text!r}: expected {kind.__name__}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def known_flags(config: ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ConfigDict) and key != "llama":
            names += known_flags(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def set_flag(config: ConfigDict, name: str, text: Any) -> None:
    """config[name] = text converted to the field's type; `llama.<field>` is checked later, against the
    model config. Unknown names raise FlagError with the closest known ones."""
    node, parts = config, name.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if node is config.llama and len(parts) == 2:
            with config.llama.unlocked():
                config.llama[part] = text
            return
        if not isinstance(node, ConfigDict) or part not in node:
            close = difflib.get_close_matches(name, known_flags(config), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise FlagError(f"unknown flag --{name}{hint}")
        if last:
            if isinstance(node[part], ConfigDict):
                raise FlagError(f"--{name} is a group of flags; set its fields (--{name}.<field>=...)")
            ref = node._fields.get(part)
            ref_type = ref.get_type() if hasattr(ref, "get_type") else None
            try:
                node[part] = convert_value(name, text, node[part], ref_type)
            except TypeError as e:
                raise FlagError(f"--{name}={text!r}: {e}") from None
            return
        node = node[part]


def _program() -> str:
    """How this process was started: 'python -m lwm.text_chat' or 'python eval_needle.py'."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else f"python {os.path.basename(sys.argv[0])}"


def usage(config: ConfigDict, prog: str = "") -> str:
    """Every flag of `config` with its default, one per line (what `--help` prints)."""
    lines = [f"{prog or 'usage'} [--flag=value ...]; flags and defaults:"]
    for name in known_flags(config):
        lines.append(f"  --{name}={get_flag(config, name)!r}" if name != "llama" else
                     "  --llama.<field>=value   (any model config field)")
    return "\n".join(lines)


def parse_flags(argv: list[str], config: ConfigDict, prog: str = "") -> ConfigDict:
    """`--name=value`, `--name value`, `--name` / `--noname` (booleans) applied to `config` (a locked
    ConfigDict of defaults). Returns the updated config. `--help` / `-h` prints `usage(config, prog)` to
    stdout and exits 0, as argparse does."""
    if "--help" in argv or "-h" in argv:
        print(usage(config, prog or _program()))
        raise SystemExit(0)
    known = set(known_flags(config))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unexpected argument {arg!r}: flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if name not in known and name.startswith("no") and name[2:] in known:
                name, value = name[2:], "false"
            elif name in known and isinstance(get_flag(config, name), bool):
                value = "true"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, value = i + 1, argv[i + 1]
            else:
                raise FlagError(f"--{name} needs a value (--{name}=...)")
        set_flag(config, name, value)
        i += 1
    return config


def get_flag(config: ConfigDict, name: str) -> Any:
    for part in name.split("."):
        config = config[part]
    return config


def parse_literal_dict(text: str, flag: str = "update_llama_config") -> dict:
    """"dict(theta=5e7, max_sequence_length=32768)", "{'theta': 5e7}" or JSON -> dict. Literal values only:
    nothing is evaluated; anything else raises naming the flag."""
    text = text.strip()
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
        raise FlagError(f"--{flag}={text!r}: not a dict literal ({e.msg})") from None
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
        raise FlagError(f"--{flag}={text!r}: only literal values are accepted ({e})") from None
    raise FlagError(f"--{flag}={text!r}: expected dict(key=value, ...) or a {{'key': value}} literal")


def model_config_from_flags(config: ConfigDict, tokenizer=None):
    """load_llama_config, then --llama.* overrides, then update_llama_config, then the tokenizer's ids."""
    cls = model_config_class(config.modality)
    model_config = cls.load(config.load_llama_config) if config.load_llama_config else cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    overrides = {}
    for key, text in config.llama.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise FlagError(f"unknown flag --llama.{key}: not a {cls.__name__} field"
                            + (f"; did you mean {', '.join('llama.' + c for c in close)}?" if close else ""))
        overrides[key] = convert_value(f"llama.{key}", text, getattr(model_config, key))
    updates = parse_literal_dict(config.update_llama_config)
    for source, values in (("--llama.*", overrides), ("--update_llama_config", updates)):
        try:
            model_config = model_config.replace(**values)
        except (ValueError, TypeError) as e:
            raise FlagError(f"{source}: {e}") from None
    if tokenizer is not None:
        model_config = model_config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                            vocab_size=max(model_config.vocab_size, tokenizer.vocab_size))
    return model_config
