"""Network namespaces: create/delete, run code or processes inside one, veths, addresses, routes,
tbf shaping and bridge forwarding-database reads — all through netlink (pyroute2), never `ip`.

Namespaces are named and bind-mounted under /run/netns, as `ip netns` does, so both tools see them.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from kvmotion.errors import Conflict, InvalidInput, KvmotionError, NotFound, SetupError

NETNS_DIR = Path("/run/netns")
T = TypeVar("T")


def ns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def ns_exists(ns: str) -> bool:
    return ns in pr_netns.listnetns()


def list_ns() -> list[str]:
    return sorted(pr_netns.listnetns())


def create_ns(ns: str) -> None:
    """Create a named namespace with its loopback up; Conflict if it exists."""
    if not ns or "/" in ns or len(ns) > 64:
        raise InvalidInput(f"invalid namespace name {ns!r}")
    if ns_exists(ns):
        raise Conflict(f"network namespace {ns} already exists: delete it first")
    try:
        pr_netns.create(ns)
    except OSError as exc:
        raise SetupError(f"could not create network namespace {ns}: {exc}") from exc
    with ns_iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_ns(ns: str) -> None:
    """Remove a named namespace (its links go with it once no process holds it); no error if absent."""
    if not ns_exists(ns):
        return
    try:
        pr_netns.remove(ns)
    except FileNotFoundError:
        pass


def ns_inode(ns: str) -> int:
    """Inode identifying the namespace (equal to os.stat('/proc/PID/ns/net').st_ino of its members)."""
    try:
        return os.stat(ns_path(ns)).st_ino
    except FileNotFoundError:
        raise NotFound(f"network namespace {ns} does not exist") from None


def pids_in_ns(ns: str) -> list[int]:
    """Every process whose network namespace is `ns`."""
    target = os.stat(ns_path(ns))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
            found.append(int(entry))
    return found


def kill_ns_processes(ns: str, grace_s: float = 2.0) -> list[int]:
    """SIGTERM every process in `ns`, SIGKILL those left after `grace_s`; returns the pids found."""
    if not ns_exists(ns):
        return []
    pids = [p for p in pids_in_ns(ns) if p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (reaps it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def enter_ns(ns: str) -> None:
    """Move the calling process (all of it: call only in a fresh child) into namespace `ns`."""
    pr_netns.setns(str(ns_path(ns)), flags=0)


def run_in_ns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Call fn(*args) in a forked child that entered `ns`; return its (picklable) result or re-raise
    its exception. The caller's namespace is never touched."""
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            enter_ns(ns)
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - carried to the parent
            code = 1
            try:
                payload = pickle.dumps((False, exc))
            except Exception:  # an unpicklable exception: carry its text
                payload = pickle.dumps((False, SetupError(f"{type(exc).__name__}: {exc}")))
        try:
            with os.fdopen(wfd, "wb") as out:
                out.write(payload)
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(rfd, "rb") as inp:
            os.set_blocking(inp.fileno(), False)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    raise SetupError(f"call into namespace {ns} timed out after {timeout:.0f} s")
                ready, _, _ = select.select([inp], [], [], left)
                if not ready:
                    continue
                data = inp.read()
                if not data:
                    break
                chunks.append(data)
    finally:
        os.waitpid(pid, 0)
    if not chunks:
        raise SetupError(f"call into namespace {ns} died without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if ok:
        return value
    raise value


def popen_in_ns(ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside namespace `ns` (the child enters it between fork and exec)."""
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    path = str(ns_path(ns))

    def _enter() -> None:
        pr_netns.setns(path, flags=0)

    return subprocess.Popen(list(argv), preexec_fn=_enter, **popen_kwargs)


def ns_iproute(ns: str | None) -> IPRoute:
    """A netlink socket bound inside `ns` (None: the current namespace)."""
    if ns is None:
        return IPRoute()
    if not ns_exists(ns):
        raise NotFound(f"network namespace {ns} does not exist")
    return IPRoute(netns=ns, flags=0)
