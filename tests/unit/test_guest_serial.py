"""Console line parser: every line the guest prints, and noise around it."""

from __future__ import annotations

import pytest

from kvmotion.guest.serial import (
    CpuStatus,
    DiskAck,
    DiskError,
    Failed,
    MemCorrupt,
    MemStatus,
    MemVerified,
    Ready,
    parse_line,
)


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ("KVMOTION READY mem,echo,disk", Ready(workloads=("mem", "echo", "disk"))),
        ("KVMOTION READY idle\r", Ready(workloads=("idle",))),
        ("KVMOTION MEM seq=24403 pass=1 errors=0", MemStatus(seq=24403, passes=1, errors=0)),
        (
            "KVMOTION MEM CORRUPT page=12 expected=500 found=0 word=0",
            MemCorrupt(page=12, expected=500, found=0, word=0),
        ),
        ("KVMOTION MEM CORRUPT page=3 expected=9 found=4", MemCorrupt(page=3, expected=9, found=4, word=None)),
        ("KVMOTION MEM VERIFIED pages=16384 errors=2", MemVerified(pages=16384, errors=2)),
        ("KVMOTION DISK ack=1023", DiskAck(seq=1023)),
        ("KVMOTION CPU units=412 ms=1001 total=9000 workers=1", CpuStatus(units=412, ms=1001, total=9000, workers=1)),
        ("KVMOTION CPU units=412 ms=1001", None),  # a line cut short
        (
            "KVMOTION DISK ERROR fsync at seq 64: Input/output error",
            DiskError(message="fsync at seq 64: Input/output error"),
        ),
        ("KVMOTION FAILED disk /dev/vda: No such file or directory", Failed("disk", "/dev/vda: No such file or directory")),
        ("KVMOTION FAILED nic no interface has MAC 52:54:00:00:00:01", Failed("nic", "no interface has MAC 52:54:00:00:00:01")),
    ],
)
def test_parses_guest_lines(line: str, event: object) -> None:
    assert parse_line(line) == event


def test_cpu_status_rate_is_per_guest_second() -> None:
    assert CpuStatus(units=500, ms=1000, total=500, workers=2).rate == 500
    assert CpuStatus(units=300, ms=1500, total=800, workers=1).rate == 200
    assert CpuStatus(units=0, ms=0, total=800, workers=1).rate is None


def test_marker_after_prompt_and_escape_codes() -> None:
    # The shell's prompt and its cursor query can precede a line on the shared console.
    assert parse_line("/ # \x1b[6nKVMOTION MEM seq=5 pass=0 errors=0") == MemStatus(seq=5, passes=0, errors=0)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[    1.234] virtio_net virtio0 eth0: renamed",
        "KVMOTION",
        "KVMOTION READY",
        "KVMOTION MEM seq=1 pass=2",  # truncated
        "KVMOTION DISK",
        "KVMOTION DISK ack=",
        "KVMOTION SOMETHING new=1",
        "KVMOTIONREADY mem",
    ],
)
def test_other_lines_are_ignored(line: str) -> None:
    assert parse_line(line) is None
