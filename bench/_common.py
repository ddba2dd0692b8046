"""What the benchmark scripts share: a one-line description of the machine they ran on.

Each script prints it above its table so that figures pasted into bench/RESULTS.md carry the
CPU, core count, RAM and library versions they were measured with. Linux only (/proc/cpuinfo);
elsewhere the CPU is reported as "unknown CPU".
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def ram_gib() -> float:
    """Physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def describe_machine(*extras: str) -> str:
    """`CPU, N cores, M GiB RAM, Python X` followed by `, extra` for each of `extras` (library versions)."""
    parts = [cpu_model(), f"{os.cpu_count()} cores", f"{ram_gib():.0f} GiB RAM", f"Python {platform.python_version()}"]
    return ", ".join([*parts, *extras])


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS does not report them."""
    try:
        return os.getloadavg()
    except OSError:
        return None
