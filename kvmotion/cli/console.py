"""Interactive serial console over the agent's WebSocket; Ctrl-] detaches."""

from __future__ import annotations

import os
import select
import sys
import termios
import tty

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from kvmotion.api.inventory import HostEntry
from kvmotion.api.tls import cli_ssl_context
from kvmotion.core.errors import Unreachable

DETACH = b"\x1d"  # Ctrl-]


def attach(entry: HostEntry, vm: str) -> None:
    url = entry.url.replace("http", "ws", 1) + f"/v1/vms/{vm}/console"
    ssl_ctx = None
    if url.startswith("wss"):
        ssl_ctx = cli_ssl_context()
    try:
        ws = connect(url, ssl=ssl_ctx, open_timeout=10)
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"console of VM {vm} at {entry.url} is not reachable: {exc}") from exc
    tty_in = sys.stdin.isatty()
    sys.stderr.write(f"Connected to VM {vm} on {entry.name}. Detach: Ctrl-]\r\n")
    sys.stderr.flush()
    saved = termios.tcgetattr(0) if tty_in else None
    try:
        if tty_in:
            tty.setraw(0)
        fd = sys.stdin.fileno()
        sock = ws.socket
        while True:
            ready, _, _ = select.select([fd, sock], [], [], 0.5)
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or DETACH in data:
                    break
                ws.send(data)
            if sock in ready:
                try:
                    msg = ws.recv(timeout=0)
                except TimeoutError:
                    continue
                except ConnectionClosed:
                    break
                out = msg if isinstance(msg, bytes) else msg.encode()
                os.write(1, out)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        ws.close()
        sys.stderr.write("\r\nDetached.\r\n")
