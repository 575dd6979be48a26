"""The datastore's NBD listener over TLS: terminates TLS, checks who opens which export, relays to
nbdkit on a private Unix socket. The decisions are nbd_gate's; this is the I/O around them.
`datastore serve` runs it as a child process (`main`), next to nbdkit.

One thread per connection. The option phase is sequential (blocking sockets, a timeout, so a
client that never finishes its handshake cannot pin a thread for long). The data phase is a relay
loop over non-blocking sockets and poll(2) in that same thread: an OpenSSL connection must not be
read and written from two threads at once, and one thread per direction would need a lock around
every TLS call anyway.

TLS runs on OpenSSL memory BIOs, the socket I/O is ours: what is there is read in one recv and
every record of an NBD reply leaves in one send. Wakeups are what the data path pays for (each
send that wakes the peer, each poll that sleeps); OpenSSL on a socket reads a record in two
syscalls and writes each 16 KiB record in its own, waking QEMU's reader up to five times per
64 KiB read. A short read means the socket is drained, so it is not tried again until poll says so.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

from kvmotion.api.identity import Identity, identity_of_der
from kvmotion.api.serving import AuditLog
from kvmotion.core.errors import KvmotionError
from kvmotion.storage.lease import ExportName
from kvmotion.storage.nbd_gate import (
    Close,
    ConnectServer,
    Negotiation,
    Opened,
    Refused,
    Relay,
    Send,
    Side,
    StartTls,
)

HANDSHAKE_TIMEOUT = 20.0  # s from accept to the end of the option phase
CHUNK = 256 << 10  # relay buffer per direction
MAX_CONNECTIONS = 256
_IN, _OUT, _GONE = select.POLLIN, select.POLLOUT, select.POLLERR | select.POLLHUP | select.POLLNVAL


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS server side: the datastore's certificate; clients must present one of the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsStream:
    """The server side of TLS on `sock` through memory BIOs. Blocking `handshake`, `recv` and
    `sendall` for the option phase (the socket's timeout applies); `relay` drives it non-blocking."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        if data:
            self.incoming.write(data)
        return bool(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("the client left during the TLS handshake") from None
                continue
            except ssl.SSLError:
                try:
                    self._flush()  # the alert tells the client why
                except OSError:
                    pass
                raise
            self._flush()
            return

    def peer_certificate(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()


def _say(message: str) -> None:
    print(f"kvmotion-datastore: {message}", file=sys.stderr, flush=True)


class NbdFront:
    """Accepts NBD clients on the listening socket `sock`, over TLS only, for nbdkit listening on
    `backend` (a Unix socket)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, backend: Path, audit: AuditLog | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.context = context
        self.backend = backend
        self.audit = audit
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[_Session] = set()
        self._lock = threading.Lock()
        self.sock = sock
        self.address = sock.getsockname()
        self._thread = threading.Thread(target=self._accept, name="nbd-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for session in list(self._open):
                session.interrupt()
        if self._thread.ident is not None:  # started
            self._thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                _say(f"NBD from {peer[0]}: refused, {self.max_connections} connections open")
                conn.close()
                continue
            session = _Session(self, conn, str(peer[0]))
            with self._lock:
                self._open.add(session)
            threading.Thread(target=self._serve, args=(session,), name=f"nbd-{peer[0]}", daemon=True).start()

    def _serve(self, session: _Session) -> None:
        try:
            session.run()
        except (OSError, KvmotionError) as exc:
            _say(f"NBD from {session.peer} ({session.who}): {exc}")
        finally:
            session.close()
            with self._lock:
                self._open.discard(session)
            self._slots.release()

    def audit_open(self, peer: str, who: str, export: str, status: int) -> None:
        if self.audit is not None:
            self.audit.write(at=round(time.time(), 3), who=who, method="NBD open", path=export, status=status,
                             client=peer)


class _Session:
    """One client connection: the option phase through nbd_gate, then the relay."""

    def __init__(self, front: NbdFront, sock: socket.socket, peer: str) -> None:
        self.front = front
        self.sock = sock
        self.peer = peer
        self.conn: socket.socket | TlsStream = sock  # TLS once STARTTLS is done
        self.backend: socket.socket | None = None
        self.identity: Identity | None = None
        self.who = "unauthenticated"

    def interrupt(self) -> None:
        """From another thread: end the session (its thread then closes the sockets)."""
        for s in (self.sock, self.backend):
            try:
                if s is not None:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for s in (self.backend, self.sock):
            if s is not None:
                s.close()

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        neg = Negotiation()
        todo = collections.deque(neg.start())
        while True:
            while todo:
                action = todo.popleft()
                if isinstance(action, Send):
                    target = self.conn if action.to is Side.CLIENT else self.backend
                    assert target is not None
                    target.sendall(action.data)
                elif isinstance(action, StartTls):
                    if not self._start_tls():
                        return
                    assert self.identity is not None
                    todo.extend(neg.tls_established(self.identity))
                elif isinstance(action, ConnectServer):
                    self.backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.backend.settimeout(HANDSHAKE_TIMEOUT)
                    self.backend.connect(str(self.front.backend))
                elif isinstance(action, Refused):
                    _say(f"NBD from {self.peer} ({self.who}): refused {action.export or 'the export list'}: "
                         f"{action.reason}")
                    self.front.audit_open(self.peer, self.who, action.export, 403)
                elif isinstance(action, Opened):
                    if _writable(action.export):
                        self.front.audit_open(self.peer, self.who, action.export, 200)
                elif isinstance(action, Relay):
                    assert self.backend is not None and isinstance(self.conn, TlsStream)
                    relay(self.conn, self.backend, action.to_server, action.to_client)
                    return
                elif isinstance(action, Close):
                    if not action.quiet:
                        _say(f"NBD from {self.peer} ({self.who}): closed: {action.reason}")
                    return
            side = neg.expecting
            source = self.conn if side is Side.CLIENT else self.backend
            if source is None:
                return
            data = source.recv(65536)
            if not data:
                return  # the client left, or nbdkit refused the export (it logs why)
            todo.extend(neg.receive(side, data))

    def _start_tls(self) -> bool:
        stream = TlsStream(self.sock, self.front.context)
        try:
            stream.handshake()
        except (ssl.SSLError, OSError) as exc:
            _say(f"NBD from {self.peer}: TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
            return False
        self.conn = stream
        der = stream.peer_certificate()
        if not der:  # CERT_REQUIRED makes the handshake fail first; kept as a second lock
            _say(f"NBD from {self.peer}: no client certificate")
            return False
        self.identity = identity_of_der(der)
        self.who = str(self.identity)
        return True


def _writable(export: str) -> bool:
    try:
        return ExportName.parse(export).host is not None
    except KvmotionError:
        return False


def relay(tls: TlsStream, plain: socket.socket, to_server: bytes = b"", to_client: bytes = b"") -> None:
    """Copy bytes both ways until either side closes (what it sent first reaches the other side):
    the client's TLS records decrypted to nbdkit (`plain`), nbdkit's bytes encrypted to the client."""
    sock, obj, incoming, outgoing = tls.sock, tls.tls, tls.incoming, tls.outgoing
    sock.setblocking(False)
    plain.setblocking(False)
    raw = memoryview(bytearray(CHUNK))  # ciphertext read from the client
    got = memoryview(bytearray(CHUNK))  # plaintext read from nbdkit
    up = bytearray(to_server)  # plaintext for nbdkit
    down = bytearray()  # ciphertext for the client
    if to_client:
        obj.write(to_client)
        down += outgoing.read()
    client_done = server_done = False
    # Whether a recv / send may make progress without poll saying so (a short read drained it).
    client_readable = client_writable = server_readable = server_writable = True
    cfd, sfd = sock.fileno(), plain.fileno()
    poller = select.poll()
    masks = {cfd: 0, sfd: 0}  # registered poll events per fd (0: not registered)
    while True:
        moved = False
        if not client_done and len(up) < CHUNK:
            if client_readable:
                try:
                    n = sock.recv_into(raw)
                except BlockingIOError:
                    n, client_readable = -1, False
                except OSError:
                    n = 0
                if n == 0:
                    client_done = True
                elif n > 0:
                    incoming.write(raw[:n])
                    client_readable = n == CHUNK
            while len(up) < CHUNK and (incoming.pending or obj.pending()):  # also what the option phase left
                try:
                    data = obj.read(CHUNK)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLError:  # close_notify, or a damaged record
                    client_done = True
                    break
                up += data
                moved = True
            if outgoing.pending:  # a read may answer (TLS 1.3 key update)
                down += outgoing.read()
        if up and server_writable:
            try:
                sent = plain.send(up)
            except BlockingIOError:
                server_writable = False
            except OSError:
                return
            else:
                del up[:sent]
                moved = True
                server_writable = not up
        if not server_done and len(down) < CHUNK and server_readable:
            try:
                n = plain.recv_into(got)
            except BlockingIOError:
                server_readable = False
            except OSError:
                server_done = True
            else:
                if n:
                    obj.write(got[:n])
                    down += outgoing.read()
                    moved = True
                    server_readable = n == CHUNK
                else:
                    server_done = True
        if down and client_writable:
            try:
                sent = sock.send(down)
            except BlockingIOError:
                client_writable = False
            except OSError:
                return
            else:
                del down[:sent]
                moved = True
                client_writable = not down
        if (client_done and not up) or (server_done and not down):
            return
        if moved:
            continue
        client_mask = (_IN if not client_done and len(up) < CHUNK and not client_readable else 0) | (
            _OUT if down and not client_writable else 0)
        server_mask = (_IN if not server_done and len(down) < CHUNK and not server_readable else 0) | (
            _OUT if up and not server_writable else 0)
        if not client_mask and not server_mask:  # nothing left to wait for
            return
        for fd, mask in ((cfd, client_mask), (sfd, server_mask)):
            # An fd with nothing awaited stays out: a hang-up there would wake poll at once, forever.
            if mask != masks[fd]:
                if mask:
                    poller.register(fd, mask)
                else:
                    poller.unregister(fd)
                masks[fd] = mask
        for fd, events in poller.poll():
            if fd == cfd:
                client_readable = client_readable or bool(events & (_IN | _GONE))
                client_writable = client_writable or bool(events & (_OUT | _GONE))
            else:
                server_readable = server_readable or bool(events & (_IN | _GONE))
                server_writable = server_writable or bool(events & (_OUT | _GONE))


def main(argv: list[str] | None = None) -> int:
    """The front end as `datastore serve`'s child process (its own process, so the data path and
    the control API never wait for each other's interpreter lock, and freezing one leaves the other
    running): it serves the listening socket it inherits until its parent goes (stdin closes)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kvmotion.storage.nbd_front", description=main.__doc__)
    ap.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    ap.add_argument("--cert", type=Path, required=True)
    ap.add_argument("--key", type=Path, required=True)
    ap.add_argument("--ca", type=Path, required=True)
    ap.add_argument("--backend", type=Path, required=True, help="nbdkit's Unix socket")
    ap.add_argument("--audit", type=Path, help="the datastore's audit log")
    args = ap.parse_args(argv)
    front = NbdFront(socket.socket(fileno=args.fd), server_context(args.cert, args.key, args.ca), args.backend,
                     AuditLog(args.audit) if args.audit else None)
    front.start()
    sys.stdin.buffer.read()  # returns when the parent has gone
    front.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
