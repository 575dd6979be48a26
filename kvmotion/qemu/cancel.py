"""Cancelling an outgoing migration in an order QEMU 10.0 survives.

QEMU 10.0.2 with multifd over TLS aborts the source ("util/error.c:68: error_setv: Assertion
`*errp == NULL' failed") when a multifd socket fails while its sender thread and the main thread
both write to it. The cleanup of a failed or cancelled migration (main thread) ends each channel's
TLS session (migration/multifd.c multifd_send_shutdown -> qio_channel_tls_bye) before it stops the
channel's sender (multifd_send_terminate_threads); a sender still blocked in a write to a
destination that reads nothing shares the session's single write error with that bye
(crypto/tlssession.c qcrypto_tls_session_push), so when the socket fails both set it. A stalled
stream that is only cancelled stays "cancelling" until the destination dies; its sockets then
fail one after the other, the first failure wakes the migration thread, and the cleanup's bye
races the senders still blocked.

A cancelled migration ("cancelling") says bye on channel 0 first and stops at the first bye that
fails; a failed one says bye on every channel. So a stream is never broken before it is cancelled,
and channel 0 matters most: its sender must not be inside a write, nor start one, while the
cleanup says bye on it.

A stream still moving when the user cancels it fails at once (migrate_cancel shuts its main
channel down), and the cleanup then says bye on channel 0 while its sender may be writing to a
slow link, or may be about to with a batch just handed to it. So a user's cancel waits for a moment
when channel 0's sender is inside a write (seen twice, 1 ms apart: held by the link, it stays
there for a while, and holds no new batch), cancels, and at once shuts channel 0's socket down:
the sender leaves its write failing, and the bye on channel 0 fails alone. Then every other socket
of the stream goes, as below. (Slowing the stream first cannot give such a moment: QEMU's smallest
max-bandwidth, 10 bytes/s, still sends a multifd batch on every channel each 100 ms, and 1 byte/s
rounds to 0, "unlimited". Breaking every socket before migrate_cancel fails the migration instead,
and a failed one says bye on every channel, racing senders still compressing a batch.)

A stream that stalled (nothing leaves it) is cancelled first; once it is seen to make no progress,
channel 0's socket is shut down first; its sender fails and leaves its write before it wakes the
migration thread, whose cleanup's bye on channel 0 then fails at once; then every other socket of
the stream. Plain multifd sends no bye, but a stalled stream is broken off the same way: the
cancel then ends at once instead of when the destination dies.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus
from kvmotion.qemu.sockets import (
    BlockedWrite,
    TcpSocket,
    blocked_writes,
    dup_socket,
    shut,
    shutdown_socket,
    still_writing,
    tcp_sockets,
)

log = logging.getLogger("kvmotion.migration")

# QEMU 10.0's names of its outgoing migration threads (migration/migration.h), which QEMU gives
# them when started with -name ...,debug-threads=on.
MIGRATION_THREADS = "mig/src/"
SENDER = re.compile(r"mig/src/send_(\d+)")
CANCEL_STALL = 1.0  # s a cancelled stream may make no progress before it is broken off
LEAVE_TIMEOUT = 2.0  # s channel 0's sender may take to leave its write once its socket is shut down
LEAVE_POLL = 0.001  # s; it takes ~0.1 ms
CATCH_TIMEOUT = 0.5  # s a user's cancel waits for channel 0's sender to be inside a write
CATCH_POLL = 0.001  # s between looks (a look reads /proc: ~0.3 ms)
CANCEL_POLL = 0.025  # s between queries while the cancel settles


@dataclass(frozen=True)
class BreakPlan:
    """Which of the stream's sockets to shut down, in order: `first` (then wait until its thread
    has left its write), then every socket of the process connected to one of `peers`."""

    first: BlockedWrite | None
    peers: frozenset[tuple[str, int]]


def break_plan(writes: Iterable[BlockedWrite], sockets: Iterable[TcpSocket]) -> BreakPlan | None:
    """The order in which to break a stalled stream, from the source QEMU's threads blocked in
    writes and its TCP sockets; None when no migration thread is blocked on a socket (nothing
    holds the stream that shutting sockets down would release)."""
    ours = [w for w in writes if w.thread.startswith(MIGRATION_THREADS)]
    peer_of = {s.fd: s.peer for s in sockets}
    peers = frozenset(peer_of[w.fd] for w in ours if w.fd in peer_of)
    if not peers:
        return None
    return BreakPlan(first=_channel_0(ours), peers=peers)


def _channel_0(writes: Iterable[BlockedWrite]) -> BlockedWrite | None:
    """The write of multifd channel 0's sender among `writes`, if it is one of them."""
    return next((w for w in writes if (m := SENDER.fullmatch(w.thread)) and int(m.group(1)) == 0), None)


class CancelWatch:
    """A cancelled stream whose migration thread waits for senders that cannot write: still
    "cancelling", with no byte moving, for CANCEL_STALL."""

    def __init__(self) -> None:
        self.moved: int | None = None
        self.since = 0.0

    def held(self, sample: MigrationSample, now: float) -> bool:
        if sample.status is not MigrationStatus.CANCELLING:
            self.moved = None
            return False
        moved = sample.ram.transferred if sample.ram is not None else 0
        if moved != self.moved:
            self.moved, self.since = moved, now
            return False
        return now - self.since >= CANCEL_STALL


@dataclass(frozen=True)
class Broken:
    shut: int  # sockets shut down
    first: bool  # channel 0's first, and waited for its sender

    def __str__(self) -> str:
        return f"shut down {self.shut} of its sockets" + (", channel 0's first" if self.first else " at once")


def _left_its_write(pid: int, w: BlockedWrite) -> None:
    """Wait until the thread of `w` has left its write (its socket was just shut down)."""
    deadline = time.monotonic() + LEAVE_TIMEOUT
    while still_writing(pid, w):
        if time.monotonic() > deadline:
            log.warning("QEMU %d: its multifd channel 0 sender did not leave its write %.0f s after its socket "
                        "was shut down", pid, LEAVE_TIMEOUT)
            return
        time.sleep(LEAVE_POLL)


def _shut_rest(pid: int, peers: frozenset[tuple[str, int]], first: BlockedWrite | None) -> int:
    return sum(shutdown_socket(pid, s.fd, s.inode) for s in tcp_sockets(pid)
               if s.peer in peers and (first is None or s.fd != first.fd))


def break_stalled_stream(pid: int) -> Broken:
    """Shut down the stalled stream's sockets of the source QEMU `pid` in the order of
    break_plan (blocking: run it in a thread)."""
    plan = break_plan(blocked_writes(pid), tcp_sockets(pid))
    if plan is None:
        return Broken(shut=0, first=False)
    done = 0
    if plan.first is not None and shutdown_socket(pid, plan.first.fd, plan.first.inode):
        done += 1
        _left_its_write(pid, plan.first)
    return Broken(shut=done + _shut_rest(pid, plan.peers, plan.first), first=plan.first is not None)


def channel_0_write(pid: int) -> BlockedWrite | None:
    """Channel 0's sender, if it is inside a write to a socket."""
    return _channel_0(blocked_writes(pid))


@dataclass(frozen=True)
class Caught:
    """Channel 0's sender caught inside a write, and our duplicate of that socket."""

    write: BlockedWrite
    sock: socket.socket


def catch_channel_0(pid: int, timeout: float) -> Caught | None:
    """Channel 0's sender seen inside the same write on two looks in a row (held there by the
    link), with a duplicate of its socket ready to shut down; None if not within `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        w = channel_0_write(pid)
        if w is not None and w == last:
            sock = dup_socket(pid, w.fd, w.inode)
            return Caught(w, sock) if sock is not None else None
        last = w
        time.sleep(CATCH_POLL)
    return None


def finish_break(pid: int, caught: Caught) -> Broken:
    """After channel 0's socket was shut down: wait for its sender to leave its write, then shut
    every other socket to the same peer (the destination)."""
    peer = next((s.peer for s in tcp_sockets(pid) if s.inode == caught.write.inode), None)
    _left_its_write(pid, caught.write)
    return Broken(shut=1 + (_shut_rest(pid, frozenset({peer}), caught.write) if peer else 0), first=True)


Ask = Callable[..., Awaitable[Any]]  # one QMP command: its decoded JSON answer


async def cancel_migration(ask: Ask, pid: int | None, wait: float, *, moving: bool = False) -> MigrationStatus:
    """migrate_cancel, then wait up to `wait` s for QEMU to end it; a stream that makes no progress
    while cancelling is broken off (break_stalled_stream). `ask` runs one QMP command. Returns the
    last status seen. `moving`: a sound stream a user cancels, cancelled while channel 0's sender
    is caught inside a write (catch_channel_0).

    A stream rolled back because its destination failed is cancelled at once: its sockets are
    failing, and a migration QEMU sees fail before it is cancelled says bye on every channel."""
    caught = None
    if moving and pid is not None:
        caught = await asyncio.to_thread(catch_channel_0, pid, CATCH_TIMEOUT)
        if caught is None:
            log.info("QEMU %s: its multifd channel 0 sender was not seen inside a write within %.1f s: "
                     "cancelling as it is", pid, CATCH_TIMEOUT)
    try:
        await ask("migrate_cancel")
    except BaseException:
        if caught is not None:
            caught.sock.close()  # not cancelled: breaking channel 0 now would fail the migration instead
        raise
    if caught is not None:
        with caught.sock:
            shut(caught.sock)  # at once: before the cleanup says bye on channel 0
    broken = pid is None
    if caught is not None:
        broken = True
        try:
            await asyncio.to_thread(finish_break, pid, caught)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            log.warning("QEMU %s: breaking off its cancelled migration stream failed: %s", pid, exc)
    watch = CancelWatch()
    deadline = time.monotonic() + wait
    while True:
        sample = MigrationSample.from_qmp(await ask("query-migrate"))
        if sample.status.is_terminal or time.monotonic() > deadline:
            return sample.status
        if not broken and watch.held(sample, time.monotonic()):
            broken = True
            try:
                done = await asyncio.to_thread(break_stalled_stream, pid)  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:
                log.warning("QEMU %s: breaking off its stalled migration stream failed: %s", pid, exc)
            else:
                log.warning("QEMU %s: the cancelled migration stream made no progress for %.0f s: %s", pid,
                            CANCEL_STALL, done)
        await asyncio.sleep(CANCEL_POLL)
