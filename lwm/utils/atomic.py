"""Write a folder aside, then rename it into place: a reader sees the old folder whole or the new one whole.

    with replace_dir("/out/eval") as tmp:       # tmp = /out/.tmp-eval, empty
        write_everything_under(tmp)             # an exception here leaves /out/eval as it was, tmp removed
    # /out/eval now holds exactly what was written under tmp; nothing of the earlier result is left

The swap is two renames on one file system (`final` -> `.old-NAME`, `tmp` -> `final`), then the old copy
is removed; between the renames `final` is briefly absent, never mixed. A folder left as `.tmp-NAME` or
`.old-NAME` by a killed process is removed by the next write. Local paths only (object stores have no
rename). The training checkpointer (lwm/checkpoint/manager.py) moves its checkpoints with `move_into_place`.
One file: `replace_file` (write `.tmp-NAME` beside it, then os.replace), for JSON results, heatmaps, summaries.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (the renames in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(final: str, prefix: str) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f"{prefix}{name}")


def move_into_place(tmp: str, final: str) -> None:
    """Replace the folder `final` (if any) with the folder `tmp` by renames; the old one is kept as
    `.old-NAME` until the new one is in, then removed."""
    old = _sibling(final, ".old-")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replace_dir(final: str) -> Iterator[str]:
    """Yield an empty folder beside `final` (`.tmp-NAME`); on a clean exit it replaces `final` whole, on an
    exception it is removed and `final` is left untouched. Raises ValueError when `final` exists and is not
    a folder."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"{final}: exists and is not a folder; cannot write an output folder there")
    tmp = _sibling(final, ".tmp-")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)           # left by a killed write
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, final)


@contextlib.contextmanager
def replace_file(final: str) -> Iterator[str]:
    """Yield a path beside the file `final` (`.tmp-NAME`, same suffix, so writers that go by the extension
    such as matplotlib's savefig still work); on a clean exit it replaces `final` by os.replace (a reader
    sees the old file whole or the new one whole), on an exception it is removed and `final` is left as it
    was. Folders above `final` are made. Raises ValueError when `final` is a folder."""
    final = os.path.abspath(final)
    if os.path.isdir(final):
        raise ValueError(f"{final}: is a folder; cannot write an output file there")
    tmp = _sibling(final, ".tmp-")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, final)
