"""Datastore (files + lease state) and the lease lock the NBD server shares with it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvmotion.core.errors import Conflict, InvalidInput, LeaseError, NotFound
from kvmotion.storage.datastore import Datastore
from kvmotion.storage.lease import check_write
from kvmotion.storage.leasefile import LeaseGate

TTL = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ds(tmp_path: Path, clock: FakeClock) -> Datastore:
    d = Datastore("ds1", tmp_path, TTL, clock)
    d.create_disk("web1.img", 1 << 20)
    return d


def test_create_list_delete(ds: Datastore, tmp_path: Path) -> None:
    info = ds.create_disk("db.img", 4 << 20)
    assert (info.name, info.size, info.lease, info.generation) == ("db.img", 4 << 20, None, 0)
    assert (tmp_path / "db.img").stat().st_size == 4 << 20
    assert [d.name for d in ds.list_disks()] == ["db.img", "web1.img"]  # lease files are not disks
    ds.delete_disk("db.img")
    assert [d.name for d in ds.list_disks()] == ["web1.img"]


def test_create_refusals(ds: Datastore) -> None:
    with pytest.raises(Conflict, match="already exists"):
        ds.create_disk("web1.img", 1 << 20)
    for size in (0, -512, 1000):
        with pytest.raises(InvalidInput, match="multiple of 512"):
            ds.create_disk("x.img", size)
    with pytest.raises(InvalidInput):
        ds.create_disk("../x.img", 1 << 20)


@pytest.mark.parametrize("size", [(64 << 40) + 512, 12412839832130139868626944])
def test_a_size_beyond_any_vm_disk_is_refused_and_leaves_nothing(ds: Datastore, tmp_path: Path, size: int) -> None:
    """Found by the fuzz test: os.ftruncate raised OverflowError (a 500) and left the new file behind."""
    with pytest.raises(InvalidInput, match=r"^invalid disk size \d+: use a positive multiple of 512 bytes up to 64\.0 TiB"):
        ds.create_disk("big.img", size)
    assert not (tmp_path / "big.img").exists()


def test_prealloc_allocates(ds: Datastore) -> None:
    assert ds.create_disk("thick.img", 1 << 20, prealloc=True).allocated >= 1 << 20


def test_lease_ops_need_an_existing_disk(ds: Datastore) -> None:
    with pytest.raises(NotFound):
        ds.acquire("nope.img", "host-a", "vm")


def test_lease_state_survives_restart(ds: Datastore, tmp_path: Path, clock: FakeClock) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    ds.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    again = Datastore("ds1", tmp_path, TTL, clock)
    info = again.disk("web1.img")
    assert info.lease is not None and (info.lease.host, info.lease.generation) == ("host-b", 2)
    with pytest.raises(LeaseError):
        again.renew("web1.img", "host-a")
    assert again.renew("web1.img", "host-b").generation == 2


def test_delete_refused_while_leased(ds: Datastore) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    with pytest.raises(LeaseError, match="release the lease"):
        ds.delete_disk("web1.img")
    ds.release("web1.img", "host-a")
    ds.delete_disk("web1.img")


def test_gate_sees_each_change(ds: Datastore, tmp_path: Path, clock: FakeClock) -> None:
    gate = LeaseGate(tmp_path)
    with gate.hold() as leases:
        assert leases == {}
    ds.acquire("web1.img", "host-a", "web1")
    with gate.hold() as leases:
        bound = check_write(leases.get("web1.img"), "host-a", None, clock()).generation
        assert bound == 1
    ds.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
    with gate.hold() as leases:
        assert not check_write(leases.get("web1.img"), "host-a", bound, clock()).allowed
        assert check_write(leases.get("web1.img"), "host-b", None, clock()).allowed


def test_transfer_waits_for_a_write_in_flight(ds: Datastore, tmp_path: Path) -> None:
    """Once transfer() returns, no write authorized under the old generation is still running."""
    ds.acquire("web1.img", "host-a", "web1")
    gate = LeaseGate(tmp_path)
    in_write = threading.Event()
    finish = threading.Event()
    events: list[str] = []

    def writer() -> None:
        with gate.hold():
            in_write.set()
            finish.wait(5)
            events.append("write done")

    t = threading.Thread(target=writer)
    t.start()
    in_write.wait(5)

    def move() -> None:
        ds.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
        events.append("transferred")

    mover = threading.Thread(target=move)
    mover.start()
    time.sleep(0.2)
    assert events == []  # transfer is blocked by the write
    finish.set()
    t.join(5)
    mover.join(5)
    assert events == ["write done", "transferred"]


def test_waiting_transfer_is_not_starved_by_new_writers(ds: Datastore, tmp_path: Path) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    gates = [LeaseGate(tmp_path) for _ in range(2)]
    stop = threading.Event()

    def writers(gate: LeaseGate) -> None:  # overlapping holds: never a moment without one
        while not stop.is_set():
            with gate.hold():
                time.sleep(0.01)

    threads = [threading.Thread(target=writers, args=(g,)) for g in gates for _ in range(2)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        ds.transfer("web1.img", "host-a", "host-b", "web1", by="host-a")
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_restart_gives_leases_back_the_time_the_service_was_down(
    ds: Datastore, tmp_path: Path, clock: FakeClock
) -> None:
    assert ds.resume_after_outage() == []  # never ran here: nothing to give back
    ds.acquire("web1.img", "host-a", "web1")
    ds.heartbeat()  # last sign of life at 5000; the lease runs until 5010
    clock.t += 30  # the service was down for 30 s
    again = Datastore("ds1", tmp_path, TTL, clock)
    assert again.disk("web1.img").lease is None
    resumed = again.resume_after_outage()
    assert [(lease.host, lease.generation, lease.expires_at) for lease in resumed] == [("host-a", 1, clock.t + TTL)]
    assert again.renew("web1.img", "host-a").generation == 1
    gate = LeaseGate(tmp_path)
    with gate.hold() as leases:
        assert check_write(leases.get("web1.img"), "host-a", 1, clock.t).allowed
