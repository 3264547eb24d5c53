"""Command-line flags shared by every entry point: the original LWM's `--a.b=value` syntax on ConfigDicts.

Every `python -m lwm.*` command defines its defaults as a locked ConfigDict and calls
`parse_flags(argv, defaults)` (through lwm.cli.command.cli); an unknown flag fails with the closest known
names. A flag's text becomes the type of its default; flags of a known kind (`--mesh_dim`,
`--update_llama_config`, `--load_checkpoint`, `--modality`, `--dtype`: lwm.cli.values.FLAG_KINDS) go through
that kind's one parser; the original's spellings (`--tokenizer.vocab_file`, `--llama_config`, ...:
lwm.cli.values.ALIASES) name the same flags. Values are parsed as literal data, never evaluated.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any, Optional

from ml_collections import ConfigDict

from lwm.cli.values import ALIASES, FLAG_KINDS, FlagError, parse_bool as _parse_bool, parse_literal_dict
from lwm.model.registry import model_config_class

__all__ = ["FlagError", "parse_flags", "parse_literal_dict", "model_config_from_flags", "known_flags",
           "get_flag", "set_flag", "convert_value", "usage", "resolve_alias"]


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
    llama = config["llama"] if "llama" in config else None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if llama is not None and node is llama and len(parts) == 2:
            with llama.unlocked():
                llama[part] = text
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
                value = convert_value(name, text, node[part], ref_type)
                if name in FLAG_KINDS and isinstance(value, str):
                    value = FLAG_KINDS[name](name, value)
                node[part] = value
            except TypeError as e:
                raise FlagError(f"--{name}={text!r}: {e}") from None
            return
        node = node[part]


def _flag_lines(defaults: ConfigDict) -> list[str]:
    names = known_flags(defaults)
    lines = ["  --llama.<field>=value   (any model config field)" if name == "llama"
             else f"  --{name}={get_flag(defaults, name)!r}" for name in names]
    aliases = [f"--{alias} = --{target}" for alias, target in ALIASES.items()
               if target in names and alias not in names]
    if aliases:
        lines.append("  (the original's spellings: " + ", ".join(aliases) + ")")
    return lines


def usage(prog: str, defaults, doc: str = "") -> str:
    """The command's docstring, then every flag with its default (per subcommand when `defaults` maps
    subcommands to their flags): what every command's `--help` prints."""
    lines = [doc.strip(), ""] if doc else []
    if isinstance(defaults, ConfigDict):
        lines.append(f"python -m {prog} [--flag=value ...]; flags and defaults:")
        lines += _flag_lines(defaults)
    else:
        lines.append(f"python -m {prog} {{{','.join(defaults)}}} [--flag=value ...]")
        for sub, config in defaults.items():
            lines.append(f"{sub}: flags and defaults:")
            lines += _flag_lines(config)
    return "\n".join(lines)


_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "t", "f")


def resolve_alias(name: str, known: set) -> str:
    """The flag an original spelling stands for (lwm.cli.values.ALIASES), when `name` itself is not a flag
    of this command and its target is; else `name`."""
    target = ALIASES.get(name)
    return target if target is not None and name not in known and target in known else name


def parse_flags(argv: list[str], config: ConfigDict, prog: str = "") -> ConfigDict:
    """`--name=value`, `--name value`, `--name` / `--noname` / `--name true|false` (booleans) applied to `config` (a locked
    ConfigDict of defaults). Returns the updated config. `--help` / `-h` prints `usage(config, prog)` to
    stdout and exits 0, as argparse does. Raises FlagError naming the flag."""
    if "--help" in argv or "-h" in argv:
        print(usage(prog, config))
        raise SystemExit(0)
    known = set(known_flags(config))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unexpected argument {arg!r}: flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        if not name.startswith("llama."):
            name = resolve_alias(name, known)
        if not eq:
            if name not in known and name.startswith("no") and resolve_alias(name[2:], known) in known:
                name, value = resolve_alias(name[2:], known), "false"
            elif name in known and isinstance(get_flag(config, name), bool):
                value = "true"                      # `--flag`, or `--flag true|false` (argparse-style)
                if i + 1 < len(argv) and argv[i + 1].strip().lower() in _BOOL_WORDS:
                    i, value = i + 1, argv[i + 1]
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
