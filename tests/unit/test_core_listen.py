"""The servers' one listening-socket helper."""

from __future__ import annotations

import socket

import pytest

from kvmotion.core.errors import SetupError
from kvmotion.core.listen import listening_socket


def test_socket_says_it_is_tcp_and_listens() -> None:
    """asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP; with proto 0
    a response's body waited for the client's delayed ACK, 40 ms per call on a kept connection."""
    sock = listening_socket("127.0.0.1", 0, "a test")
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert not sock.get_inheritable()
        with socket.create_connection(sock.getsockname(), timeout=5):
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_busy_port_is_one_line() -> None:
    first = listening_socket("127.0.0.1", 0, "a test")
    try:
        port = first.getsockname()[1]
        with pytest.raises(SetupError, match=rf"^cannot listen on 127\.0\.0\.1:{port} for the center: Address already in use$"):
            listening_socket("127.0.0.1", port, "the center")
        with pytest.raises(SetupError, match=r"^cannot listen on 192\.0\.2\.1:7700 for NBD: Cannot assign requested address$"):
            listening_socket("192.0.2.1", 7700, "NBD")  # TEST-NET-1: no address of this machine
    finally:
        first.close()
