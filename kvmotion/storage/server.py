"""`kvmotion datastore serve`: nbdkit (data, NBD) plus the control API (HTTPS) in one service.

nbdkit runs as a child (--exit-with-parent) with kvmotion/storage/nbd_plugin.py; the control
API runs in this process under uvicorn. They share nothing but the files under the root, so the
service can be restarted at will: disks and lease state are on disk, and QEMU's NBD client
reconnects by itself (see attach.py).

Secure (the default): nbdkit listens only on a Unix socket in a private (0700) folder; the NBD
port belongs to the TLS front end (nbd_front.py, a child process like nbdkit), which takes the
client's identity from its certificate and opens `DISK@HOST` only for host:HOST and qemu:HOST
(nbd_gate.py). The
control API requires a client certificate of the cluster CA, and every mutating call goes to the
audit log (<root>/.kvmotion/audit.log). With --insecure nbdkit serves plain NBD on the port and
the API is plain HTTP, with a warning on every start.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from kvmotion.api.address import Endpoint
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.serving import Limits, Security, insecure_warning, make_server
from kvmotion.core import paths
from kvmotion.core.errors import SetupError
from kvmotion.core.listen import listening_socket
from kvmotion.core.tasks import sole_error
from kvmotion.core.units import format_duration
from kvmotion.storage import nbd_plugin_path
from kvmotion.storage.api import RENEW_SUFFIX, create_app
from kvmotion.storage.datastore import Datastore
from kvmotion.storage.leasefile import META_DIR
from kvmotion.storage.metrics import DatastoreMetrics

READY_TIMEOUT = 15.0
UNIX_PATH_MAX = 108  # bytes of sun_path, its terminating NUL included
HEARTBEAT = 1.0  # s between marks of "the service is up" (Datastore.heartbeat)
KEEP_ALIVE = 30.0  # s an idle API connection stays open (hosts renew every 5 s: theirs stay warm)
STOP_GRACE = 3  # s for API calls in flight at a stop (a TLS connection's close waits for its peer)
AUDIT_LOG = "audit.log"  # under <root>/.kvmotion
_TRACEBACK_START = re.compile(r"^nbdkit: .*error: .*Traceback \(most recent call last\):")


@dataclass(frozen=True)
class ServeConfig:
    name: str
    root: Path
    listen: Endpoint  # NBD
    control: Endpoint  # HTTP(S) control API
    lease_ttl: float
    nbdkit_threads: int = 16
    # The datastore's certificate folder (server-cert.pem, server-key.pem, ca-cert.pem); None: --insecure.
    cert_dir: Path | None = None
    limits: Limits = Limits()

    @property
    def insecure(self) -> bool:
        return self.cert_dir is None

    @property
    def tls_files(self) -> tuple[Path, Path, Path] | None:
        d = self.cert_dir
        return None if d is None else (d / SERVER_CERT, d / SERVER_KEY, d / CA_CERT)


def nbdkit_command(cfg: ServeConfig, pidfile: Path, unix: Path | None = None) -> list[str]:
    """nbdkit on the NBD port (--insecure), or only on the Unix socket `unix` behind the TLS front end."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SetupError("nbdkit not found: apt-get install nbdkit nbdkit-plugin-python")
    where = ["--unix", str(unix)] if unix is not None else ["--ipaddr", cfg.listen.host, "--port", str(cfg.listen.port)]
    return [
        nbdkit,
        "--foreground",
        "--exit-with-parent",
        *where,
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
        self.tail = [*self.tail, line][-10:]
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
            return [] if fenced else [*block, line]
        if _TRACEBACK_START.match(line):
            self.block = [line]
            return []
        return [line]


async def _pump(stream: asyncio.StreamReader, filt: _StderrFilter, metrics: DatastoreMetrics) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace")
        metrics.nbd_log_line(text)  # refused writes are counted from nbdkit's log line
        for out in filt.feed(text):
            sys.stderr.write(out)
        sys.stderr.flush()


async def _wait_ready(
    proc: asyncio.subprocess.Process, pidfile: Path, filt: _StderrFilter, listen: Endpoint
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not pidfile.exists():  # noqa: ASYNC240 - one stat per poll while nbdkit starts
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
    metrics = DatastoreMetrics(ds)
    tls_files = cfg.tls_files
    security = Security(tls_files=tls_files, audit_log=cfg.root / META_DIR / AUDIT_LOG, limits=cfg.limits,
                        quiet=(RENEW_SUFFIX,), insecure=cfg.insecure)  # checks the certificate files first
    control_sock = listening_socket(cfg.control.host, cfg.control.port, "the control API")
    if cfg.insecure:
        print(insecure_warning(f"datastore {cfg.name} (control {cfg.control})"), file=sys.stderr, flush=True)
        print(f"WARNING: datastore {cfg.name} serves NBD in plain text with --insecure: whoever reaches "
              f"{cfg.listen} reads every disk and writes as any host that holds a lease", file=sys.stderr, flush=True)
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
    # The NBD port is bound here, now (a busy port fails the start); the TLS front end inherits it.
    nbd_sock = None if cfg.insecure else listening_socket(cfg.listen.host, cfg.listen.port, "NBD")
    with _runtime_dir(cfg.name) as tmp:
        pidfile = tmp / "nbdkit.pid"
        unix = None if cfg.insecure else tmp / "nbdkit.sock"
        proc = await asyncio.create_subprocess_exec(
            *nbdkit_command(cfg, pidfile, unix), stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        filt = _StderrFilter()
        front: asyncio.subprocess.Process | None = None
        died: str | None = None
        try:
            # The pump ends at nbdkit's EOF: the children are stopped before the group is left.
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_pump(proc.stderr, filt, metrics))
                try:
                    await _wait_ready(proc, pidfile, filt, cfg.listen)
                    for line in filt.started():
                        sys.stderr.write(line)
                    if nbd_sock is not None and unix is not None and tls_files is not None:
                        front = await _start_front(nbd_sock, tls_files, unix, security.audit_log)
                    server = make_server(create_app(ds, metrics), security, f"datastore {cfg.name}", lifespan="off",
                                         access_log=False, timeout_keep_alive=int(KEEP_ALIVE),
                                         server_class=_QuietServer)
                    stop = asyncio.Event()
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                    nbd, api = ("nbd", "http") if cfg.insecure else ("nbds", "https")
                    print(
                        f"datastore {cfg.name}: NBD {cfg.listen.url(nbd)} (nbdkit pid {proc.pid}"
                        f"{f', TLS front end pid {front.pid}' if front else ''}), control {cfg.control.url(api)}, "
                        f"root {cfg.root}, lease TTL {format_duration(cfg.lease_ttl)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    children = {proc: "nbdkit"} | ({front: "the NBD TLS front end"} if front else {})
                    died = await _serve_until_stopped(server, control_sock, ds, stop, children)
                finally:
                    for child in (front, proc):
                        if child is not None and child.returncode is None:
                            child.terminate()
                            try:
                                await asyncio.wait_for(child.wait(), 10)
                            except TimeoutError:
                                child.kill()
                                await child.wait()
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
        finally:
            control_sock.close()
            if nbd_sock is not None:
                nbd_sock.close()
        if died:
            raise SetupError(f"{died} exited unexpectedly; datastore stopped")


@contextlib.contextmanager
def _runtime_dir(name: str) -> Iterator[Path]:
    """nbdkit's pid file and socket, mode 0700 (the socket is ours alone), under the machine's
    runtime folder: what a killed datastore leaves there is cleared at its next start."""
    path = paths.run_dir() / f"datastore-{name}"
    if len(str(path / "nbdkit.sock").encode()) >= UNIX_PATH_MAX:
        raise SetupError(f"runtime folder {path} is too long for a unix socket path (KVMOTION_RUN)")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _serve_until_stopped(server: uvicorn.Server, sock: socket.socket, ds: Datastore, stop: asyncio.Event,
                               children: dict[asyncio.subprocess.Process, str]) -> str | None:
    """Serve the control API until `stop` is set, the server ends or a child dies; the child's name if one did."""
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(server.serve(sockets=[sock]))
        beating = tasks.create_task(_heartbeat(ds))
        waits = {tasks.create_task(child.wait()): name for child, name in children.items()}
        stopping = tasks.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, stopping, *waits}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        if not (await asyncio.wait({serving}, timeout=STOP_GRACE))[0]:
            server.force_exit = True  # idle TLS clients that never answer the close
        for task in (beating, stopping, *waits):
            task.cancel()
    died = [name for task, name in waits.items() if task in done]
    return died[0] if died else None


async def _start_front(sock: socket.socket, tls_files: tuple[Path, Path, Path], backend: Path,
                       audit: Path | None) -> asyncio.subprocess.Process:
    """The NBD TLS front end (nbd_front.main) as a child process serving `sock`; it leaves when our
    end of its stdin closes (this process exiting, however it exits)."""
    cert, key, ca = tls_files
    argv = [sys.executable, "-m", "kvmotion.storage.nbd_front", "--fd", str(sock.fileno()), "--cert", str(cert),
            "--key", str(key), "--ca", str(ca), "--backend", str(backend)]
    if audit is not None:
        argv += ["--audit", str(audit)]
    return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),))


def run(cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; raises SetupError when nbdkit cannot start or dies."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)  # disks hold guests' data
    asyncio.run(_serve(cfg))
