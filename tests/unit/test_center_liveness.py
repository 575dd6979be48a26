"""Host liveness: the decision as a pure function of (now, when this center started, the hosts'
last heartbeats), and the controller's loop with an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmotion.api.center import (
    EventKind,
    HostLoad,
    HostState,
    ObservedState,
    ReportedState,
    VmReport,
)
from kvmotion.center.heartbeat import HeartbeatController
from kvmotion.center.liveness import Seen, after_heartbeat, silent
from kvmotion.center.store import HostRow, SqliteStore, TokenRow

C, N = HostState.CONNECTED, HostState.NOT_RESPONDING
LIMIT = 10.0


def names(now: float, started: float, hosts: list[Seen]) -> list[str]:
    return [h.name for h in silent(now, started, hosts, LIMIT)]


def test_silent_for_more_than_the_limit() -> None:
    hosts = [Seen("a", C, 100.0), Seen("b", C, 105.0), Seen("c", C, 110.0)]
    assert names(110.0, 0.0, hosts) == []
    assert names(110.0 + 0.001, 0.0, hosts) == ["a"]  # more than 10 s, not exactly 10
    assert names(116.0, 0.0, hosts) == ["a", "b"]
    assert names(1e9, 0.0, hosts) == ["a", "b", "c"]


def test_only_connected_hosts_fall_silent() -> None:
    hosts = [Seen("down", N, 1.0), Seen("never", N, None)]
    assert names(1000.0, 0.0, hosts) == []


def test_time_the_center_was_down_does_not_count() -> None:
    """A host last heard before this center started is given the limit from the start."""
    hosts = [Seen("a", C, 100.0), Seen("b", C, None)]
    assert names(505.0, 500.0, hosts) == []
    assert names(510.5, 500.0, hosts) == ["a", "b"]


def test_a_heartbeat_brings_a_host_back() -> None:
    assert after_heartbeat(N) is C
    assert after_heartbeat(C) is C


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "center.db")
    s.add_token(TokenRow("0123456789ab", "ab" * 32, 1e12, None, 0.0, "test"), "test")
    for name in ("host-a", "host-b"):
        s.join("0123456789ab", lambda token: None,
               HostRow(name, "10.0.0.1", "https://10.0.0.1:7701", HostState.NOT_RESPONDING, 0.0), f"host:{name}")
    yield s
    s.close()


def test_the_loop_marks_silent_hosts_and_stops(store: SqliteStore) -> None:
    load = HostLoad(cpus=1, memory_total=1, memory_available=1)
    clock = Clock(1000.0)
    controller = HeartbeatController(store, clock=clock, interval=0.01)
    store.record_heartbeat("host-a", 1000.0, (VmReport(name="web1", state=ReportedState.RUNNING),), load, ())
    store.record_heartbeat("host-b", 1000.0, (), load, ())

    async def scenario() -> None:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            loop = tasks.create_task(controller.run(stop))
            clock.now = 1007.0
            await asyncio.sleep(0.1)  # several ticks: nothing is silent yet
            assert {h.state for h in store.hosts()} == {C}
            store.record_heartbeat("host-b", 1007.0, (), load, ())
            clock.now = 1008.5
            await _until(lambda: store.host("host-a").state is N)
            assert store.host("host-b").state is C  # heard at 1007
            assert store.vm("web1").observed_state is ObservedState.UNKNOWN  # not lost, not deleted
            store.record_heartbeat("host-a", 1011.0, (VmReport(name="web1", state=ReportedState.RUNNING),), load, ())
            assert store.host("host-a").state is C and store.vm("web1").observed_state is ObservedState.RUNNING
            stop.set()
            await asyncio.wait_for(loop, 5)  # ends within a tick of being told

    asyncio.run(scenario())
    kinds = [(e.object, e.kind) for e in store.events() if e.kind in (EventKind.HOST_NOT_RESPONDING, EventKind.HOST_CONNECTED)]
    assert kinds == [("host:host-a", EventKind.HOST_CONNECTED), ("host:host-b", EventKind.HOST_CONNECTED),
                     ("host:host-a", EventKind.HOST_NOT_RESPONDING), ("host:host-a", EventKind.HOST_CONNECTED)]


def test_the_loop_survives_a_failing_tick_and_is_cancellable(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(0.0)
    controller = HeartbeatController(store, clock=clock, interval=0.01)
    calls = []

    def failing() -> list[str]:
        calls.append(1)
        raise OSError("disk I/O error")

    monkeypatch.setattr(controller, "tick_sync", failing)

    async def scenario() -> None:
        task = asyncio.create_task(controller.run(asyncio.Event()))
        await _until(lambda: len(calls) >= 3)  # failed ticks are logged; the loop goes on
        task.cancel()
        with pytest.raises(asyncio.CancelledError):  # cancellation is not swallowed
            await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


async def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
