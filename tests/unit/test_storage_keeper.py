"""LeaseKeeper with a fake datastore client and a controllable clock."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from kvmotion.api.disks import Lease
from kvmotion.core.errors import LeaseError, Unreachable
from kvmotion.storage.keeper import LeaseKeeper

TTL = 9.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeDatastore:
    """Answers renewals from a script: a Lease, or an exception to raise."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.leases: dict[str, Lease] = {}
        self.fail: dict[str, Exception] = {}
        self.calls: list[tuple[str, float]] = []

    async def renew(self, disk: str) -> Lease:
        self.calls.append((disk, self.clock()))
        if disk in self.fail:
            raise self.fail[disk]
        lease = replace(self.leases[disk], expires_at=self.clock() + TTL)
        self.leases[disk] = lease
        return lease


def lease(disk: str = "web1.img", gen: int = 1, host: str = "host-a") -> Lease:
    return Lease(disk, host, "web1", gen, 0.0)


@pytest.fixture
def setup() -> tuple[Clock, FakeDatastore, list[str], LeaseKeeper]:
    clock = Clock()
    ds = FakeDatastore(clock)
    lost: list[str] = []
    keeper = LeaseKeeper(ds, "host-a", TTL, lost.append, clock=clock)
    return clock, ds, lost, keeper


def test_run_renews_every_third_of_ttl(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    clock, ds, lost, _ = setup
    ds.leases["web1.img"] = lease()
    sleeps: list[float] = []

    class Enough(Exception):
        pass

    async def fake_sleep(dt: float) -> None:
        sleeps.append(dt)
        clock.t += dt
        if len(sleeps) == 4:
            raise Enough

    keeper = LeaseKeeper(ds, "host-a", TTL, lost.append, clock=clock, sleep=fake_sleep)
    keeper.keep(ds.leases["web1.img"])
    with pytest.raises(Enough):
        asyncio.run(keeper.run())
    assert sleeps == [TTL / 3] * 4
    assert [t for _, t in ds.calls] == [100.0, 103.0, 106.0, 109.0]
    assert lost == []


def test_refused_renewal_reports_loss_once(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    _clock, ds, lost, keeper = setup
    ds.leases["web1.img"] = lease()
    ds.leases["db.img"] = lease("db.img")
    keeper.keep(ds.leases["web1.img"])
    keeper.keep(ds.leases["db.img"])
    ds.fail["web1.img"] = LeaseError("cannot renew web1.img for host-a: it is leased to host-b")
    assert asyncio.run(keeper.renew_once()) == ["web1.img"]
    assert lost == ["web1.img"]
    assert [x.disk for x in keeper.held()] == ["db.img"]
    asyncio.run(keeper.renew_once())
    assert lost == ["web1.img"]


def test_unreachable_is_tolerated_until_the_lease_would_expire(
    setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper],
) -> None:
    clock, ds, lost, keeper = setup
    ds.leases["web1.img"] = lease()
    keeper.keep(ds.leases["web1.img"], requested_at=clock())
    asyncio.run(keeper.renew_once())  # last success sent at t=100: expired surely by 109
    ds.fail["web1.img"] = Unreachable("datastore down")
    clock.t = 108.9
    asyncio.run(keeper.renew_once())
    assert lost == []
    clock.t = 109.0
    asyncio.run(keeper.renew_once())
    assert lost == ["web1.img"]


def test_deadline_counts_from_when_the_request_was_sent(
    setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper],
) -> None:
    clock, ds, lost, keeper = setup
    ds.leases["web1.img"] = lease()

    async def slow_renew(disk: str) -> Lease:
        answer = await FakeDatastore.renew(ds, disk)
        clock.t += 2  # the answer takes 2 s to arrive
        return answer

    ds.renew = slow_renew  # type: ignore[method-assign]
    keeper.keep(ds.leases["web1.img"], requested_at=clock())
    asyncio.run(keeper.renew_once())  # sent at 100, answered at 102
    assert clock() == 102.0
    ds.fail["web1.img"] = Unreachable("down")
    clock.t = 108.9
    asyncio.run(keeper.renew_once())
    assert lost == []
    clock.t = 109.5  # before 102 + TTL, but the datastore may have expired it at 100 + TTL
    asyncio.run(keeper.renew_once())
    assert lost == ["web1.img"]


def test_lease_that_moved_generation_is_lost(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    _, ds, lost, keeper = setup
    keeper.keep(lease(gen=3))
    ds.leases["web1.img"] = lease(gen=5)  # it went away and came back: our connection is stale
    asyncio.run(keeper.renew_once())
    assert lost == ["web1.img"]


def test_forgotten_lease_is_neither_renewed_nor_lost(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    _, ds, lost, keeper = setup
    ds.leases["web1.img"] = lease()
    keeper.keep(ds.leases["web1.img"])
    keeper.forget("web1.img")  # transferred to the destination
    ds.fail["web1.img"] = LeaseError("leased to host-b")
    asyncio.run(keeper.renew_once())
    assert ds.calls == [] and lost == []


def test_keep_refuses_another_hosts_lease(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    with pytest.raises(LeaseError):
        setup[3].keep(lease(host="host-b"))


def test_async_callback_and_failing_callback(setup: tuple[Clock, FakeDatastore, list[str], LeaseKeeper]) -> None:
    clock, ds, _, _ = setup
    seen: list[str] = []

    async def on_lost(disk: str) -> None:
        seen.append(disk)
        if disk == "a.img":
            raise RuntimeError("agent bug")

    keeper = LeaseKeeper(ds, "host-a", TTL, on_lost, clock=clock)
    for d in ("a.img", "b.img"):
        keeper.keep(lease(d))
        ds.fail[d] = LeaseError("gone")
    assert asyncio.run(keeper.renew_once()) == ["a.img", "b.img"]
    assert seen == ["a.img", "b.img"]


def test_blocking_client_runs_off_the_event_loop() -> None:
    class SyncClient:
        def renew(self, disk: str) -> Lease:
            return lease()

    lost: list[str] = []
    keeper = LeaseKeeper(SyncClient(), "host-a", TTL, lost.append)
    keeper.keep(lease())
    assert asyncio.run(keeper.renew_once()) == []
    assert keeper.held()[0].generation == 1
