"""Parser of the guest's console lines (printed by init.sh and the programs in src/) into events.

Lines may arrive with kernel messages or shell echo around them, so a line is recognised by its
"KVMOTION " marker wherever it starts; anything else parses to None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = "KVMOTION "


@dataclass(frozen=True)
class Ready:
    """All requested workloads are up: `KVMOTION READY mem,echo`."""

    workloads: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    """A workload (or init's own setup step) could not start: `KVMOTION FAILED disk /dev/vda: ...`."""

    what: str
    reason: str


@dataclass(frozen=True)
class MemStatus:
    """Once a second from the memory writer: pages written, full passes, corrupt pages so far."""

    seq: int
    passes: int
    errors: int


@dataclass(frozen=True)
class MemCorrupt:
    """A page did not hold what the memory writer last wrote to it."""

    page: int
    expected: int
    found: int
    word: int | None


@dataclass(frozen=True)
class MemVerified:
    """An on-demand check of the whole working set finished (kill -USR1 the writer)."""

    pages: int
    errors: int


@dataclass(frozen=True)
class DiskAck:
    """Every disk record up to seq is durable (fsync returned)."""

    seq: int


@dataclass(frozen=True)
class DiskError:
    """A write or fsync failed; the writer retries the same records."""

    message: str


@dataclass(frozen=True)
class CpuStatus:
    """Once a second from the CPU worker: work units all its workers finished over the last `ms`
    milliseconds of the guest's clock (which stops while the VM is paused), and in all."""

    units: int
    ms: int
    total: int
    workers: int

    @property
    def rate(self) -> float | None:
        """Units per guest-second (None over an empty interval)."""
        return self.units * 1000 / self.ms if self.ms > 0 else None


GuestEvent = Ready | Failed | MemStatus | MemCorrupt | MemVerified | DiskAck | DiskError | CpuStatus

_FIELDS_RE = re.compile(r"(\w+)=(\d+)")


def _fields(text: str) -> dict[str, int]:
    return {key: int(value) for key, value in _FIELDS_RE.findall(text)}


def parse_line(line: str) -> GuestEvent | None:
    """The event a console line carries, or None."""
    at = line.find(MARKER)
    if at < 0:
        return None
    words = line[at + len(MARKER) :].strip().split(" ", 2)
    kind = words[0]
    rest = " ".join(words[1:])
    if kind == "READY":
        names = rest.strip()
        return Ready(workloads=tuple(n for n in names.split(",") if n)) if names and " " not in names else None
    if kind == "FAILED" and len(words) >= 2:
        return Failed(what=words[1], reason=words[2] if len(words) > 2 else "")
    if kind == "DISK" and len(words) >= 2:
        if words[1] == "ERROR":
            return DiskError(message=words[2] if len(words) > 2 else "")
        f = _fields(rest)
        return DiskAck(seq=f["ack"]) if "ack" in f else None
    if kind == "CPU" and len(words) >= 2:
        f = _fields(rest)
        try:
            return CpuStatus(units=f["units"], ms=f["ms"], total=f["total"], workers=f["workers"])
        except KeyError:
            return None
    if kind == "MEM" and len(words) >= 2:
        f = _fields(rest)
        try:
            if words[1] == "CORRUPT":
                return MemCorrupt(page=f["page"], expected=f["expected"], found=f["found"], word=f.get("word"))
            if words[1] == "VERIFIED":
                return MemVerified(pages=f["pages"], errors=f["errors"])
            return MemStatus(seq=f["seq"], passes=f["pass"], errors=f["errors"])
        except KeyError:
            return None
    return None
