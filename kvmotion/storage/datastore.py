"""The datastore's control side: disk files under a root directory and their leases.

Disks are raw files `<root>/<disk>`; lease state is in `<root>/.kvmotion/` (see leasefile).
Every lease change runs under the exclusive lease lock, so the NBD server applies it before the
call returns. A transfer or release first fdatasyncs the disk, so whatever the old holder had
acknowledged is durable before anyone else may write.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kvmotion.api.disks import DiskInfo, Lease, check_disk_name, check_host_name
from kvmotion.api.spec import MAX_DISK_SIZE
from kvmotion.core.errors import Conflict, InsufficientResources, InvalidInput, LeaseError, NotFound
from kvmotion.core.units import format_size
from kvmotion.storage.lease import Clock, LeaseTable
from kvmotion.storage.leasefile import META_DIR, LeaseStore

SECTOR = 512
T = TypeVar("T")


def check_disk_size(size: int) -> int:
    """A disk's size: sectors, at most what a VM's disk may be (beyond, the file system cannot even be asked)."""
    if size <= 0 or size % SECTOR or size > MAX_DISK_SIZE:
        raise InvalidInput(f"invalid disk size {size}: use a positive multiple of 512 bytes up to "
                           f"{format_size(MAX_DISK_SIZE)} (e.g. 4G)")
    return size


class Datastore:
    """One datastore root: create, list and delete disks; acquire, renew, transfer leases."""

    def __init__(self, name: str, root: Path, ttl: float, clock: Clock = time.time) -> None:
        self.name = name
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotFound(f"datastore root {self.root} does not exist or is not a directory")
        self.ttl = ttl
        self._clock = clock
        self._store = LeaseStore(self.root)
        LeaseTable(ttl, clock)  # validates ttl once, here

    # -- disks -----------------------------------------------------------------------------
    def _path(self, disk: str) -> Path:
        return self.root / check_disk_name(disk)

    def _require(self, disk: str) -> Path:
        path = self._path(disk)
        if not path.is_file():
            raise NotFound(f"no disk {disk!r} on datastore {self.name}")
        return path

    def create_disk(self, disk: str, size: int, prealloc: bool = False) -> DiskInfo:
        path = self._path(disk)
        check_disk_size(size)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise Conflict(f"disk {disk} already exists on datastore {self.name}") from None
        except OSError as exc:
            raise self._os_error(exc, disk, size) from None
        try:
            os.ftruncate(fd, size)
            if prealloc:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        except BaseException as exc:  # whatever fails, no half-made disk stays behind
            os.close(fd)
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._os_error(exc, disk, size) from None
            raise
        os.close(fd)
        _fsync_dir(self.root)
        return self.disk(disk)

    def _os_error(self, exc: OSError, disk: str, size: int) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize
            return InsufficientResources(
                f"datastore {self.name} is full: {format_size(free)} free, cannot create "
                f"{disk} of {format_size(size)}"
            )
        if exc.errno == errno.EFBIG:
            return InvalidInput(f"disk size {size} is too large for the datastore's file system")
        return InsufficientResources(f"cannot create {disk} on datastore {self.name}: {exc.strerror}")

    def delete_disk(self, disk: str) -> None:
        path = self._require(disk)

        def unlink(table: LeaseTable) -> None:
            lease = table.holder(disk)
            if lease is not None:
                raise LeaseError(
                    f"cannot delete {disk}: it is leased to {lease.host} (vm {lease.vm}); "
                    "release the lease first"
                )
            path.unlink()
            _fsync_dir(self.root)

        self._mutate(unlink)

    def disk(self, disk: str) -> DiskInfo:
        path = self._require(disk)
        table = self._table(self._store.snapshot())
        return self._info(path, table)

    def list_disks(self) -> list[DiskInfo]:
        table = self._table(self._store.snapshot())
        paths = sorted(
            Path(e.path)
            for e in os.scandir(self.root)
            if e.is_file() and e.name != META_DIR and not e.name.startswith(".")
        )
        return [self._info(p, table) for p in paths]

    def _info(self, path: Path, table: LeaseTable) -> DiskInfo:
        st = path.stat()
        return DiskInfo(
            name=path.name,
            size=st.st_size,
            allocated=st.st_blocks * 512,
            generation=table.generation(path.name),
            lease=table.holder(path.name),
        )

    # -- leases ----------------------------------------------------------------------------
    def acquire(self, disk: str, host: str, vm: str) -> Lease:
        self._require(disk)
        check_host_name(host)
        return self._mutate(lambda t: t.acquire(disk, host, vm))

    def renew(self, disk: str, host: str) -> Lease:
        self._require(disk)
        return self._mutate(lambda t: t.renew(disk, host))

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None,
                 *, by: str) -> Lease:
        """Move the lease on behalf of host `by` (LeaseTable.transfer says who may)."""
        path = self._require(disk)

        def move(table: LeaseTable) -> Lease:
            lease = table.transfer(disk, from_host, to_host, vm, generation, by=by)  # refusals raise before syncing
            _fdatasync(path)
            return lease

        return self._mutate(move)

    def release(self, disk: str, host: str) -> None:
        path = self._require(disk)

        def drop(table: LeaseTable) -> None:
            held = table.holder(disk)
            table.release(disk, host)
            if held is not None and held.host == host:
                _fdatasync(path)

        self._mutate(drop)

    def heartbeat(self) -> None:
        """The service is up: `datastore serve` calls this every second (server.HEARTBEAT)."""
        self._store.heartbeat(self._clock())

    def resume_after_outage(self) -> list[Lease]:
        """At service start: give back the time the service was down to every lease that was
        live when it went down (its holder could not renew meanwhile). Call before serving NBD,
        so a holder's queued writes are not refused as expired. Returns the leases extended."""
        down_at = self._store.last_alive()
        if down_at is None:
            return []
        return self._mutate(lambda t: t.resume_after_outage(down_at))

    def leases(self) -> list[Lease]:
        return self._table(self._store.snapshot()).leases()

    def _table(self, text: str) -> LeaseTable:
        return LeaseTable.from_json(text, self.ttl, self._clock)

    def _mutate(self, change: Callable[[LeaseTable], T]) -> T:
        with self._store.exclusive() as txn:
            before = txn.read()
            table = self._table(before)
            result = change(table)
            after = table.to_json()
            if after != before:
                txn.write(after)
            return result


def _fdatasync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
