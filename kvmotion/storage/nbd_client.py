"""A minimal, synchronous NBD client (fixed newstyle, NBD_OPT_STARTTLS, NBD_OPT_GO, simple replies).

VMs use QEMU's NBD client; this one is for probes and tests, where a single Python object must
play a host (a connection with a chosen export name) and see the server's errno on each request.
No structured replies, no block status, one request in flight.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698

_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_ABORT = 2
_OPT_STARTTLS = 5
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_INFO_EXPORT = 0
_REP_ERR_BIT = 1 << 31

FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3

_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 0, 1, 2, 3
_CMD_FLAG_FUA = 1

# NBD's wire error numbers are Linux's for the few it defines.
_NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
              75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}  # fmt: skip


class NbdError(OSError):
    """A request or handshake the server refused; `errno` is the server's error."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if not got:
            raise NbdError(errno.ECONNRESET, "NBD server closed the connection")
        view = view[got:]
    return bytes(buf)


class NbdConnection:
    """One NBD connection to one export; `NbdConnection.connect(host, port, "web1.img@host-a")`.
    With `tls` (a client context with a certificate) it upgrades with NBD_OPT_STARTTLS first."""

    def __init__(self, sock: socket.socket, export: str, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self.export = export
        self._handle = 0
        self.size, self.flags = self._handshake(export, tls, server_hostname)

    @classmethod
    def connect(cls, host: str, port: int, export: str, timeout: float = 10.0,
                tls: ssl.SSLContext | None = None) -> NbdConnection:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return cls(sock, export, tls, host)
        except BaseException:
            sock.close()
            raise

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    def _reply(self, what: str) -> tuple[int, bytes]:
        """One option reply: (type, payload); an error reply raises."""
        magic, _opt, rtype, length = struct.unpack(">QIII", _recv_exact(self.sock, 20))
        if magic != _REPLY_MAGIC:
            raise NbdError(errno.EPROTO, "bad NBD option reply magic")
        payload = _recv_exact(self.sock, length)
        if rtype & _REP_ERR_BIT:
            text = payload.decode(errors="replace") or f"error {rtype & ~_REP_ERR_BIT}"
            raise NbdError(errno.EACCES if rtype == _REP_ERR_BIT | 2 else errno.ENOENT, f"{what} refused: {text}")
        return rtype, payload

    def _handshake(self, export: str, tls: ssl.SSLContext | None, server_hostname: str | None) -> tuple[int, int]:
        s = self.sock
        if _recv_exact(s, 8) != NBDMAGIC or _recv_exact(s, 8) != IHAVEOPT:
            raise NbdError(errno.EPROTO, "not a newstyle NBD server")
        (hflags,) = struct.unpack(">H", _recv_exact(s, 2))
        if not hflags & _FLAG_FIXED_NEWSTYLE:
            raise NbdError(errno.EPROTO, "NBD server lacks fixed newstyle negotiation")
        s.sendall(struct.pack(">I", hflags & (_FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES)))
        if tls is not None:
            s.sendall(IHAVEOPT + struct.pack(">II", _OPT_STARTTLS, 0))
            self._reply("NBD_OPT_STARTTLS")
            self.sock = s = tls.wrap_socket(s, server_hostname=server_hostname)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(IHAVEOPT + struct.pack(">II", _OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            rtype, payload = self._reply(f"export {export!r}")
            if rtype == _REP_INFO and struct.unpack(">H", payload[:2])[0] == _INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == _REP_ACK:
                break
        if size is None or flags is None:
            raise NbdError(errno.EPROTO, "NBD server did not describe the export")
        return size, flags

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
        self._handle += 1
        header = struct.pack(">IHHQQI", _REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
        self.sock.sendall(header + data)
        magic, err, handle = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        if magic != _SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError(errno.EPROTO, "bad NBD reply")
        if err:
            code = _NBD_ERRNO.get(err, errno.EIO)
            raise NbdError(code, f"NBD {_CMD_NAMES[cmd]} on {self.export}: {os.strerror(code)}")
        return _recv_exact(self.sock, length) if cmd == _CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._request(_CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._request(_CMD_WRITE, offset, len(data), _CMD_FLAG_FUA if fua else 0, data)

    def flush(self) -> None:
        self._request(_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            header = struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0)
            self.sock.sendall(header)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CMD_NAMES = {_CMD_READ: "read", _CMD_WRITE: "write", _CMD_FLUSH: "flush"}
