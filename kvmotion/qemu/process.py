"""A supervised QEMU process: started detached so it outlives an agent crash, re-attached by pid file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core.errors import NotFound, SetupError, VmFailed
from kvmotion.qemu.cmdline import QemuFds, VmPaths
from kvmotion.qemu.confine import QemuUser


def _cmdline_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_ours(pid: int, tag: str) -> bool:
    """A pid is ours if it is a live (non-zombie) QEMU whose -name carries our tag."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return any(f"process={tag}" in a for a in _cmdline_of(pid))


def _listen(path: Path) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def open_fds(paths: VmPaths, taps: tuple[int, ...] = (), disks: tuple[Path | None, ...] = ()) -> QemuFds:
    """Open what QEMU gets by descriptor: the monitor and serial sockets (bound here, so only the
    agent needs the run folder), the serial log, and each local disk file (None: a network disk).
    `taps` are already open and stay the caller's to close; on failure nothing else is left open."""
    paths.root.mkdir(parents=True, exist_ok=True)
    for stale in (paths.qmp, paths.serial, paths.pidfile):
        stale.unlink(missing_ok=True)
    opened: list[int] = []
    try:
        qmp = _listen(paths.qmp)
        opened.append(qmp)
        serial = _listen(paths.serial)
        opened.append(serial)
        log = os.open(paths.serial_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        opened.append(log)
        disk_fds: list[int | None] = []
        for disk in disks:
            if disk is None:
                disk_fds.append(None)
                continue
            try:
                fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)  # never through a symlink
            except FileNotFoundError:
                raise NotFound(f"disk {disk} is missing") from None
            except OSError as exc:
                raise SetupError(f"cannot open disk {disk}: {exc.strerror}") from exc
            opened.append(fd)
            disk_fds.append(fd)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return QemuFds(qmp=qmp, serial=serial, serial_log=log, taps=taps, disks=tuple(disk_fds))


def close_own_fds(fds: QemuFds) -> None:
    """Close what open_fds opened (QEMU holds its own copies); the TAPs are the caller's."""
    for fd in (fds.qmp, fds.serial, fds.serial_log, *(d for d in fds.disks if d is not None)):
        os.close(fd)


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    paths: VmPaths
    tag: str
    started_at: float  # wall clock

    @staticmethod
    def start(argv: list[str], paths: VmPaths, tag: str, *, pass_fds: tuple[int, ...] = (),
              user: QemuUser | None = None) -> QemuProcess:
        """Start `argv` (inheriting `pass_fds`), as `user` when given, and write its pid file."""
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.pidfile.unlink(missing_ok=True)
        log = open(paths.qemu_log, "ab")
        # Unprivileged from exec on, not `-run-with user=`: QEMU 10.0.2 drops root after installing
        # its seccomp filter, and with elevateprivileges=deny that setgid() kills it (SIGSYS).
        creds = {} if user is None else dict(user=user.uid, group=user.gid, extra_groups=list(user.groups))
        try:
            # New session: an agent's SIGKILL (or Ctrl-C on its terminal) must not take its VMs with it.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                pass_fds=pass_fds, **creds,
            )
        except FileNotFoundError as exc:
            raise SetupError(f"{argv[0]} not found: run `make setup` to install QEMU") from exc
        finally:
            log.close()
        # Written by the agent (QEMU could not, unprivileged): a restarted agent finds it here (attach).
        tmp = paths.pidfile.with_name(f".{paths.pidfile.name}.{os.getpid()}")
        tmp.write_text(f"{proc.pid}\n")
        tmp.replace(paths.pidfile)
        return QemuProcess(pid=proc.pid, paths=paths, tag=tag, started_at=time.time())

    @staticmethod
    def attach(paths: VmPaths, tag: str) -> QemuProcess | None:
        """The running QEMU of this VM, found through its pid file, or None."""
        try:
            pid = int(paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _is_ours(pid, tag):
            return None
        try:
            started = paths.pidfile.stat().st_mtime
        except OSError:
            started = time.time()
        return QemuProcess(pid=pid, paths=paths, tag=tag, started_at=started)

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (re-attached after an agent restart, or reaped already): its cmdline tells.
            return _is_ours(self.pid, self.tag)
        # Our child: waitpid is the truth (and reaps it, so no zombie lingers). Its cmdline is no
        # witness here: /proc/<pid>/cmdline reads empty for a moment while it execs, which once made
        # a starting QEMU look dead, and the agent then left it running unsupervised.
        return pid == 0

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.paths.qemu_log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    async def wait_exit(self, poll: float = 0.2) -> None:
        """Return when the process is gone (child or not); pidfd where possible, polling otherwise."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            fd = None
        if fd is not None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            loop.add_reader(fd, lambda: done.done() or done.set_result(None))
            try:
                await done
            finally:
                loop.remove_reader(fd)
                os.close(fd)
            self.alive()
            return
        while self.alive():
            await asyncio.sleep(poll)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill_and_wait(self, timeout: float = 10.0) -> None:
        self.kill(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise VmFailed(f"QEMU pid {self.pid} did not exit after SIGKILL")
            time.sleep(0.02)
