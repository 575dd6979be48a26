"""The disk writer's record format (see src/kvm-disk.c), and verification of a disk against it.

Record n lives at byte OFFSET + n * SIZE. Layout, little-endian:
magic u32 | run u32 | seq u64 | payload (the 8-byte word (seq * PAYLOAD_MUL) ^ run, repeated) |
crc32 of everything before it. `run` is random per writer start, so records of an earlier run
are told apart from the current one. kvm-disk.c repeats these constants; a test checks they agree.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SIZE = 512
MAGIC = 0x444D564B  # b"KVMD" read as a little-endian u32
OFFSET = 1 << 20
PAYLOAD_OFF = 16
CRC_OFF = SIZE - 4
PAYLOAD_MUL = 0x9E3779B97F4A7C15
BATCH = 8  # records per fsync in the guest writer

_HEADER = struct.Struct("<IIQ")
_CRC = struct.Struct("<I")
_MASK64 = (1 << 64) - 1
_READ_RECORDS = 256  # records fetched per read_at call


def encode_record(seq: int, run: int) -> bytes:
    """The 512 bytes kvm-disk writes for `seq` in run `run`."""
    word = (((seq * PAYLOAD_MUL) & _MASK64) ^ run).to_bytes(8, "little")
    payload_len = CRC_OFF - PAYLOAD_OFF
    body = _HEADER.pack(MAGIC, run, seq) + (word * (payload_len // 8 + 1))[:payload_len]
    return body + _CRC.pack(zlib.crc32(body))


@dataclass(frozen=True)
class Record:
    run: int
    seq: int


def decode_record(raw: bytes) -> Record | None:
    """The record in a 512-byte slot, or None if the slot does not hold an intact record."""
    if len(raw) != SIZE:
        return None
    magic, run, seq = _HEADER.unpack_from(raw)
    if magic != MAGIC or raw != encode_record(seq, run):
        return None
    return Record(run=run, seq=seq)


@dataclass(frozen=True)
class RecordCheck:
    """What a disk holds compared with what the guest acknowledged (seqs 0..acked).

    highest_contiguous: the largest n such that records 0..n are all present and intact (-1: none).
    missing: slots up to `acked` holding no record of this run (never written, or lost).
    duplicate: slots up to `acked` holding an intact record of another, earlier seq.
    corrupt: slots up to `acked` holding something that is not an intact record in place.
    """

    acked: int
    run: int | None
    highest_contiguous: int
    missing: int
    duplicate: int
    corrupt: int

    @property
    def ok(self) -> bool:
        return self.highest_contiguous >= self.acked

    def summary(self) -> str:
        state = "ok" if self.ok else "LOST ACKNOWLEDGED WRITES"
        return (
            f"disk records {state}: acked={self.acked} contiguous={self.highest_contiguous} "
            f"missing={self.missing} duplicate={self.duplicate} corrupt={self.corrupt}"
        )


def _blank(raw: bytes) -> bool:
    return raw.count(0) == len(raw)


class _Slots:
    """Record slots of a disk, read a chunk at a time (only the current chunk is kept in memory)."""

    def __init__(self, read_at: Callable[[int, int], bytes]) -> None:
        self._read_at = read_at
        self._chunk_no = -1
        self._chunk = b""

    def __getitem__(self, i: int) -> bytes:
        n, k = divmod(i, _READ_RECORDS)
        if n != self._chunk_no:
            self._chunk = self._read_at(OFFSET + n * _READ_RECORDS * SIZE, _READ_RECORDS * SIZE)
            self._chunk_no = n
        return self._chunk[k * SIZE : (k + 1) * SIZE]  # short or empty past the disk's end


def verify_records(read_at: Callable[[int, int], bytes], acked: int) -> RecordCheck:
    """Checks slots 0..acked (and beyond, while intact, for highest_contiguous).

    read_at(offset, length) returns the disk's bytes there (fewer at its end). The run is the one of
    slot 0; with no intact record in slot 0 it is the run found most in the acknowledged slots.
    """
    slots = _Slots(read_at)
    first = decode_record(slots[0])
    run = first.run if first else _most_common_run(decode_record(slots[i]) for i in range(acked + 1))
    missing = duplicate = corrupt = 0
    highest = -1
    for i in itertools.count():
        raw = slots[i]
        rec = decode_record(raw)
        intact = rec is not None and rec.run == run and rec.seq == i
        if intact and highest == i - 1:
            highest = i
        if i > acked:
            if highest < i:
                break  # past the acknowledged slots only the contiguous run matters
        elif not intact:
            if rec is None:
                if _blank(raw):
                    missing += 1
                else:
                    corrupt += 1
            elif rec.run != run:
                missing += 1  # a stale record of another run: this run's record never landed
            elif rec.seq < i:
                duplicate += 1
            else:
                corrupt += 1  # an intact record of a later seq, in the wrong place
    return RecordCheck(
        acked=acked, run=run, highest_contiguous=highest, missing=missing, duplicate=duplicate, corrupt=corrupt
    )


def _most_common_run(decoded: Iterable[Record | None]) -> int | None:
    counts: dict[int, int] = {}
    for rec in decoded:
        if rec is not None:
            counts[rec.run] = counts.get(rec.run, 0) + 1
    return max(counts, key=lambda r: counts[r]) if counts else None


def verify_image(path: Path, acked: int) -> RecordCheck:
    """verify_records on a raw disk image file (or a block device) on this host."""
    with open(path, "rb") as f:

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return verify_records(read_at, acked)
