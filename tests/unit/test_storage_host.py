"""storage.host.take_back_leases (the rollback step) against a real Datastore with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmotion.errors import LeaseError
from kvmotion.qemu.spec import DiskSpec, VmSpec
from kvmotion.storage import host as storage_host
from kvmotion.storage.datastore import Datastore, DiskInfo
from kvmotion.storage.lease import Lease

TTL = 15.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


class LocalClient:
    """What host.py asks of a DatastoreClient, served by a Datastore in this process."""

    def __init__(self, ds: Datastore) -> None:
        self.ds = ds

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None) -> Lease:
        return self.ds.transfer(disk, from_host, to_host, vm, generation)

    def acquire(self, disk: str, host: str, vm: str) -> Lease:
        return self.ds.acquire(disk, host, vm)

    def disk(self, disk: str) -> DiskInfo:
        return self.ds.disk(disk)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ds(tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Datastore:
    d = Datastore("ds1", tmp_path, TTL, clock)
    d.create_disk("web1.img", 1 << 20)
    monkeypatch.setattr(storage_host, "_client", lambda name: LocalClient(d))
    return d


SPEC = VmSpec(name="web1", memory=256 << 20, disks=(DiskSpec(source="web1.img", datastore="ds1"),))


def test_lease_still_live_at_the_destination_is_transferred_back(ds: Datastore) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    storage_host.take_back_leases(SPEC, "host-b", "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


def test_lease_that_expired_at_the_destination_is_acquired_afresh(ds: Datastore, clock: FakeClock) -> None:
    """A rollback after a commit retried for longer than the TTL: nobody renewed the lease."""
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    storage_host.take_back_leases(SPEC, "host-b", "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


def test_lease_that_never_left_the_source_is_reissued_to_it(ds: Datastore) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.take_back_leases(SPEC, "host-b", "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 2)


def test_a_switchover_request_arriving_after_the_take_back_moves_nothing(ds: Datastore) -> None:
    """A datastore stalled past the source's timeout: the rollback takes the lease back first,
    then the stalled switchover request is served."""
    ds.acquire("web1.img", "host-a", "web1")
    held = storage_host.lease_generations(SPEC, "host-a")
    assert held == {"web1.img": 1}
    storage_host.take_back_leases(SPEC, "host-b", "host-a")  # the hand-over timed out: roll back
    with pytest.raises(LeaseError, match="generation 2 now, not 1"):
        storage_host.transfer_leases(SPEC, "host-a", "host-b", held)  # ... and then it arrives
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 2)


def test_a_switchover_request_landing_during_the_take_back_is_undone(ds: Datastore, monkeypatch) -> None:
    """The late request is served between the take-back's first refusal and its re-issue."""
    ds.acquire("web1.img", "host-a", "web1")
    held = storage_host.lease_generations(SPEC, "host-a")
    real = Datastore.disk
    late: list[Lease] = []

    def disk_then_late_transfer(self: Datastore, name: str):
        info = real(self, name)
        if not late:  # the take-back has just read the lease: the stalled request lands now
            late.append(self.transfer(name, "host-a", "host-b", "web1", held["web1.img"]))
        return info

    monkeypatch.setattr(Datastore, "disk", disk_then_late_transfer)
    storage_host.take_back_leases(SPEC, "host-b", "host-a")
    monkeypatch.setattr(Datastore, "disk", real)
    assert [(x.host, x.generation) for x in late] == [("host-b", 2)]
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


def test_lease_another_host_took_is_not_taken_back(ds: Datastore, clock: FakeClock) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    ds.acquire("web1.img", "host-c", "web1")
    with pytest.raises(LeaseError):
        storage_host.take_back_leases(SPEC, "host-b", "host-a")
    assert ds.disk("web1.img").holder == "host-c"
