"""The command wrapper of every `python -m lwm.*` entry point: one `--help`, one error policy.

    def get_default_config() -> ConfigDict: ...          # every flag and its default (a locked ConfigDict)
    def main(argv) -> ...:                                # parse(argv, get_default_config()), then the library
        config = parse(argv, get_default_config())
    if __name__ == "__main__":
        sys.exit(cli("lwm.text_chat", main, get_default_config, __doc__))

`--help` / `-h` prints the module's docstring, then every flag with its default (and the original's
spellings it accepts), and exits 0. A user error (USER_ERRORS: a flag, a file, a length, the mesh) prints
one line "lwm.<name>: error: <message naming the flag or file>" on stderr and exits 2; LWM_DEBUG=1 shows the
traceback instead. Ctrl-C exits 130. A command with subcommands (`lwm.convert from_hf|to_hf`) gives
`get_default_config` as a {subcommand: defaults} mapping and splits argv with `subcommand`.
"""
from __future__ import annotations

import os
import pickle
import sys
from typing import Callable, Mapping, Sequence, Union

from ml_collections import ConfigDict

from lwm.cli.flags import get_flag, parse_flags, usage
from lwm.cli.values import FlagError

# What a user can get wrong (a flag, a file, a length, the mesh): ValueError covers FlagError,
# CheckpointError, PromptTooLongError, MeshError and DataFormatError; OSError covers missing or
# unreadable files; UnpicklingError a pickle that lwm.utils.safe_pickle refuses.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)

Defaults = Union[ConfigDict, Mapping[str, ConfigDict]]


def parse(argv: Sequence[str], defaults: ConfigDict) -> ConfigDict:
    """`argv` (--flag=value ...) applied to `defaults` (lwm.cli.flags.parse_flags). Raises FlagError."""
    return parse_flags(list(argv), defaults)


def subcommand(argv: Sequence[str], choices: Sequence[str], prog: str) -> tuple[str, list[str]]:
    """(subcommand, the flags after it) from argv = [subcommand, --flag=value, ...]; FlagError otherwise."""
    argv = list(argv)
    if not argv or argv[0] not in choices:
        got = f" (got {argv[0]!r})" if argv else ""
        raise FlagError(f"the first argument is the subcommand: one of {', '.join(choices)}{got}")
    return argv[0], argv[1:]


def require(config: ConfigDict, *names: str, why: str = "") -> None:
    """FlagError naming the first of `names` left empty."""
    for name in names:
        if get_flag(config, name) in ("", None):
            raise FlagError(f"--{name} is required" + (f": {why}" if why else ""))


def error_line(prog: str, error: BaseException) -> str:
    """"{prog}: error: {message}" on one line (a KeyError's message without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"{prog}: error: " + (" ".join(str(message).split()) or type(error).__name__)


def cli(prog: str, main: Callable, get_default_config: Callable[[], Defaults], doc: str = "",
        argv=None) -> int:
    """Run `main(argv)` as a command: --help / -h prints `usage` and returns 0; a user error (USER_ERRORS)
    prints `error_line` to stderr and returns 2 (LWM_DEBUG=1 re-raises it); Ctrl-C returns 130. Returns 0
    otherwise; a SystemExit from `main` passes through."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage(prog, get_default_config(), doc))
        return 0
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get("LWM_DEBUG"):
            raise
        print(error_line(prog, e), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
