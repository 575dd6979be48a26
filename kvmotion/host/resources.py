"""What a host offers: memory, CPUs, CPU model and features, port groups, datastores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core import cgroups


@dataclass(frozen=True)
class MemInfo:
    total: int
    available: int


def meminfo() -> MemInfo:
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[key] = int(parts[0]) * 1024
    return MemInfo(total=fields["MemTotal"], available=fields.get("MemAvailable", fields["MemFree"]))


def cpu_model_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def cpu_capacity() -> float:
    """CPUs' worth of time this process (and what it starts) may use: the limit of its cpu cgroup
    and those above it, else its CPU count."""
    count = cpu_count()
    limit = cgroups.own_cpu_limit()
    return count if limit is None else round(min(limit.cores, count), 3)
