"""Datastore disks with a real guest: the disk writer (kvm-disk) through ten migrations, across a
restart of the datastore service, and through a migration rolled back after the lease had moved.

The guest prints `KVMOTION DISK ack=N` once records 0..N are fsynced; afterwards the image is read
in the datastore's folder (outside any VM) and every acknowledged record must be there, in order,
none lost or duplicated (kvmotion.guest.records.verify_image). Figures are printed as `FIGURES`
lines (pytest -s) and recorded as junit properties.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmotion.cluster.lab import DATASTORE
from kvmotion.guest.records import verify_image
from kvmotion.guest.serial import DiskAck, DiskError, parse_line
from kvmotion.net import lab as labmod
from kvmotion.net import netns
from kvmotion.storage.client import DatastoreClient
from kvmotion.storage.lease import Lease
from kvmotion.storage.registry import Registry
from tests.integration.lab_fixture import MigrationLab

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

DISK_SIZE = "256M"


def _other(host: str) -> str:
    return "host-b" if host == "host-a" else "host-a"


@dataclass(frozen=True)
class DiskLog:
    """The disk writer's lines in one serial log from an offset on."""

    acks: tuple[int, ...]
    errors: tuple[str, ...]
    end: int

    @property
    def last(self) -> int:
        return self.acks[-1] if self.acks else -1


def disk_log(lab: MigrationLab, host: str, vm: str, offset: int = 0) -> DiskLog:
    try:
        with open(lab.serial_log(host, vm), "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return DiskLog((), (), offset)
    whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
    events = [parse_line(ln) for ln in whole.decode(errors="replace").splitlines()]
    return DiskLog(
        acks=tuple(e.seq for e in events if isinstance(e, DiskAck)),
        errors=tuple(e.message for e in events if isinstance(e, DiskError)),
        end=offset + len(whole),
    )


def wait_ack_above(lab: MigrationLab, host: str, vm: str, offset: int, above: int, timeout: float = 20) -> DiskLog:
    """Wait for an ack greater than `above` in `host`'s log after `offset`; the lines read so far."""
    deadline = time.monotonic() + timeout
    while True:
        log = disk_log(lab, host, vm, offset)
        if log.last > above or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def highest_ack(lab: MigrationLab, vm: str) -> int:
    """The highest record number the guest saw acknowledged, over every host's serial log."""
    return max(disk_log(lab, h.name, vm).last for h in lab.topo.hosts)


def datastore(lab: MigrationLab) -> DatastoreClient:
    ref = Registry(lab.cluster.folder / "cluster" / "datastores.json").get(DATASTORE)
    return DatastoreClient(ref.control_url, timeout=5)


def lease_of(lab: MigrationLab, disk: str) -> tuple[Lease | None, int]:
    """(live lease, last generation handed out) of `disk` on the lab's datastore."""
    with datastore(lab) as ds:
        info = ds.disk(disk)
    return info.lease, info.generation


def disk_vm(lab: MigrationLab, vm: str, disk: str, host: str = "host-a") -> None:
    lab.cli_ok("disk", "create", f"{DATASTORE}/{disk}", DISK_SIZE)
    lab.create_vm(vm, host, workload="echo,disk", disks=(f"{DATASTORE}/{disk}",))


def stop_and_verify(lab: MigrationLab, vm: str, disk: str) -> tuple[int, str]:
    """Stop the VM cleanly, then check the image in the datastore's folder against the highest ack."""
    lab.cli_ok("vm", "stop", vm, timeout=60)
    acked = highest_ack(lab, vm)
    assert acked >= 0, "the guest never saw a record acknowledged"
    check = verify_image(lab.cluster.folder / DATASTORE / disk, acked)
    assert check.ok and (check.missing, check.duplicate, check.corrupt) == (0, 0, 0), check.summary()
    lease, _ = lease_of(lab, disk)
    assert lease is None, f"the stopped VM still holds the lease: {lease}"
    return acked, check.summary()


def test_disk_writer_ten_migrations(lab, record_property):
    """a->b->a ... ten times: the lease follows the VM with a new generation each time, the
    writer keeps acknowledging on each destination, and the disk holds every acknowledged record."""
    vm, disk = "dsk1", "dsk1.img"
    disk_vm(lab, vm, disk)
    lease, gen = lease_of(lab, disk)
    assert lease is not None and lease.host == "host-a" and lease.vm == vm, lease
    offsets = {"host-a": 0, "host-b": 0}
    first = wait_ack_above(lab, "host-a", vm, 0, 8)
    assert first.last > 8, "the disk writer acknowledged nothing"
    offsets["host-a"] = first.end
    ack = first.last
    where = "host-a"
    rows = []
    for i in range(10):
        dest = _other(where)
        rec = lab.migrate(vm, dest)
        assert rec["_returncode"] == 0 and rec["phase"] == "done", (
            f"migration {i + 1} {where} -> {dest} {rec['phase']}: {rec.get('error')} {rec['_stderr']}"
        )
        assert lab.listed(vm) == [(dest, "running")]
        lease, new_gen = lease_of(lab, disk)
        assert lease is not None and lease.host == dest and lease.vm == vm, f"migration {i + 1}: lease {lease}"
        assert lease.generation == new_gen > gen, f"migration {i + 1}: generation {gen} -> {lease.generation}"
        gen = new_gen
        src = disk_log(lab, where, vm, offsets[where])
        offsets[where] = src.end
        arrived = wait_ack_above(lab, dest, vm, offsets[dest], max(ack, src.last))
        assert arrived.last > max(ack, src.last), f"migration {i + 1}: no new ack on {dest} after resume"
        acks = [ack, *src.acks, *arrived.acks]
        assert all(a < b for a, b in zip(acks, acks[1:])), f"migration {i + 1}: acks not increasing {acks[-6:]}"
        assert not src.errors and not arrived.errors, f"migration {i + 1}: {src.errors or arrived.errors}"
        offsets[dest] = arrived.end
        ack = arrived.last
        rows.append((rec["summary"]["pause_ms"], rec["summary"]["total_ms"], gen))
        where = dest
    acked, summary = stop_and_verify(lab, vm, disk)
    line = (f"FIGURES disk writer x10 migrations: pause_ms {[round(r[0], 1) for r in rows]} total_ms "
            f"{[round(r[1]) for r in rows]} generations {[r[2] for r in rows]}; {summary}")
    print(line)
    record_property("figures", line)
