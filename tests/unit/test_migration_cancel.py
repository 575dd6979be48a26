"""kvmotion.qemu.cancel: which socket of a stalled stream goes first, when a cancelled stream
counts as stalled, and the order the sockets are shut down in."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmotion.qemu import cancel
from kvmotion.qemu.migstatus import MigrationSample
from kvmotion.qemu.sockets import BlockedWrite, TcpSocket

DEST = ("10.77.0.3", 49152)
DATASTORE = ("10.77.0.9", 10809)


def _w(thread: str, fd: int) -> BlockedWrite:
    return BlockedWrite(thread=thread, tid=100 + fd, fd=fd, inode=1000 + fd)


def _s(fd: int, peer: tuple[str, int]) -> TcpSocket:
    return TcpSocket(fd=fd, peer=peer, unsent=0, inode=1000 + fd)


SOCKETS = [_s(20, DEST), _s(21, DEST), _s(22, DEST), _s(23, DEST), _s(30, DATASTORE)]


def test_channel_0_goes_first_and_then_every_socket_to_the_destination():
    writes = [_w("mig/src/send_2", 23), _w("mig/src/send_0", 21), _w("mig/src/send_1", 22),
              _w("qemu-system-x86", 30)]  # an NBD write of the guest's disk: not the stream's
    plan = cancel.break_plan(writes, SOCKETS)
    assert plan == cancel.BreakPlan(first=_w("mig/src/send_0", 21), peers=frozenset({DEST}))


def test_without_channel_0_blocked_the_stream_goes_all_at_once():
    plan = cancel.break_plan([_w("mig/src/send_1", 22), _w("mig/src/send_10", 23)], SOCKETS)
    assert plan == cancel.BreakPlan(first=None, peers=frozenset({DEST}))


def test_nothing_to_break_when_no_migration_thread_is_blocked_on_a_socket():
    assert cancel.break_plan([_w("qemu-system-x86", 30)], SOCKETS) is None
    assert cancel.break_plan([], SOCKETS) is None
    # a descriptor that is no TCP socket of the process (closed since)
    assert cancel.break_plan([_w("mig/src/send_0", 99)], SOCKETS) is None


def _sample(status: str, transferred: int | None) -> MigrationSample:
    data: dict = {"status": status}
    if transferred is not None:
        data["ram"] = {"transferred": transferred}
    return MigrationSample.from_qmp(data)


def test_a_cancelled_stream_is_held_only_after_no_progress_for_the_whole_delay():
    watch = cancel.CancelWatch()
    assert not watch.held(_sample("cancelling", 100), 0.0)
    assert not watch.held(_sample("cancelling", 100), cancel.CANCEL_STALL - 0.01)
    assert not watch.held(_sample("cancelling", 200), cancel.CANCEL_STALL)  # moved: the delay starts again
    assert not watch.held(_sample("cancelling", 200), 2 * cancel.CANCEL_STALL - 0.01)
    assert watch.held(_sample("cancelling", 200), 2 * cancel.CANCEL_STALL)


def test_only_a_cancelling_stream_is_held():
    watch = cancel.CancelWatch()
    for t in range(5):
        assert not watch.held(_sample("active", 100), float(t))
    assert not watch.held(_sample("cancelling", None), 5.0)
    assert watch.held(_sample("cancelling", None), 5.0 + cancel.CANCEL_STALL)
    assert not watch.held(_sample("failed", None), 10.0)


class FakeQemu:
    """The I/O of break_stalled_stream, recorded: channel 0's sender leaves its write on the
    second look after its socket was shut down."""

    def __init__(self, writes: list[BlockedWrite]) -> None:
        self.writes = writes
        self.calls: list[tuple] = []
        self.looks = 0

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(cancel, "blocked_writes", lambda pid: self.writes)
        monkeypatch.setattr(cancel, "tcp_sockets", lambda pid: SOCKETS)
        monkeypatch.setattr(cancel, "shutdown_socket", self.shutdown)
        monkeypatch.setattr(cancel, "still_writing", self.still_writing)

    def shutdown(self, pid: int, fd: int, inode: int) -> bool:
        self.calls.append(("shutdown", fd, inode))
        return True

    def still_writing(self, pid: int, w: BlockedWrite) -> bool:
        self.looks += 1
        self.calls.append(("look", w.fd))
        return self.looks < 2


def test_the_rest_is_shut_down_only_once_channel_0_s_sender_left_its_write(monkeypatch):
    fake = FakeQemu([_w("mig/src/send_1", 22), _w("mig/src/send_0", 21)])
    fake.install(monkeypatch)
    assert cancel.break_stalled_stream(1234) == cancel.Broken(shut=4, first=True)
    assert fake.calls == [("shutdown", 21, 1021), ("look", 21), ("look", 21),
                          ("shutdown", 20, 1020), ("shutdown", 22, 1022), ("shutdown", 23, 1023)]


def test_a_stream_no_migration_thread_waits_on_is_left_alone(monkeypatch):
    fake = FakeQemu([_w("qemu-system-x86", 30)])
    fake.install(monkeypatch)
    assert cancel.break_stalled_stream(1234) == cancel.Broken(shut=0, first=False)
    assert fake.calls == []


class FakeMonitor:
    def __init__(self, answers: list[dict]) -> None:
        self.answers = answers
        self.commands: list[str] = []
        self.arguments: list[dict] = []

    async def ask(self, command: str, **arguments) -> object:
        self.commands.append(command)
        self.arguments.append(arguments)
        if command == "query-migrate":
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return {}


@pytest.fixture()
def fast(monkeypatch):
    monkeypatch.setattr(cancel, "CANCEL_STALL", 0.05)
    monkeypatch.setattr(cancel, "CANCEL_POLL", 0.005)
    broken: list[int] = []
    monkeypatch.setattr(cancel, "break_stalled_stream", lambda pid: broken.append(pid) or cancel.Broken(4, True))
    monkeypatch.setattr(cancel, "stream_writes", lambda pid: [])
    return broken


def test_a_stream_that_ends_by_itself_is_not_broken(fast):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": n}} for n in range(1, 4)]
                          + [{"status": "cancelled"}])
    status = asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 5.0, healthy=True))
    assert status.value == "cancelled" and fast == []
    assert monitor.commands[:2] == ["migrate-set-parameters", "migrate_cancel"]
    assert monitor.arguments[0] == {"max-bandwidth": cancel.QUIESCE_RATE}


def test_a_failing_stream_is_cancelled_at_once(fast, monkeypatch):
    """A rollback after the destination failed: no quiesce (the stream's sockets are failing)."""
    monkeypatch.setattr(cancel, "stream_writes", lambda pid: [_w("mig/src/send_0", 21)])
    monitor = FakeMonitor([{"status": "cancelled"}])
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 1.0)).value == "cancelled"
    assert monitor.commands[0] == "migrate_cancel"


def test_cancel_waits_until_no_sender_is_inside_a_write(fast, monkeypatch):
    """The cleanup migrate_cancel starts says bye on each TLS session: only once no sender writes to one."""
    looks: list[str] = []

    def writes(pid: int) -> list:
        looks.append(monitor.commands[-1])
        return [_w("mig/src/send_0", 21)] if len(looks) < 3 else []

    monkeypatch.setattr(cancel, "stream_writes", writes)
    monitor = FakeMonitor([{"status": "cancelled"}])
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 1.0, healthy=True)).value == "cancelled"
    assert looks == ["migrate-set-parameters"] * 3  # every look came before migrate_cancel
    assert monitor.commands[1] == "migrate_cancel"


def test_a_stream_that_keeps_writing_is_cancelled_after_the_quiesce_bound(fast, monkeypatch):
    monkeypatch.setattr(cancel, "QUIESCE_TIMEOUT", 0.05)
    monkeypatch.setattr(cancel, "stream_writes", lambda pid: [_w("mig/src/send_0", 21)])
    monitor = FakeMonitor([{"status": "cancelled"}])
    t0 = time.monotonic()
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 1.0, healthy=True)).value == "cancelled"
    assert 0.05 <= time.monotonic() - t0 < 1.0
    assert monitor.commands[:2] == ["migrate-set-parameters", "migrate_cancel"]


def test_a_cancelled_stream_that_stalls_is_broken_once(fast):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": 7}}])
    status = asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 0.3))
    assert status.value == "cancelling" and fast == [1234]  # gave up after `wait`, broken only once


def test_without_a_process_nothing_is_broken(fast):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": 7}}])
    assert asyncio.run(cancel.cancel_migration(monitor.ask, None, 0.2)).value == "cancelling"
    assert fast == []


def test_without_channel_0_the_sockets_go_at_once(monkeypatch):
    fake = FakeQemu([_w("mig/src/send_2", 23)])
    fake.install(monkeypatch)
    assert cancel.break_stalled_stream(1234) == cancel.Broken(shut=4, first=False)
    assert [c for c in fake.calls if c[0] == "look"] == []
    assert str(cancel.Broken(shut=4, first=False)) == "shut down 4 of its sockets at once"
