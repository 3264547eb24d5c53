"""Progress display for long loops: a tqdm bar on an interactive terminal, plain lines of tqdm's format every
so many seconds otherwise (a log file, a pipe, CI), never carriage-return redraws into a log. The one home of
progress bars: the training loop (lwm.training.metrics re-exports it), the eval runner and the demo use it.

    bar = progress(total=1000, desc="train", unit="step")     # tqdm on a terminal, PlainProgress otherwise
    bar.update(1); bar.set_postfix(loss="2.30"); bar.close()
"""
from __future__ import annotations

import sys
import time
from typing import Optional


_PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class PlainProgress:
    """tqdm's interface (iteration, `update`, `set_postfix`, `close`) for a log file or CI: a plain line of
    tqdm's own format every `interval` seconds and one at the end, never carriage-return redraws.

        train: 40% 400/1000 [01:10<01:45, 5.71step/s, loss=2.3012]
    """

    def __init__(self, iterable=None, *, total: Optional[int] = None, initial: int = 0, desc: str = "",
                 unit: str = "it", file=None, interval: float = 30.0, disable: bool = False):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.file, self.interval, self.disable = file, interval, disable
        self.postfix, self.initial = "", initial
        self.start = self.last = time.monotonic()
        self.printed_n = None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self) -> None:
        from tqdm import tqdm

        self.last = time.monotonic()
        if self.disable:
            return
        elapsed = self.last - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        fmt = _PLAIN_FORMAT if self.total else None
        line = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc or "progress", unit=self.unit,
                                 rate=rate, postfix=self.postfix or None, bar_format=fmt)
        print(line, file=self.file or sys.stderr, flush=True)
        self.printed_n = self.n

    def close(self) -> None:
        if self.printed_n != self.n:
            self._print()


def progress(iterable=None, *, total: Optional[int] = None, initial: int = 0, desc: str = "", unit: str = "it",
             disable: bool = False, file=None, interval: float = 30.0):
    """A tqdm bar on an interactive terminal; `PlainProgress` lines (every `interval` seconds) when `file`
    (default stderr) is not a terminal: a log file, a pipe, CI. Same interface either way."""
    file = file or sys.stderr
    if hasattr(file, "isatty") and file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc or None, unit=unit, disable=disable,
                    file=file, dynamic_ncols=True)
    return PlainProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, file=file,
                         interval=interval, disable=disable)
