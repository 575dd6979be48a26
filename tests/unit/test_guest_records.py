"""The disk record format and its verifier, on synthetic disks written by a Python writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmotion.guest import records
from kvmotion.guest.records import SIZE, decode_record, encode_record, verify_image, verify_records

RUN = 0x1234ABCD


class Disk:
    """A disk image in memory, written the way kvm-disk writes."""

    def __init__(self, size: int = records.OFFSET + 4096 * SIZE) -> None:
        self.data = bytearray(size)

    def write(self, seq: int, run: int = RUN, raw: bytes | None = None) -> None:
        at = records.OFFSET + seq * SIZE
        self.data[at : at + SIZE] = raw if raw is not None else encode_record(seq, run)

    def write_upto(self, last: int, run: int = RUN) -> None:
        for seq in range(last + 1):
            self.write(seq, run)

    def read_at(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])


def test_record_layout() -> None:
    rec = encode_record(7, RUN)
    assert len(rec) == SIZE
    assert rec[:4] == b"KVMD"
    assert int.from_bytes(rec[4:8], "little") == RUN
    assert int.from_bytes(rec[8:16], "little") == 7
    assert decode_record(rec) == records.Record(run=RUN, seq=7)


def test_decode_rejects_flipped_bit_and_short_slot() -> None:
    rec = bytearray(encode_record(3, RUN))
    rec[100] ^= 1
    assert decode_record(bytes(rec)) is None
    assert decode_record(encode_record(3, RUN)[:-1]) is None


def test_all_acked_records_present() -> None:
    disk = Disk()
    disk.write_upto(99)
    check = verify_records(disk.read_at, 99)
    assert check.ok
    assert (check.highest_contiguous, check.missing, check.duplicate, check.corrupt) == (99, 0, 0, 0)
    assert check.run == RUN


def test_unacked_records_beyond_ack_extend_contiguous() -> None:
    disk = Disk()
    disk.write_upto(120)
    check = verify_records(disk.read_at, 99)
    assert check.ok and check.highest_contiguous == 120


def test_lost_acked_records_are_missing() -> None:
    disk = Disk()
    disk.write_upto(79)  # the guest acknowledged up to 99, but 80..99 never reached the disk
    check = verify_records(disk.read_at, 99)
    assert not check.ok
    assert check.highest_contiguous == 79
    assert check.missing == 20 and check.corrupt == 0 and check.duplicate == 0


def test_hole_in_the_middle() -> None:
    disk = Disk()
    disk.write_upto(99)
    disk.write(50, raw=bytes(SIZE))
    check = verify_records(disk.read_at, 99)
    assert not check.ok and check.highest_contiguous == 49 and check.missing == 1


def test_corrupt_and_duplicate_and_misplaced() -> None:
    disk = Disk()
    disk.write_upto(99)
    garbled = bytearray(encode_record(10, RUN))
    garbled[200] ^= 0xFF
    disk.write(10, raw=bytes(garbled))
    disk.write(20, raw=encode_record(5, RUN))  # an old record where 20 belongs
    disk.write(30, raw=encode_record(31, RUN))  # a later record in the wrong slot
    check = verify_records(disk.read_at, 99)
    assert not check.ok
    assert check.highest_contiguous == 9
    assert (check.missing, check.duplicate, check.corrupt) == (0, 1, 2)


def test_stale_records_of_an_earlier_run_do_not_count() -> None:
    disk = Disk()
    disk.write_upto(99, run=1)  # an earlier boot
    disk.write_upto(59, run=2)  # this boot, acknowledged up to 79
    check = verify_records(disk.read_at, 79)
    assert check.run == 2 and not check.ok
    assert check.highest_contiguous == 59 and check.missing == 20


def test_nothing_acked_nothing_written() -> None:
    check = verify_records(Disk().read_at, -1)
    assert check.ok and check.highest_contiguous == -1 and check.run is None


def test_disk_shorter_than_acked() -> None:
    disk = Disk(size=records.OFFSET + 10 * SIZE)
    disk.write_upto(9)
    check = verify_records(disk.read_at, 20)
    assert not check.ok and check.highest_contiguous == 9 and check.missing == 11


def test_spans_several_read_chunks() -> None:
    disk = Disk()
    disk.write_upto(1500)
    assert verify_records(disk.read_at, 1499).highest_contiguous == 1500


def test_verify_image_file(tmp_path: Path) -> None:
    disk = Disk()
    disk.write_upto(15)
    image = tmp_path / "disk.img"
    image.write_bytes(disk.data)
    check = verify_image(image, 15)
    assert check.ok
    assert "ok" in check.summary()


@pytest.mark.parametrize("bad", [0, 1])
def test_summary_names_failure(bad: int) -> None:
    disk = Disk()
    disk.write_upto(bad)
    check = verify_records(disk.read_at, 5)
    assert "LOST" in check.summary() and "missing=" in check.summary()
