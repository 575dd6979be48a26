"""An ASGI app under kvmotion's make_server, in a thread, on a free loopback port: for tests that
need the real TLS listener (client certificates, limits) without a subprocess."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from kvmotion.api.serving import Security, make_server
from kvmotion.core.listen import listening_socket

# s a stopping server waits for its connections to close before it closes them itself (an idle
# keep-alive client of a test never does)
GRACE = 1.0


class ServedApp:
    def __init__(self, app: Any, security: Security, what: str, lifespan: str = "auto",
                 sock: socket.socket | None = None) -> None:
        """`sock`: already bound (when the app must know its port), else a free one is bound."""
        self.sock = sock or listening_socket("127.0.0.1", 0, what, backlog=64)
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.server = make_server(app, security, what, lifespan=lifespan)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True  # a lifespan ends before the app's resources close
        self.thread.join(GRACE)
        if self.thread.is_alive():  # a client left a connection open (TLS close waits for its answer)
            self.server.force_exit = True
            self.thread.join(10)
        self.sock.close()
