"""Tune a running QEMU's TCP sockets from outside (Linux pidfd_getfd, 5.6+).

QEMU has no knob for its migration sockets' buffering, and a full send buffer is guest downtime:
whatever sits unsent in the source's socket buffers when the vCPUs stop must cross the link before
the destination can resume (measured ~45 ms on a 1 Gbit/s link with three migration channels).
TCP_NOTSENT_LOWAT bounds that backlog per socket. On the destination, what sits in the receive
buffers is loaded after the source has finished: a small SO_RCVBUF bounds that. Socket options
belong to the socket, not to the descriptor, so a duplicate taken with pidfd_getfd changes QEMU's
own socket. The same duplicates shut a stalled stream's sockets down, and /proc tells which of
QEMU's threads is blocked writing to which socket (kvmotion/qemu/cancel.py needs the order).
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

SYS_PIDFD_GETFD = 438  # same number on every architecture (the generic syscall table)
TCP_NOTSENT_LOWAT = 25  # linux/tcp.h; Python's socket module does not name it
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF past net.core.rmem_max, for CAP_NET_ADMIN
TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # the state column of /proc/net/tcp (include/net/tcp_states.h)
TCP_STATE_ESTABLISHED = 1  # the same state as tcp_info's first byte
# write(2), writev(2), sendto(2), sendmsg(2): the numbers /proc/PID/task/TID/syscall shows, per architecture
WRITE_SYSCALLS = {"x86_64": frozenset({1, 20, 44, 46}), "aarch64": frozenset({64, 66, 206, 211})}

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class TcpSocket:
    """One of a process's TCP sockets, as /proc/<pid>/net/tcp{,6} and /proc/<pid>/fd show it."""

    fd: int
    peer: tuple[str, int]
    unsent: int  # tx_queue: bytes not yet acknowledged by the peer
    local: tuple[str, int] = ("", 0)
    state: str = TCP_ESTABLISHED
    inode: int = 0

    @property
    def listening(self) -> bool:
        return self.state == TCP_LISTEN


def _addr(hexaddr: str) -> tuple[str, int]:
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The process's TCP sockets (in its own network namespace's view)."""
    by_inode: dict[int, TcpSocket] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            by_inode[int(f[9])] = TcpSocket(fd=-1, peer=_addr(f[2]), unsent=int(f[4].split(":")[0], 16),
                                            local=_addr(f[1]), state=f[3], inode=int(f[9]))
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in by_inode:
                found.append(dataclasses.replace(by_inode[inode], fd=int(entry.name)))
    return found


def _dup_from(pidfd: int, fd: int) -> int:
    dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if dup < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {fd}: {os.strerror(err)}")
    return dup


def sockopt(pid: int, fd: int, level: int, option: int, value: int | None = None) -> int:
    """Read, or set and read back, an integer socket option of another process's socket."""
    with _dup(pid, fd) as sock:  # closing our duplicate leaves the process's fd open
        if value is not None:
            sock.setsockopt(level, option, value)
        return sock.getsockopt(level, option)


def _peers(pid: int, peer_host: str, peer_port: int | None) -> list[TcpSocket]:
    want = str(ipaddress.ip_address(peer_host))
    return [s for s in tcp_sockets(pid) if s.peer[0] == want and (peer_port is None or s.peer[1] == peer_port)]


def _socket_from(pidfd: int, fd: int) -> socket.socket:
    dup = _dup_from(pidfd, fd)
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)  # not a socket (any more): the duplicate is ours to close
        raise


def _dup(pid: int, fd: int) -> socket.socket:
    pidfd = os.pidfd_open(pid)
    try:
        return _socket_from(pidfd, fd)
    finally:
        os.close(pidfd)


def stream_fds(pid: int, peer_host: str, peer_port: int | None) -> list[int]:
    """`pid`'s descriptors of its established sockets to the peer (reads the whole TCP table:
    milliseconds on a big host, so look them up ahead of the moment they are needed)."""
    return [s.fd for s in _peers(pid, peer_host, peer_port) if s.state == TCP_ESTABLISHED]


def established(pid: int, fds: list[int]) -> int:
    """How many of `pid`'s descriptors `fds` are TCP sockets still established (microseconds: one
    getsockopt per socket). A peer that died leaves them half-closed (its FIN) or closed (its RST),
    though the process still holds them."""
    pidfd = os.pidfd_open(pid)
    try:
        alive = 0
        for fd in fds:
            try:
                with _socket_from(pidfd, fd) as sock:
                    alive += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_STATE_ESTABLISHED
            except OSError:
                pass  # closed meanwhile, or not a socket any more
        return alive
    finally:
        os.close(pidfd)


def shutdown_to(pid: int, peer_host: str, peer_port: int | None) -> int:
    """Shut down every socket of `pid` connected to the peer, as QEMU's `yank` would: a write
    blocked on a dead link fails at once instead of after TCP's many-minute timeout. Returns how
    many sockets were shut down."""
    matching = _peers(pid, peer_host, peer_port)
    for s in matching:
        with _dup(pid, s.fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    return len(matching)


def limit_unsent(pid: int, peer_host: str, peer_port: int | None, limit: int, min_backlog: int = 0) -> int:
    """Set TCP_NOTSENT_LOWAT on every socket of `pid` connected to peer_host (and peer_port, if
    given), unless together they hold less than `min_backlog` bytes not yet acknowledged (the
    link keeps up: nothing to gain). Returns how many sockets were tuned; raises OSError when one
    could not be."""
    matching = _peers(pid, peer_host, peer_port)
    if sum(s.unsent for s in matching) < min_backlog:
        return 0
    for s in matching:
        sockopt(pid, s.fd, socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)
    return len(matching)


def limit_receive_buffer(pid: int, port: int, size: int) -> int:
    """Set SO_RCVBUF on the sockets of `pid` listening on `port`: the connections it then accepts
    inherit the size (and lose receive-buffer autotuning, which would grow it to megabytes).
    Returns the size the kernel reports (it doubles the request); raises OSError if none listens."""
    listening = [s for s in tcp_sockets(pid) if s.listening and s.local[1] == port]
    if not listening:
        raise OSError(f"process {pid} has no socket listening on port {port}")
    got = 0
    for s in listening:
        with _dup(pid, s.fd) as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return got


@dataclass(frozen=True)
class BlockedWrite:
    """A thread of a process, blocked in a write to one of the process's sockets."""

    thread: str  # the thread's name (QEMU names its threads with -name debug-threads=on)
    tid: int
    fd: int
    inode: int  # the socket's: a descriptor closed and reused meanwhile is never touched


def _write_in_progress(pid: int, tid: int) -> int | None:
    """The descriptor thread `tid` of `pid` is inside a write call on, or None (running, waiting
    on something else, gone, or an architecture whose numbers we do not know)."""
    calls = WRITE_SYSCALLS.get(platform.machine())
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return None
    if calls is None or len(fields) < 2 or not fields[0].isdigit() or int(fields[0]) not in calls:
        return None
    return int(fields[1], 16)


def blocked_writes(pid: int) -> list[BlockedWrite]:
    """The threads of `pid` inside a write to one of its sockets (from /proc: QEMU's monitor is
    not needed, so this works while its big lock is held)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        tid = int(task.name)
        fd = _write_in_progress(pid, tid)
        if fd is None:
            continue
        try:
            name = (task / "comm").read_text().strip()
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # the thread or the descriptor is gone meanwhile
        if target.startswith("socket:["):
            found.append(BlockedWrite(thread=name, tid=tid, fd=fd, inode=int(target[8:-1])))
    return found


def still_writing(pid: int, w: BlockedWrite) -> bool:
    """Whether the thread of `w` is still inside a write on that descriptor."""
    return _write_in_progress(pid, w.tid) == w.fd


def dup_socket(pid: int, fd: int, inode: int) -> socket.socket | None:
    """Our duplicate of `pid`'s socket `fd` if that descriptor still is socket `inode` (the
    duplicate keeps it from being reused under us); None when it is not."""
    try:
        sock = _dup(pid, fd)
    except OSError:
        return None  # closed meanwhile
    if os.fstat(sock.fileno()).st_ino != inode:
        sock.close()
        return None
    return sock


def shut(sock: socket.socket) -> bool:
    """Shut down both directions of a (duplicated) socket; False if it was not connected any more."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


def shutdown_socket(pid: int, fd: int, inode: int) -> bool:
    """Shut down `pid`'s socket `fd` if that descriptor still is socket `inode`. False when it is
    not, or was not connected any more."""
    sock = dup_socket(pid, fd, inode)
    if sock is None:
        return False
    with sock:
        return shut(sock)
