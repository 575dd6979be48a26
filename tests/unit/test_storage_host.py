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

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str) -> Lease:
        return self.ds.transfer(disk, from_host, to_host, vm)

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


def test_lease_that_never_left_the_source_stays(ds: Datastore) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.take_back_leases(SPEC, "host-b", "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 1)


def test_lease_another_host_took_is_not_taken_back(ds: Datastore, clock: FakeClock) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    ds.acquire("web1.img", "host-c", "web1")
    with pytest.raises(LeaseError):
        storage_host.take_back_leases(SPEC, "host-b", "host-a")
    assert ds.disk("web1.img").holder == "host-c"
