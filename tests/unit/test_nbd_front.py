"""nbd_front over real TLS on loopback, in front of a small fake nbdkit on a Unix socket: the relay
carries large requests and replies intact, identities come from certificates, refusals never
reach the backend."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.tls import client_context
from kvmotion.core.listen import listening_socket
from kvmotion.storage.nbd_client import NbdConnection, NbdError
from kvmotion.storage.nbd_front import NbdFront, server_context
from kvmotion.storage.nbd_gate import GREETING, IHAVEOPT, REPLY_MAGIC
from tests.certs import TestCA

SIZE = 8 << 20


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class FakeNbdkit:
    """Enough of nbdkit for NbdConnection: greeting, NBD_OPT_GO, then simple READ/WRITE/DISC on
    an in-memory disk. Records the export names it was asked for."""

    def __init__(self, path: Path) -> None:
        self.disk = bytearray(SIZE)
        self.exports: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.sendall(GREETING)
            _exact(conn, 4)
            while True:
                magic, option, length = struct.unpack(">8sII", _exact(conn, 16))
                assert magic == IHAVEOPT
                data = _exact(conn, length)
                (n,) = struct.unpack_from(">I", data)
                self.exports.append(data[4 : 4 + n].decode())
                info = struct.pack(">HQH", 0, SIZE, 1 | 4)  # NBD_INFO_EXPORT: has flags, flush
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, 3, len(info)) + info
                             + struct.pack(">QIII", REPLY_MAGIC, option, 1, 0))
                break
            while True:
                _, _, cmd, handle, offset, length = struct.unpack(">IHHQQI", _exact(conn, 28))
                reply = struct.pack(">IIQ", 0x67446698, 0, handle)
                if cmd == 0:
                    conn.sendall(reply + self.disk[offset : offset + length])
                elif cmd == 1:
                    self.disk[offset : offset + length] = _exact(conn, length)
                    conn.sendall(reply)
                elif cmd == 2:
                    return
                else:
                    conn.sendall(reply)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "cluster")


@pytest.fixture
def front(ca: TestCA, tmp_path: Path) -> Iterator[tuple[NbdFront, FakeNbdkit]]:
    backend = FakeNbdkit(tmp_path / "nbdkit.sock")
    served = ca.creds(Identity(Kind.DATASTORE, "ds1")).dir
    nbd = NbdFront(listening_socket("127.0.0.1", 0, "NBD"),
                   server_context(served / SERVER_CERT, served / SERVER_KEY, served / CA_CERT), tmp_path / "nbdkit.sock")
    nbd.start()
    yield nbd, backend
    nbd.close()
    backend.close()


def connect(nbd: NbdFront, ca: TestCA, who: Identity | None, export: str) -> NbdConnection:
    tls = client_context(ca.creds(who).dir) if who is not None else None
    return NbdConnection.connect("127.0.0.1", nbd.address[1], export, tls=tls)


def test_large_requests_and_replies_cross_intact(front: tuple[NbdFront, FakeNbdkit], ca: TestCA) -> None:
    nbd, backend = front
    data = bytes(range(256)) * (3 << 12) + b"tail"  # 3 MiB and a bit: many TLS records, several relay buffers
    with connect(nbd, ca, Identity(Kind.QEMU, "host-a"), "web1.img@host-a") as conn:
        conn.write(4096, data)
        assert conn.read(4096, len(data)) == data
        for size in (1, 512, 4096, 65536, 16385):
            assert conn.read(4095, size) == bytes(backend.disk[4095 : 4095 + size])
    assert bytes(backend.disk[4096 : 4096 + len(data)]) == data
    assert backend.exports == ["web1.img@host-a"]


def test_refusals_never_reach_nbdkit(front: tuple[NbdFront, FakeNbdkit], ca: TestCA, tmp_path: Path) -> None:
    nbd, backend = front
    with pytest.raises(NbdError, match="requires TLS"):
        connect(nbd, ca, None, "web1.img")
    with pytest.raises(NbdError, match=r"host:host-b may not open web1.img@host-a"):
        connect(nbd, ca, Identity(Kind.HOST, "host-b"), "web1.img@host-a")
    with pytest.raises(NbdError, match="may not read"):
        connect(nbd, ca, Identity(Kind.USER, "vera", Role.VIEWER), "web1.img")
    rogue = TestCA(tmp_path / "rogue")
    with pytest.raises((ssl.SSLError, OSError)):
        NbdConnection.connect("127.0.0.1", nbd.address[1], "web1.img",
                              tls=client_context(rogue.creds(Identity(Kind.HOST, "host-a")).dir))
    assert backend.exports == []
    with connect(nbd, ca, Identity(Kind.USER, "otto", Role.OPERATOR), "web1.img") as reader:
        assert reader.read(0, 16) == bytes(16)
    assert backend.exports == ["web1.img"]


def test_close_drops_open_connections(front: tuple[NbdFront, FakeNbdkit], ca: TestCA) -> None:
    nbd, _ = front
    conn = connect(nbd, ca, Identity(Kind.HOST, "host-a"), "web1.img")
    nbd.close()
    with pytest.raises((NbdError, OSError)):
        conn.read(0, 512)
    conn.sock.close()
