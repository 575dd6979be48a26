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
    return broken


class FakeSocket:
    """Our duplicate of channel 0's socket: records when it is shut down, after which QMP command."""

    def __init__(self, monitor: FakeMonitor) -> None:
        self.monitor = monitor
        self.shut_after: list[str] | None = None
        self.closed = False

    def shutdown(self, how: int) -> None:
        self.shut_after = list(self.monitor.commands)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


class Catch:
    """catch_channel_0 and finish_break, recorded."""

    def __init__(self, monitor: FakeMonitor, caught: bool = True) -> None:
        self.sock = FakeSocket(monitor)
        self.caught = cancel.Caught(_w("mig/src/send_0", 21), self.sock) if caught else None  # type: ignore[arg-type]
        self.monitor = monitor
        self.finished: list[tuple] = []

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(cancel, "catch_channel_0", lambda pid, timeout: self.caught)
        monkeypatch.setattr(cancel, "finish_break", self.finish)

    def finish(self, pid: int, caught: cancel.Caught) -> cancel.Broken:
        assert self.sock.shut_after is not None, "channel 0 is shut down before the rest"
        self.finished.append((pid, caught.write.fd, list(self.monitor.commands)))
        return cancel.Broken(4, True)


def test_a_stream_that_ends_by_itself_is_not_broken(fast):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": n}} for n in range(1, 4)]
                          + [{"status": "cancelled"}])
    status = asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 5.0))
    assert status.value == "cancelled" and fast == []
    assert monitor.commands[0] == "migrate_cancel"


def test_a_user_s_cancel_comes_while_channel_0_writes_and_shuts_it_at_once(fast, monkeypatch):
    """Cancelled first (so the cleanup's byes stop at channel 0), then channel 0's socket at once,
    before the rest of the stream and before any other QMP command."""
    monitor = FakeMonitor([{"status": "cancelled"}])
    catch = Catch(monitor)
    catch.install(monkeypatch)
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 1.0, moving=True)).value == "cancelled"
    assert catch.sock.shut_after == ["migrate_cancel"] and catch.sock.closed
    assert catch.finished == [(1234, 21, ["migrate_cancel"])]
    assert fast == []  # broken once, not again by the stall watch


def test_a_cancel_that_fails_leaves_channel_0_alone(fast, monkeypatch):
    """migrate_cancel did not get through: breaking channel 0 would fail the migration instead."""
    monitor = FakeMonitor([{"status": "active"}])
    catch = Catch(monitor)
    catch.install(monkeypatch)

    async def refuse(command: str, **arguments) -> object:
        raise RuntimeError("lost the QEMU monitor")

    with pytest.raises(RuntimeError, match="lost the QEMU monitor"):
        asyncio.run(cancel.cancel_migration(refuse, 1234, 0.2, moving=True))
    assert catch.sock.shut_after is None and catch.sock.closed and catch.finished == []  # our duplicate closed


def test_a_broken_off_stream_that_hangs_is_not_broken_again(fast, monkeypatch):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": 7}}])
    Catch(monitor).install(monkeypatch)
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 0.2, moving=True)).value == "cancelling"
    assert fast == []


def test_a_user_s_cancel_without_channel_0_caught_is_a_plain_cancel(fast, monkeypatch):
    monitor = FakeMonitor([{"status": "cancelling", "ram": {"transferred": 7}}])
    catch = Catch(monitor, caught=False)
    catch.install(monkeypatch)
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 0.3, moving=True)).value == "cancelling"
    assert monitor.commands[0] == "migrate_cancel" and catch.finished == []
    assert fast == [1234]  # the stall watch still breaks it off


def test_a_failing_stream_is_cancelled_at_once(fast, monkeypatch):
    """A rollback after the destination failed: no wait for channel 0 (its sockets are failing)."""
    monitor = FakeMonitor([{"status": "cancelled"}])
    monkeypatch.setattr(cancel, "catch_channel_0", lambda pid, timeout: pytest.fail("waited for channel 0"))
    assert asyncio.run(cancel.cancel_migration(monitor.ask, 1234, 1.0)).value == "cancelled"
    assert monitor.commands == ["migrate_cancel", "query-migrate"]


def test_channel_0_is_caught_only_inside_the_same_write_on_two_looks(monkeypatch):
    looks = iter([None, _w("mig/src/send_0", 21), _w("mig/src/send_0", 22), _w("mig/src/send_0", 22)])
    monkeypatch.setattr(cancel, "channel_0_write", lambda pid: next(looks))
    monkeypatch.setattr(cancel, "CATCH_POLL", 0.0)
    dups: list[tuple] = []
    monkeypatch.setattr(cancel, "dup_socket", lambda pid, fd, inode: dups.append((fd, inode)) or "sock")
    caught = cancel.catch_channel_0(1234, 1.0)
    assert caught == cancel.Caught(_w("mig/src/send_0", 22), "sock") and dups == [(22, 1022)]  # type: ignore[arg-type]


def test_channel_0_not_caught_in_time_or_gone(monkeypatch):
    monkeypatch.setattr(cancel, "CATCH_POLL", 0.001)
    monkeypatch.setattr(cancel, "channel_0_write", lambda pid: None)
    t0 = time.monotonic()
    assert cancel.catch_channel_0(1234, 0.05) is None and time.monotonic() - t0 < 0.5
    monkeypatch.setattr(cancel, "channel_0_write", lambda pid: _w("mig/src/send_0", 21))
    monkeypatch.setattr(cancel, "dup_socket", lambda pid, fd, inode: None)  # closed meanwhile
    assert cancel.catch_channel_0(1234, 0.05) is None


def test_channel_0_write_is_sender_0_s_only(monkeypatch):
    monkeypatch.setattr(cancel, "blocked_writes", lambda pid: [_w("mig/src/send_10", 23), _w("mig/src/main", 20),
                                                               _w("mig/src/send_0", 21)])
    assert cancel.channel_0_write(1234) == _w("mig/src/send_0", 21)
    monkeypatch.setattr(cancel, "blocked_writes", lambda pid: [_w("mig/src/send_1", 22)])
    assert cancel.channel_0_write(1234) is None


def test_after_channel_0_the_rest_of_the_stream_goes_once_its_sender_left(monkeypatch):
    fake = FakeQemu([])
    fake.install(monkeypatch)
    caught = cancel.Caught(_w("mig/src/send_0", 21), None)  # type: ignore[arg-type]
    assert cancel.finish_break(1234, caught) == cancel.Broken(shut=4, first=True)
    assert fake.calls == [("look", 21), ("look", 21), ("shutdown", 20, 1020), ("shutdown", 22, 1022),
                          ("shutdown", 23, 1023)]  # never the datastore's socket


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
