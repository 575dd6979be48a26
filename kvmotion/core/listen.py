"""A bound, listening TCP socket for a server, or one line saying why there is none."""

from __future__ import annotations

import socket

from kvmotion.core.errors import SetupError


def listening_socket(host: str, port: int, what: str, backlog: int = 128) -> socket.socket:
    """Bind host:port (IPv4 or IPv6) and listen; `what` names the service in the error line.

    proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    without it a response's body waits for the client's delayed ACK (40 ms) on a kept connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {shown} for {what}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(False)
    return sock
