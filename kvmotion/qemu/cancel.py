"""Cancelling an outgoing migration whose stream stalled, in an order QEMU 10.0 survives.

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

A stream still moving when the user cancels it fails at once (migrate_cancel shuts its main
channel down), and the cleanup's bye then races senders still inside writes to a slow link. So a
user's cancel first quiesces the stream: max-bandwidth 1 byte/s stops the migration thread queueing pages, and
once no migration thread is inside a write (or QUIESCE_TIMEOUT has passed), migrate_cancel.

A cancelled migration ("cancelling") says bye on channel 0 first and stops at the first bye that
fails. So once the cancelled stream is seen to make no progress: shut down channel 0's socket
first; its sender fails and leaves its write before it wakes the migration thread, whose cleanup's
bye on channel 0 then fails at once; then every other socket of the stream. Plain multifd sends
no bye, but a stalled stream is broken off the same way: the cancel then ends at once instead of
when the destination dies.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus
from kvmotion.qemu.sockets import BlockedWrite, TcpSocket, blocked_writes, shutdown_socket, still_writing, tcp_sockets

log = logging.getLogger("kvmotion.migration")

# QEMU 10.0's names of its outgoing migration threads (migration/migration.h), which QEMU gives
# them when started with -name ...,debug-threads=on.
MIGRATION_THREADS = "mig/src/"
SENDER = re.compile(r"mig/src/send_(\d+)")
CANCEL_STALL = 1.0  # s a cancelled stream may make no progress before it is broken off
LEAVE_TIMEOUT = 2.0  # s channel 0's sender may take to leave its write once its socket is shut down
LEAVE_POLL = 0.001  # s; it takes ~0.1 ms
CANCEL_POLL = 0.025  # s between queries while the cancel settles
QUIESCE_RATE = 1  # bytes/s: max-bandwidth while a stream is quiesced (0 would mean unlimited)
QUIESCE_TIMEOUT = 1.5  # s the senders may take to finish the writes under way (a stalled one never does)
QUIESCE_POLL = 0.005  # s


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
    first = next((w for w in ours if (m := SENDER.fullmatch(w.thread)) and int(m.group(1)) == 0), None)
    return BreakPlan(first=first, peers=peers)


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


def break_stalled_stream(pid: int) -> Broken:
    """Shut down the stalled stream's sockets of the source QEMU `pid` in the order of
    break_plan (blocking: run it in a thread)."""
    plan = break_plan(blocked_writes(pid), tcp_sockets(pid))
    if plan is None:
        return Broken(shut=0, first=False)
    done = 0
    if plan.first is not None and shutdown_socket(pid, plan.first.fd, plan.first.inode):
        done += 1
        deadline = time.monotonic() + LEAVE_TIMEOUT
        while still_writing(pid, plan.first):
            if time.monotonic() > deadline:
                log.warning("QEMU %d: its multifd channel 0 sender did not leave its write %.0f s after its socket "
                            "was shut down", pid, LEAVE_TIMEOUT)
                break
            time.sleep(LEAVE_POLL)
    for s in tcp_sockets(pid):
        if s.peer in plan.peers and (plan.first is None or s.fd != plan.first.fd):
            done += shutdown_socket(pid, s.fd, s.inode)
    return Broken(shut=done, first=plan.first is not None)


Ask = Callable[..., Awaitable[Any]]  # one QMP command: its decoded JSON answer


def stream_writes(pid: int) -> list[BlockedWrite]:
    """The source QEMU's migration threads inside a write to a socket."""
    return [w for w in blocked_writes(pid) if w.thread.startswith(MIGRATION_THREADS)]


async def quiesce(ask: Ask, pid: int) -> bool:
    """Stop the stream queueing pages and wait until none of its threads is inside a write; False
    when some still is after QUIESCE_TIMEOUT (a stalled stream)."""
    await ask("migrate-set-parameters", **{"max-bandwidth": QUIESCE_RATE})
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    while await asyncio.to_thread(stream_writes, pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(QUIESCE_POLL)
    return True


async def cancel_migration(ask: Ask, pid: int | None, wait: float, *, healthy: bool = False) -> MigrationStatus:
    """migrate_cancel (a `healthy` stream, one the user cancels, quiesced first), then wait up to
    `wait` s for QEMU to end it; a stream that makes no progress while cancelling is broken off
    (break_stalled_stream). `ask` runs one QMP command. Returns the last status seen.

    A stream rolled back because its destination failed is cancelled at once: its sockets are
    failing, and a migration QEMU sees fail before it is cancelled says bye on every channel."""
    if healthy and pid is not None and not await quiesce(ask, pid):
        log.warning("QEMU %s: its migration stream was still writing %.1f s after it was slowed to a stop; "
                    "cancelling all the same", pid, QUIESCE_TIMEOUT)
    await ask("migrate_cancel")
    watch = CancelWatch()
    broken = pid is None
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
