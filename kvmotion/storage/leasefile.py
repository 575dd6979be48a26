"""The lease state on disk, shared by the control API (writer) and the NBD server (reader).

Files under `<root>/.kvmotion/`:
  leases.json       the LeaseTable document, replaced atomically (write tmp, fsync, rename, fsync dir)
  leases.seq        16 bytes the NBD server maps: a change counter, bumped after each replace (it
                    reloads leases.json only when it moves), and a "change pending" flag
  leases.lock       flock: writes hold it shared (check + pwrite), lease changes hold it exclusive
  leases.turnstile  flock: while a change is pending, writers pass through it first, so a waiting
                    change is not starved by a stream of writers (Linux flock grants shared locks
                    past a waiting exclusive one); without a pending change they skip it
  service.alive     touched every second by the running service: its mtime says when the service
                    was last up, so a restarted one knows how long leases could not be renewed

Holding leases.lock shared across "check, then pwrite" is what makes fencing exact: once
`transfer()` has returned, no write authorized under the old generation is still in flight.
Stdlib only: nbdkit's embedded interpreter imports this module.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvmotion.api.disks import Lease
from kvmotion.storage.lease import leases_from_json

META_DIR = ".kvmotion"
_SEQ_BYTES = 8
_SHARED_BYTES = 16  # seq (8, little endian) + pending flag (8)


class LeasePaths:
    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / META_DIR
        self.state = self.dir / "leases.json"
        self.seq = self.dir / "leases.seq"
        self.lock = self.dir / "leases.lock"
        self.turnstile = self.dir / "leases.turnstile"
        self.alive = self.dir / "service.alive"

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        for path in (self.lock, self.turnstile):
            path.touch(exist_ok=True)
        if not self.seq.exists() or self.seq.stat().st_size < _SHARED_BYTES:
            _write_atomic(self.seq, bytes(_SHARED_BYTES))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class LeaseTransaction:
    """Read and replace the lease document while holding the exclusive lock."""

    def __init__(self, paths: LeasePaths) -> None:
        self._paths = paths

    def read(self) -> str:
        try:
            return self._paths.state.read_text()
        except FileNotFoundError:
            return ""

    def write(self, text: str) -> None:
        _write_atomic(self._paths.state, text.encode())
        fd = os.open(self._paths.seq, os.O_RDWR)
        try:
            seq = int.from_bytes(os.pread(fd, _SEQ_BYTES, 0), "little")
            os.pwrite(fd, ((seq + 1) % (1 << 63)).to_bytes(_SEQ_BYTES, "little"), 0)
        finally:
            os.close(fd)


class LeaseStore:
    """Control side: serialized, durable changes of the lease document."""

    def __init__(self, root: Path) -> None:
        self.paths = LeasePaths(root)
        self.paths.ensure()
        self._mutex = threading.Lock()  # flock is per open file; this orders our own threads

    def _set_pending(self, on: bool) -> None:
        fd = os.open(self.paths.seq, os.O_RDWR)
        try:
            os.pwrite(fd, int(on).to_bytes(_SHARED_BYTES - _SEQ_BYTES, "little"), _SEQ_BYTES)
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self) -> Iterator[LeaseTransaction]:
        with self._mutex:
            turn = os.open(self.paths.turnstile, os.O_RDONLY)
            lock = os.open(self.paths.lock, os.O_RDONLY)
            try:
                fcntl.flock(turn, fcntl.LOCK_EX)
                self._set_pending(True)  # from now on new writers queue on the turnstile
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield LeaseTransaction(self.paths)
            finally:
                self._set_pending(False)
                os.close(lock)  # closing drops the flock
                os.close(turn)

    def heartbeat(self, now: float) -> None:
        """Record that the service is up at `now` (the mtime of service.alive; no fsync: a
        second's precision is all a restart needs)."""
        try:
            os.utime(self.paths.alive, (now, now))
        except FileNotFoundError:
            self.paths.alive.touch()
            os.utime(self.paths.alive, (now, now))

    def last_alive(self) -> float | None:
        """When the service was last known up (None: it never ran on this root)."""
        try:
            return self.paths.alive.stat().st_mtime
        except FileNotFoundError:
            return None

    def snapshot(self) -> str:
        """The current document, without locking (it is always replaced whole)."""
        try:
            return self.paths.state.read_text()
        except FileNotFoundError:
            return ""


class LeaseGate:
    """NBD server side: hold the shared lock around "check, then write" with fresh leases.

        fd, leases = gate.lock()
        try: ...check, write...
        finally: gate.unlock(fd)
    """

    def __init__(self, root: Path) -> None:
        self.paths = LeasePaths(root)
        self.paths.ensure()
        seq_fd = os.open(self.paths.seq, os.O_RDONLY)
        try:
            self._shared = mmap.mmap(seq_fd, _SHARED_BYTES, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(seq_fd)
        self._cache: tuple[bytes, dict[str, Lease]] = (b"", {})
        # flock belongs to an open file description, so each worker thread needs its own fds;
        # keyed by thread id (not threading.local: nbdkit's C threads may get a fresh Python
        # thread state per callback, which would leak the fds).
        self._fds: dict[int, tuple[int, int]] = {}
        self._fds_lock = threading.Lock()

    def _thread_fds(self) -> tuple[int, int]:
        ident = threading.get_ident()
        fds = self._fds.get(ident)
        if fds is None:
            fds = (os.open(self.paths.turnstile, os.O_RDONLY), os.open(self.paths.lock, os.O_RDONLY))
            with self._fds_lock:
                self._fds[ident] = fds
        return fds

    def _leases(self) -> dict[str, Lease]:
        seq = self._shared[:_SEQ_BYTES]
        cached_seq, leases = self._cache
        if seq != cached_seq:
            try:
                text = self.paths.state.read_text()
            except FileNotFoundError:
                text = ""
            leases = leases_from_json(text)
            self._cache = (seq, leases)
        return leases

    def lock(self) -> tuple[int, dict[str, Lease]]:
        """Take the shared lock; returns the fd to unlock and the leases, frozen until then."""
        turn, lock = self._thread_fds()
        if self._shared[_SEQ_BYTES]:
            fcntl.flock(turn, fcntl.LOCK_SH)  # a change is waiting: queue behind it
            try:
                fcntl.flock(lock, fcntl.LOCK_SH)
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)
        else:
            fcntl.flock(lock, fcntl.LOCK_SH)
        return lock, self._leases()

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def hold(self) -> Iterator[dict[str, Lease]]:
        """Context form of lock()/unlock()."""
        fd, leases = self.lock()
        try:
            yield leases
        finally:
            self.unlock(fd)
