"""`kvmotion datastore serve`: nbdkit (data, NBD) plus the control API (HTTP) in one service.

nbdkit runs as a child (--exit-with-parent) with kvmotion/storage/nbd_plugin.py; the control
API runs in this process under uvicorn. They share nothing but the files under the root, so the
service can be restarted at will: disks and lease state are on disk, and QEMU's NBD client
reconnects by itself (see attach.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from kvmotion.errors import SetupError
from kvmotion.storage import nbd_plugin_path
from kvmotion.storage.address import Endpoint
from kvmotion.storage.api import create_app
from kvmotion.storage.datastore import Datastore
from kvmotion.units import format_duration

READY_TIMEOUT = 15.0
HEARTBEAT = 1.0  # s between marks of "the service is up" (Datastore.heartbeat)
_TRACEBACK_START = re.compile(r"^nbdkit: .*error: .*Traceback \(most recent call last\):")


@dataclass(frozen=True)
class ServeConfig:
    name: str
    root: Path
    listen: Endpoint  # NBD
    control: Endpoint  # HTTP control API
    lease_ttl: float
    nbdkit_threads: int = 16


def nbdkit_command(cfg: ServeConfig, pidfile: Path) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SetupError("nbdkit not found: apt-get install nbdkit nbdkit-plugin-python")
    return [
        nbdkit,
        "--foreground",
        "--exit-with-parent",
        "--ipaddr", cfg.listen.host,
        "--port", str(cfg.listen.port),
        "--pidfile", str(pidfile),
        "--threads", str(cfg.nbdkit_threads),
        "python", str(nbd_plugin_path()),
        f"root={cfg.root}",
    ]  # fmt: skip


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: we stop nbdkit after it, not before."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(ep: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ep.host, ep.port))
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {ep} for the control API: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class _StderrFilter:
    """Forward nbdkit's stderr, minus the Python tracebacks of refused (fenced) writes.

    nbdkit prints a traceback for every exception a plugin raises; the plugin already logs one
    line per connection and refusal reason, so a fenced client does not flood the log.
    """

    def __init__(self) -> None:
        self.block: list[str] | None = None
        self.tail: list[str] = []  # last lines, for startup errors
        self.held: list[str] | None = []  # until nbdkit is up: a failed start is one line

    def feed(self, line: str) -> list[str]:
        self.tail = (self.tail + [line])[-10:]
        if self.held is not None:
            self.held.append(line)
            return []
        return self._filter(line)

    def started(self) -> list[str]:
        held, self.held = self.held or [], None
        return [out for line in held for out in self._filter(line)]

    def _filter(self, line: str) -> list[str]:
        if self.block is not None:
            if line.strip():
                self.block.append(line)
                return []
            block, self.block = self.block, None
            fenced = any("PermissionError" in b for b in block) and any("refused" in b for b in block)
            return [] if fenced else block + [line]
        if _TRACEBACK_START.match(line):
            self.block = [line]
            return []
        return [line]


async def _pump(stream: asyncio.StreamReader, filt: _StderrFilter) -> None:
    while line := await stream.readline():
        for out in filt.feed(line.decode(errors="replace")):
            sys.stderr.write(out)
        sys.stderr.flush()


async def _wait_ready(
    proc: asyncio.subprocess.Process, pidfile: Path, filt: _StderrFilter, listen: Endpoint
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not pidfile.exists():
        if proc.returncode is not None:
            await asyncio.sleep(0.1)  # let the pump read the last lines
            why = next((t.strip() for t in reversed(filt.tail) if "error" in t), "no message")
            raise SetupError(f"nbdkit could not serve NBD on {listen}: {why.removeprefix('nbdkit: ')}")
        if time.monotonic() > deadline:
            raise SetupError(f"nbdkit did not start listening within {READY_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)


async def _heartbeat(ds: Datastore) -> None:
    while True:
        ds.heartbeat()
        await asyncio.sleep(HEARTBEAT)


async def _serve(cfg: ServeConfig) -> None:
    ds = Datastore(cfg.name, cfg.root, cfg.lease_ttl)
    control_sock = _bind(cfg.control)
    # Before nbdkit takes writes: holders could not renew while the service was down, and the
    # writes their QEMU queued meanwhile (reconnect-delay) must not be refused as expired.
    resumed = ds.resume_after_outage()
    ds.heartbeat()
    if resumed:
        print(
            f"datastore {cfg.name}: the service was down; {len(resumed)} lease(s) live then get a "
            f"new TTL: " + ", ".join(f"{lease.disk} ({lease.host})" for lease in resumed),
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="kvmotion-ds-") as tmp:
        pidfile = Path(tmp) / "nbdkit.pid"
        proc = await asyncio.create_subprocess_exec(
            *nbdkit_command(cfg, pidfile), stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        filt = _StderrFilter()
        pump = asyncio.create_task(_pump(proc.stderr, filt))
        try:
            await _wait_ready(proc, pidfile, filt, cfg.listen)
            for line in filt.started():
                sys.stderr.write(line)
            server = _QuietServer(
                uvicorn.Config(create_app(ds), log_level="warning", access_log=False, lifespan="off")
            )
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            print(
                f"datastore {cfg.name}: NBD {cfg.listen.nbd_url} (nbdkit pid {proc.pid}), "
                f"control {cfg.control.http_url}, root {cfg.root}, "
                f"lease TTL {format_duration(cfg.lease_ttl)}",
                file=sys.stderr,
                flush=True,
            )
            serving = asyncio.create_task(server.serve(sockets=[control_sock]))
            beating = asyncio.create_task(_heartbeat(ds))
            nbdkit_exit = asyncio.create_task(proc.wait())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, nbdkit_exit, stopping}, return_when=asyncio.FIRST_COMPLETED)
            server.should_exit = True
            await serving
            stopping.cancel()
            beating.cancel()
            if nbdkit_exit.done():
                raise SetupError(f"nbdkit exited unexpectedly ({proc.returncode}); datastore stopped")
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await pump
            control_sock.close()


def run(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; raises SetupError when nbdkit cannot start or dies."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)  # disks hold guests' data
    asyncio.run(_serve(cfg))
