"""The memory this machine can give now, and sizes as people read them. No edgelmm imports: the
memory budgets (memory.py) and video decoding (video.py) both use it, and video.py sits below the
modules memory.py needs."""

from __future__ import annotations

import os
from pathlib import Path

GiB = 1024 ** 3


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GB" if n < 10 * GiB else f"{n / GiB:.1f} GB"


def available_bytes() -> int:
    """Memory the machine can give a new process now: MemAvailable (free plus reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
