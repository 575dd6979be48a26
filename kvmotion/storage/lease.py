"""Exclusive write leases on datastore disks: a pure state machine with an injectable clock.

A lease names one writer of a disk: an owner (host, VM) and a generation. Generations only grow,
per disk, and survive release and expiry, so a number once handed out never means anyone else.
The NBD server binds each connection to the generation of its first authorized write and refuses
writes once the lease has moved on (`check_write`); this module holds that rule too, so the
server (nbdkit's embedded interpreter: stdlib only) and the tests share one definition.

Who may move a lease (`LeaseTable.transfer`, `by` = the host named in the caller's certificate):
its holder hands it on (switchover) or re-issues it to itself; the host that handed it over takes
it back while the new holder has not renewed it yet (a rollback: a destination renews only once
it runs the VM). Nobody else: a host cannot take another host's lease.

No I/O here. Times are the datastore's wall clock in Unix seconds, so leases survive a restart
of the datastore service; hosts never compare their own clocks with `expires_at`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from kvmotion.api.disks import Lease, check_disk_name, check_host_name
from kvmotion.core.errors import Forbidden, InvalidInput, LeaseError

STATE_VERSION = 1
EXPORT_HOST_SEP = "@"

Clock = Callable[[], float]


@dataclass(frozen=True)
class ExportName:
    """What an NBD client asks for: 'web1.img' (read only) or 'web1.img@host-b' (may write).

    Over TLS the datastore's NBD front end (nbd_gate) opens `DISK@HOST` only for the identities
    host:HOST and qemu:HOST; with --insecure the host part is the client's unchecked claim.
    """

    disk: str
    host: str | None = None

    def __str__(self) -> str:
        return self.disk if self.host is None else f"{self.disk}{EXPORT_HOST_SEP}{self.host}"

    @staticmethod
    def parse(text: str) -> ExportName:
        disk, sep, host = text.partition(EXPORT_HOST_SEP)
        check_disk_name(disk)
        if sep:
            check_host_name(host)
            return ExportName(disk, host)
        return ExportName(disk)


class WriteRefusal(str, Enum):
    """Why the storage side refused a write, trim, zero or flush."""

    READ_ONLY = "read-only connection: the export name carries no host (use DISK@HOST)"
    NO_LEASE = "the disk has no write lease"
    NOT_HOLDER = "another host holds the write lease"
    EXPIRED = "the write lease expired (not renewed in time)"
    STALE = "the connection was authorized under an older lease generation; reconnect"


REFUSED_PREFIX = "kvmotion-datastore: refused "  # the NBD server's line for a refused write (stderr, once per connection and reason)


def refusal_line(op: str, disk: str, host: str | None, bound: int | None, refusal: WriteRefusal, holder: str) -> str:
    return f"{REFUSED_PREFIX}{op} to {disk} from {host} (bound to {bound}): {refusal.value}; lease holder: {holder}"


def parse_refusal_line(line: str) -> tuple[str, WriteRefusal] | None:
    """(operation, reason) of a `refusal_line`; None for any other line."""
    if not line.startswith(REFUSED_PREFIX):
        return None
    op = line[len(REFUSED_PREFIX):].split(" ", 1)[0]
    return next(((op, r) for r in WriteRefusal if f": {r.value}; lease holder: " in line), None)


@dataclass(frozen=True)
class WriteCheck:
    """Outcome of `check_write`: a refusal, or the generation the connection is (now) bound to."""

    refusal: WriteRefusal | None
    generation: int | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


def check_write(lease: Lease | None, host: str | None, bound: int | None, now: float) -> WriteCheck:
    """May a connection from `host`, bound to generation `bound` (None: never wrote), write now?

    A connection may exist before its host holds the lease (the destination's shadow VM opens
    its disks early); it is bound to the generation under which its first write is allowed, and
    refused forever once the lease carries another generation, even if the lease comes back to
    the same host later.
    """
    if host is None:
        return WriteCheck(WriteRefusal.READ_ONLY)
    if lease is None:
        return WriteCheck(WriteRefusal.NO_LEASE)
    if lease.host != host:
        return WriteCheck(WriteRefusal.NOT_HOLDER)
    if not lease.live(now):
        return WriteCheck(WriteRefusal.EXPIRED)
    if bound is not None and bound != lease.generation:
        return WriteCheck(WriteRefusal.STALE)
    return WriteCheck(None, lease.generation)


def check_flush(lease: Lease | None, host: str | None, bound: int | None, now: float) -> WriteCheck:
    """May a connection flush now? As check_write, with one exception: a connection bound to an
    older generation may flush while its host holds the live lease again. A flush changes no
    data, and what that connection wrote under its generation was made durable when the lease
    moved on (transfer fdatasyncs the disk). QEMU flushes a node before it reopens it, which is
    how a source gets its new connection after a rolled-back handoff (attach.reattach_commands).
    A flush never binds a connection: the returned generation is `bound`, unchanged."""
    verdict = check_write(lease, host, bound, now)
    if verdict.allowed or verdict.refusal is WriteRefusal.STALE:
        return WriteCheck(None, bound)
    return verdict


def leases_from_json(text: str) -> dict[str, Lease]:
    """The leases recorded in a state document (expired ones included), by disk."""
    if not text.strip():
        return {}
    data = json.loads(text)
    return {d["disk"]: Lease.from_dict(d) for d in data.get("leases", ())}


class LeaseTable:
    """All leases of one datastore. Every operation reads the clock once; refusals raise."""

    def __init__(self, ttl: float, clock: Clock = time.time) -> None:
        if ttl <= 0:
            raise InvalidInput(f"invalid lease TTL {ttl!r}: use a positive duration")
        self.ttl = ttl
        self._clock = clock
        self._leases: dict[str, Lease] = {}  # may hold expired leases until expire()
        self._generations: dict[str, int] = {}  # last generation issued per disk

    # -- queries ---------------------------------------------------------------------------
    def holder(self, disk: str) -> Lease | None:
        """The live lease on `disk`, if any."""
        lease = self._leases.get(disk)
        return lease if lease is not None and lease.live(self._clock()) else None

    def generation(self, disk: str) -> int:
        """The last generation handed out for `disk` (0: never leased)."""
        return self._generations.get(disk, 0)

    def leases(self) -> list[Lease]:
        now = self._clock()
        return [lease for lease in self._leases.values() if lease.live(now)]

    # -- transitions -----------------------------------------------------------------------
    def acquire(self, disk: str, host: str, vm: str) -> Lease:
        """A new lease for (host, vm); the current owner acquiring again just renews."""
        check_disk_name(disk)
        check_host_name(host)
        now = self._clock()
        current = self._leases.get(disk)
        if current is not None and current.live(now):
            if (current.host, current.vm) == (host, vm):
                return self._put(replace(current, expires_at=now + self.ttl, handed_over_by=None))
            raise LeaseError(f"cannot lease {disk} to {host}: {_held(current, now)}")
        return self._put(Lease(disk, host, vm, self.generation(disk) + 1, now + self.ttl))

    def renew(self, disk: str, host: str) -> Lease:
        now = self._clock()
        current = self._leases.get(disk)
        if current is None:
            raise LeaseError(f"cannot renew {disk} for {host}: it has no lease; acquire it first")
        if current.host != host:
            if current.live(now):
                raise LeaseError(f"cannot renew {disk} for {host}: {_held(current, now)}")
            raise LeaseError(f"cannot renew {disk} for {host}: the lease belongs to {current.host}")
        if not current.live(now):
            raise LeaseError(
                f"cannot renew {disk} for {host}: its lease (generation {current.generation}) "
                f"expired {now - current.expires_at:.1f}s ago and writes are fenced; stop the VM"
            )
        # Renewing makes the lease fully the holder's: whoever handed it over can no longer take it back.
        return self._put(replace(current, expires_at=now + self.ttl, handed_over_by=None))

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None,
                 *, by: str) -> Lease:
        """Move the lease from `from_host` to `to_host` under a new generation, on behalf of host `by`.

        - `by == from_host`, its live holder: hands it on (switchover; the new lease records `by`
          as handed_over_by), or with `to_host == from_host` and `generation` re-issues it to
          itself (how a rollback fences its own late switchover request).
        - `by == to_host`: takes back a lease it handed to `from_host`, which has not renewed it
          since (rollback).
        Anyone else is Forbidden. `generation`: only if the lease is still that generation, so a
        request delayed past its sender's timeout cannot move a lease that was handed on, or
        re-issued, meanwhile."""
        check_host_name(to_host)
        if by not in (from_host, to_host):
            raise Forbidden(f"host {by} may not move the lease on {disk} from {from_host} to {to_host}: only its "
                            "holder hands a lease on, and only the host that handed it over takes it back")
        if from_host == to_host and generation is None:
            raise InvalidInput(f"cannot transfer {disk} from {from_host} to itself without its generation")
        now = self._clock()
        current = self._leases.get(disk)
        if current is None or not current.live(now):
            raise LeaseError(
                f"cannot transfer {disk} from {from_host}: it holds no live lease "
                "(expired or never acquired)"
            )
        if current.host != from_host:
            raise LeaseError(f"cannot transfer {disk} from {from_host}: {_held(current, now)}")
        if generation is not None and current.generation != generation:
            raise LeaseError(f"cannot transfer {disk} from {from_host}: its lease is generation {current.generation} "
                             f"now, not {generation} (handed on or re-issued since this request was made)")
        if by != from_host and current.handed_over_by != by:
            raise LeaseError(f"cannot take {disk} back from {from_host} for {by}: {by} did not hand it over, or "
                             f"{from_host} has renewed it since (it runs the VM)")
        handed = by if (by == from_host and to_host != from_host) else None
        return self._put(Lease(disk, to_host, vm, self.generation(disk) + 1, now + self.ttl, handed))

    def release(self, disk: str, host: str) -> None:
        """Give up the lease; releasing a lease one does not hold (any more) is a no-op."""
        now = self._clock()
        current = self._leases.get(disk)
        if current is None:
            return
        if current.host == host:
            del self._leases[disk]
        elif current.live(now):
            raise LeaseError(f"cannot release {disk} for {host}: {_held(current, now)}")

    def resume_after_outage(self, down_at: float) -> list[Lease]:
        """The datastore service was down from `down_at` until now, so no holder could renew:
        every lease that was live at `down_at` gets a full TTL from now (returned). Nobody else
        could take a lease meanwhile, so this keeps the single writer; a holder that is gone
        for good just blocks its disk one TTL longer."""
        now = self._clock()
        resumed = []
        for lease in list(self._leases.values()):
            if lease.expires_at > down_at and lease.expires_at < now + self.ttl:
                resumed.append(self._put(replace(lease, expires_at=now + self.ttl)))
        return resumed

    def expire(self) -> list[Lease]:
        """Drop expired leases (writes were already refused by time); returns them."""
        now = self._clock()
        gone = [lease for lease in self._leases.values() if not lease.live(now)]
        for lease in gone:
            del self._leases[lease.disk]
        return gone

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "generations": dict(sorted(self._generations.items())),
                "leases": [lease.to_dict() for _, lease in sorted(self._leases.items())],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, ttl: float, clock: Clock = time.time) -> LeaseTable:
        table = cls(ttl, clock)
        if text.strip():
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise InvalidInput(f"lease state version {data.get('version')!r} is not supported")
            table._generations = {str(k): int(v) for k, v in data.get("generations", {}).items()}
        table._leases = leases_from_json(text)
        for lease in table._leases.values():  # a hand-edited file must not lower a generation
            table._generations[lease.disk] = max(table.generation(lease.disk), lease.generation)
        return table

    def _put(self, lease: Lease) -> Lease:
        self._leases[lease.disk] = lease
        self._generations[lease.disk] = max(self.generation(lease.disk), lease.generation)
        return lease


def _held(lease: Lease, now: float) -> str:
    return (
        f"it is leased to {lease.host} (vm {lease.vm}, generation {lease.generation}) for "
        f"another {lease.expires_at - now:.1f}s"
    )

