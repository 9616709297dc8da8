"""Progress of long steps. On a terminal, rich's live status line; anywhere else (a log file, CI, a
pipe, a benchmark harness) a live line prints nothing at all, so each new message becomes a
timestamped line instead: a 30-minute export must not look hung. A step's last line says how much
memory the process holds and has held at most, so a log shows which step set the peak."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console


class _Lines:
    """update(message) -> one '[  12.3s] message' line per new message."""

    def __init__(self, console: Console):
        self.console, self.start, self.last = console, time.monotonic(), None

    def update(self, message: str, done: int | None = None, total: int | None = None) -> None:
        line = message if total is None else f"{message} ({done}/{total})"
        if line != self.last:
            self.last = line
            self.console.print(f"[{time.monotonic() - self.start:7.1f}s] {line}", highlight=False, markup=False,
                               soft_wrap=True)  # one line per message in a log, whatever its length


@contextmanager
def status(console: Console, message: str) -> Iterator[Callable[..., None]]:
    """A status for one step; yields update(message). Off when the console is quiet."""
    if console.quiet:
        yield lambda *_a, **_k: None
    elif console.is_terminal:
        with console.status(message) as live:
            yield lambda msg, *_a, **_k: live.update(msg)
    else:
        lines = _Lines(console)
        lines.update(message)
        yield lines.update
        console.print(f"[{time.monotonic() - lines.start:7.1f}s] done: {message}{_memory()}", highlight=False,
                      markup=False, soft_wrap=True)


def _memory() -> str:
    """' (memory 3.1 GB, peak 4.2 GB)' from /proc (Linux); '' where it cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        now, peak = (int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return ""
    return f" (memory {now / 1024 ** 3:.2f} GB, peak {peak / 1024 ** 3:.2f} GB)"


def line_progress(console: Console) -> Callable[..., None]:
    return _Lines(console).update
