"""A VM's CPU load from the scheduler's own counters of its vCPU threads.

QEMU runs with `-name ...,debug-threads=on`, so each vCPU thread is named "CPU <n>/KVM" (or
"CPU <n>/TCG"). /proc/PID/task/TID/schedstat holds three cumulative counters per thread: time on
a CPU (ns), time runnable but waiting on a run queue (ns), and time slices. Between two samples:

    demand = run-time delta / interval     (CPUs' worth the vCPUs used)
    ready  = wait-time delta / interval    (CPUs' worth they wanted but waited for: vSphere's "ready")

The parsing and the arithmetic are pure functions; `read_vcpu_threads` and `resident_memory` are the
thin reads of /proc.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_VCPU_RE = re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX)$")
NS = 1_000_000_000


@dataclass(frozen=True)
class SchedStat:
    run_ns: int  # on a CPU
    wait_ns: int  # runnable, waiting for a CPU
    slices: int


@dataclass(frozen=True)
class CpuLoad:
    demand: float  # CPUs
    ready: float  # CPUs


@dataclass(frozen=True)
class VcpuSample:
    """One VM's vCPU threads at one moment (monotonic seconds), for one QEMU process."""

    pid: int
    at: float
    threads: Mapping[int, SchedStat]  # thread id -> its counters

    @property
    def run_ns(self) -> int:
        return sum(t.run_ns for t in self.threads.values())

    @property
    def wait_ns(self) -> int:
        return sum(t.wait_ns for t in self.threads.values())


def parse_schedstat(text: str) -> SchedStat | None:
    """'<run ns> <wait ns> <slices>' (one line); None if it is not that."""
    parts = text.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return SchedStat(int(parts[0]), int(parts[1]), int(parts[2]))


def vcpu_index(comm: str) -> int | None:
    """The vCPU number of a QEMU thread named "CPU <n>/<accel>"; None for any other thread."""
    m = _VCPU_RE.fullmatch(comm.strip())
    return int(m.group(1)) if m else None


def cpu_load(prev: VcpuSample | None, cur: VcpuSample) -> CpuLoad | None:
    """The vCPUs' demand and ready time between two samples of the same process, in CPUs; None
    without a usable earlier sample (first sample, another process, no time between). Threads
    only in one sample, or whose counters went back (a reused thread id), count for nothing."""
    if prev is None or prev.pid != cur.pid or cur.at <= prev.at:
        return None
    run = wait = 0
    for tid, now in cur.threads.items():
        before = prev.threads.get(tid)
        if before is None or now.run_ns < before.run_ns or now.wait_ns < before.wait_ns:
            continue
        run += now.run_ns - before.run_ns
        wait += now.wait_ns - before.wait_ns
    seconds = cur.at - prev.at
    return CpuLoad(demand=run / NS / seconds, ready=wait / NS / seconds)


# ---- reads of /proc ------------------------------------------------------------------------------------
def read_vcpu_threads(pid: int, proc: Path = Path("/proc")) -> dict[int, SchedStat]:
    """The vCPU threads of process `pid` and their counters (threads that end meanwhile are left out;
    an ended process gives {})."""
    out: dict[int, SchedStat] = {}
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            if vcpu_index((task / "comm").read_text()) is None:
                continue
            stat = parse_schedstat((task / "schedstat").read_text())
        except (OSError, ValueError):
            continue
        if stat is not None and task.name.isdigit():
            out[int(task.name)] = stat
    return out


def resident_memory(pid: int, proc: Path = Path("/proc")) -> int:
    """Bytes of process `pid` in RAM (statm's resident pages); 0 if it ended."""
    try:
        fields = (proc / str(pid) / "statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
