"""Checks of option values, shared by the CLI and the Python API. Each names the option and raises a
typed error (OptionError unless the caller names another class) before any work starts.

Numbers are checked for being finite first, then with `lo <= x <= hi`: a check written as
`if x < 0` lets NaN through, because every comparison with NaN is False."""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path
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


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` (nearest first) that do not exist yet."""
    missing = []
    for parent in path.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing


def _remove_created(paths: list[Path]) -> None:
    for p in paths:   # innermost first
        try:
            p.rmdir()
        except OSError:
            pass


def check_output_dir(name: str, path: Any, *, error: ErrorClass = OptionError) -> Path:
    """A folder that files will be written into later (snapshots): an existing writable folder, or
    one that can be created. Probed for real (root may write where os.access says no, and nobody
    can create files in /proc): the folders made for the probe are removed again."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise error(f"{name} must be a folder path, got {path!r}")
    if "\x00" in str(path):
        raise error(f"{name} {str(path)!r} contains a NUL character")
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise error(f"{name} {str(p)!r} exists and is not a folder")
    created = ([p] if not os.path.lexists(p) else []) + _missing_parents(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise error(f"{name} {str(p)!r}: cannot create or write to this folder ({_os_reason(exc)})") from None
    finally:
        _remove_created(created)
    return p


def check_output_file(name: str, path: Any, *, error: ErrorClass = OptionError) -> Path:
    """A file that will be appended to later (a JSON-lines log): opened for appending now, which
    changes nothing in an existing file; a file or folders made for the probe are removed again."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise error(f"{name} must be a file path, got {path!r}")
    if "\x00" in str(path):
        raise error(f"{name} {str(path)!r} contains a NUL character")
    p = Path(path)
    if p.is_dir():
        raise error(f"{name} {str(p)!r} is a folder, not a file")
    created = ([p] if not os.path.lexists(p) else []) + _missing_parents(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise error(f"{name} {str(p)!r}: cannot be written ({_os_reason(exc)})") from None
    finally:
        if created and created[0] == p:
            try:
                p.unlink()
            except OSError:
                pass
            created = created[1:]
        _remove_created(created)
    return p


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


THREADS_ENV = "EDGELMM_THREADS"


def default_threads() -> int | None:
    """The CPU threads every backend, the calibrator and the exporter's checks use when none is asked:
    $EDGELMM_THREADS, or None (each library's own default, every core). On a machine whose cores are
    shared (a device beside its other work, a CI runner) each library's threads spin while they wait
    for one another: one thread costs the same work and none of the spinning."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise OptionError(f"{THREADS_ENV} must be a whole number of threads, got {raw!r}")
    threads = int(raw)
    check_threads(threads, THREADS_ENV)
    return threads
