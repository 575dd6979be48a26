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


def _datastore_processes(lab: MigrationLab) -> list[tuple[int, list[str], dict[str, str]]]:
    """(pid, argv, environment) of every process in the lab's datastore namespace."""
    out = []
    for pid in netns.pids_in_ns(lab.topo.datastore.ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        out.append((pid, [a.decode() for a in argv], dict(e.decode().partition("=")[::2] for e in env)))
    return out


@dataclass(frozen=True)
class ServiceCommand:
    argv: list[str]
    env: dict[str, str]


def kill_datastore(lab: MigrationLab) -> ServiceCommand:
    """SIGKILL the datastore service and its nbdkit; returns how it was started (by
    kvmotion.cluster.lab.start_cluster), read from /proc, to start it again the same way."""
    procs = _datastore_processes(lab)
    serve = [p for p in procs if "datastore" in p[1] and "serve" in p[1]]
    assert len(serve) == 1, f"expected one `datastore serve` in {lab.topo.datastore.ns}: {procs}"
    for pid, _, _ in procs:
        netns._signal(pid, signal.SIGKILL)  # noqa: SLF001 - tolerant of a pid already gone
    deadline = time.monotonic() + 5
    while any(netns._alive(p[0]) for p in procs):  # noqa: SLF001
        assert time.monotonic() < deadline, "the datastore's processes did not die"
        time.sleep(0.02)
    return ServiceCommand(serve[0][1], serve[0][2])


def start_datastore(lab: MigrationLab, cmd: ServiceCommand) -> None:
    proc = labmod.spawn_in_ns(lab.topo.datastore.ns, cmd.argv, lab.cluster.folder / "logs" / "datastore.log", cmd.env)
    with datastore(lab) as ds:
        deadline = time.monotonic() + 30
        while not ds.reachable():
            assert proc.poll() is None, f"the restarted datastore exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the restarted datastore did not answer within 30 s"
            time.sleep(0.05)


# 0: restarted at once (the service is back in about 0.6 s); 12 s: past QEMU's NBD reconnect
# attempts at 1, 3 and 7 s, and long enough for the lease to expire unless the restarted service
# gives it back; 40 s: longer than NBD's reconnect-delay (35 s), so QEMU fails the queued writes
# and werror=stop pauses the VM until its agent resumes it.
@pytest.mark.parametrize("outage", [0.0, 12.0, 40.0])
def test_datastore_restart_during_writes(lab, outage, record_property):
    """The datastore service is killed while the guest writes and started again after `outage`
    seconds: the writer goes on, on the same host under the same lease generation, and the disk
    holds every acknowledged record."""
    vm, disk = "dsk2", "dsk2.img"
    disk_vm(lab, vm, disk)
    before = wait_ack_above(lab, "host-a", vm, 0, 16)
    assert before.last > 16, "the disk writer acknowledged nothing"
    _, gen = lease_of(lab, disk)
    cmd = kill_datastore(lab)
    t_kill = time.monotonic()
    at_kill = disk_log(lab, "host-a", vm)
    time.sleep(outage)
    start_datastore(lab, cmd)
    t_up = time.monotonic()
    during = disk_log(lab, "host-a", vm, at_kill.end)
    # The writer may have had one batch in flight past the kill, not more.
    assert during.last <= at_kill.last + 8, f"acks while the datastore was down: {during.acks}"
    after = wait_ack_above(lab, "host-a", vm, at_kill.end, max(at_kill.last, during.last), timeout=45)
    t_ack = time.monotonic()
    assert after.last > max(at_kill.last, during.last), (
        f"no ack {t_ack - t_up:.0f} s after the datastore came back; agent: {lab.agent_log('host-a')[-600:]}"
    )
    assert not after.errors, f"the guest saw disk errors: {after.errors[:3]}"
    more = wait_ack_above(lab, "host-a", vm, after.end, after.last)
    assert more.last > after.last, "the writer stopped again"
    assert lab.listed(vm) == [("host-a", "running")]
    lease, gen_after = lease_of(lab, disk)
    assert lease is not None and (lease.host, lease.generation, gen_after) == ("host-a", gen, gen), lease
    resumed = "paused by a disk I/O error" in lab.agent_log("host-a")
    acked, summary = stop_and_verify(lab, vm, disk)
    line = (f"FIGURES datastore restart after {outage:.0f} s: service answered {t_up - t_kill:.1f} s after the kill, "
            f"guest acks again {t_ack - t_kill:.1f} s after it (agent resumed an I/O-error pause: {resumed}); {summary}")
    print(line)
    record_property("figures", line)
