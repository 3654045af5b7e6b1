"""The run's console output: a progress bar (rich, else tqdm, else none) and log lines printed
above it on stderr."""
from __future__ import annotations

import os
import sys


class Progress:
    """rich progress bar, else tqdm, else nothing (the phase lines still print)."""

    def __init__(self, total: int):
        self._rich = self._tqdm = None
        if not sys.stderr.isatty() or os.environ.get("CMPE_SE_BENCH_NO_PROGRESS"):
            return
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            self._rich = RichProgress(transient=True, console=Console(stderr=True))
            self._task = self._rich.add_task("bench", total=total)
            self._rich.start()
        except ImportError:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(total=total, leave=False)
            except ImportError:
                pass
        if self._rich is not None or self._tqdm is not None:
            _ACTIVE[:] = [self]

    def advance(self, desc: str):
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=desc[:60])
        elif self._tqdm is not None:
            self._tqdm.set_description(desc[:60], refresh=False)
            self._tqdm.update(1)

    def close(self):
        _ACTIVE.clear()
        if self._rich is not None:
            self._rich.stop()
        elif self._tqdm is not None:
            self._tqdm.close()


_ACTIVE: list = []  # the live progress bar, if any: log lines go above it


def _log(msg: str):
    if _ACTIVE and _ACTIVE[0]._rich is not None:
        _ACTIVE[0]._rich.console.print(msg, highlight=False, markup=False)
    elif _ACTIVE and _ACTIVE[0]._tqdm is not None:
        _ACTIVE[0]._tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
