"""Checks of option values, shared by the CLI and the Python API. Each names the option and raises a
typed error (OptionError unless the caller names another class) before any work starts.

Numbers are checked for being finite first, then with `lo <= x <= hi`: a check written as
`if x < 0` lets NaN through, because every comparison with NaN is False."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Collection

from .errors import EdgeLMMError, OptionError

ErrorClass = type[EdgeLMMError]


def is_int(value: Any) -> bool:
    """An integer (numpy's too). A bool is not one: True would silently mean 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _range(name: str, value, lo, hi, lo_open: bool, error: ErrorClass) -> None:
    low = lo is not None and (value <= lo if lo_open else value < lo)
    if low or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            want = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        elif lo is not None:
            want = f"{'>' if lo_open else '>='} {lo}"
        else:
            want = f"<= {hi}"
        raise error(f"{name} must be {want}, got {value!r}")


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              error: ErrorClass = OptionError) -> int:
    if not is_int(value):
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    _range(name, value, lo, hi, False, error)
    return int(value)


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, error: ErrorClass = OptionError) -> float:
    """A finite real number in [lo, hi] ((lo, hi] with lo_open). NaN and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    _range(name, value, lo, hi, lo_open, error)
    return float(value)


def check_choice(name: str, value: Any, choices: Collection, *, error: ErrorClass = OptionError) -> None:
    if value not in choices:
        raise error(f"unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")


# More than a few threads per core only adds switching, and ONNX Runtime starts every thread when a
# session is created: 100000 stalls that for minutes.
MAX_THREADS = 4 * (os.cpu_count() or 1)


def check_threads(threads: Any, name: str = "threads") -> None:
    """CPU threads for a backend: None (the backend's default) or 1..MAX_THREADS. The one check for
    every command and every API entry point that takes threads."""
    if threads is not None:
        check_int(name, threads, 1)
        if threads > MAX_THREADS:
            raise OptionError(f"{name} must be at most {MAX_THREADS} (4 per CPU core of this machine), got {threads}")
