"""nbdkit Python plugin: the datastore's disks as NBD exports, with fenced writes.

    nbdkit python kvmotion/storage/nbd_plugin.py root=/srv/kvmotion/ds1

Runs inside nbdkit's embedded interpreter (Debian's /usr/bin/python3, not our venv): it only
imports the stdlib and kvmotion.storage.{lease,leasefile}, which are stdlib-only (as are what they
import: kvmotion.api.disks, kvmotion.core.errors and the package files), from the checkout this file
sits in.

Export names: `DISK` opens read only (anyone may read); `DISK@HOST` opens writable, but every
write, zero, trim and flush is checked against the lease, under the lease lock (see leasefile),
and refused with EPERM unless HOST holds a live lease whose generation is the one this
connection's first allowed write was bound to (a flush only needs HOST to hold the live lease:
lease.check_flush). Who may open `DISK@HOST` at all is decided before nbdkit sees the connection:
the datastore's TLS front end (nbd_front, nbd_gate) opens it only for host:HOST and qemu:HOST, and
nbdkit listens on a private Unix socket behind it. With --insecure nbdkit serves the network
itself and the host name is the client's unchecked claim.

Data path: pread/pwrite on the file (page cache); FUA and FLUSH call fdatasync, so every
acknowledged write survives a restart of the service and every flushed one a power cut.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded interpreter

_PROJECT = str(Path(__file__).resolve().parents[2])
if _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

from kvmotion.storage.lease import (  # noqa: E402
    ExportName,
    WriteCheck,
    WriteRefusal,
    check_flush,
    check_write,
    refusal_line,
)
from kvmotion.storage.leasefile import META_DIR, LeaseGate  # noqa: E402

API_VERSION = 2

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

_root: Path | None = None
_gate: LeaseGate | None = None


class _Conn:
    """One NBD connection: its disk, claimed host, file descriptor and bound generation."""

    __slots__ = ("bound", "export", "fd", "logged", "size")

    def __init__(self, export: ExportName, fd: int, size: int) -> None:
        self.export = export
        self.fd = fd
        self.size = size
        self.bound: int | None = None
        self.logged: set[WriteRefusal] = set()


def _fail(err: int, message: str) -> None:
    nbdkit.set_error(err)
    raise OSError(err, message)


def config(key: str, value: str) -> None:
    global _root
    if key == "root":
        _root = Path(value).resolve()
    else:
        raise RuntimeError(f"unknown parameter {key!r}: use root=DIR")


def config_complete() -> None:
    global _gate
    if _root is None or not _root.is_dir():
        raise RuntimeError("root=DIR is required and must be an existing directory")
    _gate = LeaseGate(_root)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def _disk_path(disk: str) -> Path:
    assert _root is not None
    return _root / disk


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    assert _root is not None
    out = []
    for entry in sorted(os.scandir(_root), key=lambda e: e.name):
        if entry.name != META_DIR and entry.is_file() and not entry.name.startswith("."):
            out.append((entry.name, f"{entry.stat().st_size} bytes; write as {entry.name}@HOST"))
    return out


def open(readonly: bool) -> _Conn:  # nbdkit calls it by this name
    name = nbdkit.export_name()
    try:
        export = ExportName.parse(name)
    except Exception as exc:  # noqa: BLE001 - whatever the parser refuses, nbdkit gets EINVAL
        _fail(errno.EINVAL, f"bad export name {name!r}: {exc}")
    path = _disk_path(export.disk)
    writable = export.host is not None and not readonly
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        _fail(errno.ENOENT, f"no disk {export.disk!r} on this datastore")
    size = os.fstat(fd).st_size
    return _Conn(export, fd, size)


def close(h: _Conn) -> None:
    os.close(h.fd)


def export_description(h: _Conn) -> str:
    who = f"writer identity {h.export.host}" if h.export.host else "read only"
    return f"kvmotion disk {h.export.disk} ({who})"


def get_size(h: _Conn) -> int:
    return h.size


def can_write(h: _Conn) -> bool:
    return h.export.host is not None


def can_flush(h: _Conn) -> bool:
    return h.export.host is not None


def can_fua(h: _Conn) -> int:
    return nbdkit.FUA_NATIVE


def can_trim(h: _Conn) -> bool:
    return h.export.host is not None


def can_zero(h: _Conn) -> bool:
    return h.export.host is not None


def can_fast_zero(h: _Conn) -> bool:
    return False


def can_multi_conn(h: _Conn) -> bool:
    # Each connection is fenced on its own; do not invite clients to spread one writer over many.
    return False


def can_extents(h: _Conn) -> bool:
    return True


def is_rotational(h: _Conn) -> bool:
    return False


def _fence(h: _Conn, op: str, check: Callable[..., WriteCheck] = check_write) -> int:
    """Take the lease lock and check that `h` may write now; returns the fd to unlock.

    A plain function pair, not a context manager: this runs on every write and each layer of
    Python costs microseconds (measured in the package docstring).
    """
    assert _gate is not None
    fd, leases = _gate.lock()
    lease = leases.get(h.export.disk)
    verdict = check(lease, h.export.host, h.bound, time.time())
    if verdict.refusal is None:
        h.bound = verdict.generation
        return fd
    _gate.unlock(fd)
    if verdict.refusal not in h.logged:  # once per connection and reason
        h.logged.add(verdict.refusal)
        holder = f"{lease.host} generation {lease.generation}" if lease else "nobody"
        print(refusal_line(op, h.export.disk, h.export.host, h.bound, verdict.refusal, holder), file=sys.stderr, flush=True)
    _fail(errno.EPERM, f"{op} refused: {verdict.refusal.value}")
    raise AssertionError("unreachable")


def _os_fail(exc: OSError) -> None:
    """Send the real errno (ENOSPC must reach the client as ENOSPC, not EIO)."""
    nbdkit.set_error(exc.errno or errno.EIO)
    raise exc


def pread(h: _Conn, buf: bytearray, offset: int, flags: int) -> None:
    view = memoryview(buf)
    while view:
        try:
            n = os.preadv(h.fd, [view], offset)
        except OSError as exc:
            _os_fail(exc)
        if n <= 0:
            _fail(errno.EIO, f"short read at offset {offset}")
        view = view[n:]
        offset += n


def pwrite(h: _Conn, buf: bytes, offset: int, flags: int) -> None:
    lock = _fence(h, "write")
    try:
        n = os.pwrite(h.fd, buf, offset)
        if n < len(buf):  # regular files write whole unless the disk fills up
            view = memoryview(buf)[n:]
            offset += n
            while view:
                n = os.pwrite(h.fd, view, offset)
                view = view[n:]
                offset += n
        if flags & nbdkit.FLAG_FUA:
            os.fdatasync(h.fd)
    except OSError as exc:
        _os_fail(exc)
    finally:
        _gate.unlock(lock)  # type: ignore[union-attr]


def flush(h: _Conn, flags: int) -> None:
    lock = _fence(h, "flush", check_flush)
    try:
        os.fdatasync(h.fd)
    except OSError as exc:
        _os_fail(exc)
    finally:
        _gate.unlock(lock)  # type: ignore[union-attr]


def _fallocate(fd: int, mode: int, offset: int, count: int) -> int:
    if _libc.fallocate(fd, mode, offset, count) == 0:
        return 0
    return ctypes.get_errno()


def zero(h: _Conn, count: int, offset: int, flags: int) -> None:
    lock = _fence(h, "zero")
    try:
        mode = _FALLOC_FL_KEEP_SIZE
        mode |= _FALLOC_FL_PUNCH_HOLE if flags & nbdkit.FLAG_MAY_TRIM else _FALLOC_FL_ZERO_RANGE
        err = _fallocate(h.fd, mode, offset, count)
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            _fail(errno.EOPNOTSUPP, "zero range unsupported here; nbdkit falls back to pwrite")
        if err:
            _fail(err, f"zero {count}@{offset}: {os.strerror(err)}")
        if flags & nbdkit.FLAG_FUA:
            os.fdatasync(h.fd)
    except OSError as exc:
        _os_fail(exc)
    finally:
        _gate.unlock(lock)  # type: ignore[union-attr]


def trim(h: _Conn, count: int, offset: int, flags: int) -> None:
    lock = _fence(h, "trim")
    try:
        err = _fallocate(h.fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, count)
        if err and err not in (errno.EOPNOTSUPP, errno.ENOSYS):  # trim is advisory
            _fail(err, f"trim {count}@{offset}: {os.strerror(err)}")
        if flags & nbdkit.FLAG_FUA:
            os.fdatasync(h.fd)
    except OSError as exc:
        _os_fail(exc)
    finally:
        _gate.unlock(lock)  # type: ignore[union-attr]


def extents(h: _Conn, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    end = min(offset + count, h.size)
    pos = offset
    while pos < end:
        try:
            data = os.lseek(h.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to end of file
                raise
            data = h.size
        if data > pos:
            out.append((pos, min(data, end) - pos, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
            pos = data
            if pos >= end:
                break
        hole = os.lseek(h.fd, pos, os.SEEK_HOLE)
        out.append((pos, min(hole, end) - pos, 0))
        pos = hole
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
