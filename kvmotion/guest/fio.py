"""kvm-fio (src/kvm-fio.c): its command line and the one console line it answers with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from kvmotion.core.errors import InvalidInput


class FioMode(str, Enum):
    SEQREAD = "seqread"
    SEQWRITE = "seqwrite"
    RANDREAD = "randread"
    RANDWRITE = "randwrite"


@dataclass(frozen=True)
class FioResult:
    """`KVMOTION FIO <mode> bs=<n> MB/s=<x> iops=<y> ops=<n> seconds=<s>` (MB = 10^6 bytes)."""

    mode: FioMode
    bs: int
    mb_s: float
    iops: float
    ops: int
    seconds: float


@dataclass(frozen=True)
class FioError:
    """`KVMOTION FIO ERROR <mode> <what>: <error text>`."""

    mode: str
    message: str


_RESULT_RE = re.compile(
    r"KVMOTION FIO (\w+) bs=(\d+) MB/s=([\d.]+) iops=([\d.]+) ops=(\d+) seconds=([\d.]+)"
)
_ERROR_RE = re.compile(r"KVMOTION FIO ERROR (\S+) (.*)")


def fio_command(mode: FioMode, device: str, bs: int, seconds: int, span: int | None = None) -> str:
    """The shell line that runs one measurement in the guest."""
    if bs <= 0 or bs % 512 or seconds < 1 or (span is not None and span < bs):
        raise InvalidInput(f"invalid kvm-fio run: bs {bs} (a multiple of 512), {seconds} s (>= 1), span {span}")
    return f"kvm-fio {mode.value} {device} {bs} {seconds}" + (f" {span}" if span is not None else "")


def parse_fio_line(line: str) -> FioResult | FioError | None:
    """The result or error a console line carries (anywhere in the line), or None."""
    err = _ERROR_RE.search(line)
    if err:
        return FioError(mode=err.group(1), message=err.group(2).strip())
    m = _RESULT_RE.search(line)
    if not m:
        return None
    try:
        mode = FioMode(m.group(1))
    except ValueError:
        return None
    return FioResult(
        mode=mode,
        bs=int(m.group(2)),
        mb_s=float(m.group(3)),
        iops=float(m.group(4)),
        ops=int(m.group(5)),
        seconds=float(m.group(6)),
    )
