"""kvmotion.qemu.sockets against a real child process's real TCP sockets."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from kvmotion.qemu import sockets

CHILD = """
import socket, sys, time
a = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
print("connected", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def child_with_two_connections():
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ports = [s.getsockname()[1] for s in listeners]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        accepted = [s.accept()[0] for s in listeners]
        yield proc.pid, ports, accepted
        for s in accepted:
            s.close()
    finally:
        proc.kill()
        proc.wait()
        for s in listeners:
            s.close()


def test_finds_the_child_s_connections_by_peer(child_with_two_connections):
    pid, ports, _ = child_with_two_connections
    peers = {s.peer for s in sockets.tcp_sockets(pid)}
    assert peers == {("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])}


def test_limit_unsent_sets_the_option_on_the_child_s_own_socket(child_with_two_connections):
    pid, ports, _ = child_with_two_connections
    assert sockets.limit_unsent(pid, "127.0.0.1", ports[0], 131072) == 1
    by_port = {s.peer[1]: s for s in sockets.tcp_sockets(pid)}
    lowat = socket.IPPROTO_TCP, sockets.TCP_NOTSENT_LOWAT
    assert sockets.sockopt(pid, by_port[ports[0]].fd, *lowat) == 131072
    assert sockets.sockopt(pid, by_port[ports[1]].fd, *lowat) != 131072  # the other peer untouched
    # every connection to the host when no port is given
    assert sockets.limit_unsent(pid, "127.0.0.1", None, 65536) == 2
    assert sockets.sockopt(pid, by_port[ports[1]].fd, *lowat) == 65536


def test_no_matching_peer_tunes_nothing(child_with_two_connections):
    pid, _, _ = child_with_two_connections
    assert sockets.limit_unsent(pid, "127.0.0.2", None, 65536) == 0


def test_a_gone_process_raises_oserror():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.05)
    with pytest.raises(OSError):
        sockets.sockopt(proc.pid, 0, socket.IPPROTO_TCP, sockets.TCP_NOTSENT_LOWAT)


def test_addresses_parse_as_the_kernel_prints_them():
    assert sockets._addr("0100007F:1F90") == ("127.0.0.1", 8080)
    # IPv4-mapped IPv6 (::ffff:10.77.0.2), as a dual-stack socket shows in tcp6
    assert sockets._addr("0000000000000000FFFF000002004D0A:0050") == ("10.77.0.2", 80)


def test_an_idle_connection_is_left_alone_when_a_backlog_is_required(child_with_two_connections):
    pid, ports, _ = child_with_two_connections
    # nothing queued on these connections: below any positive backlog threshold
    assert sockets.limit_unsent(pid, "127.0.0.1", ports[0], 131072, min_backlog=1) == 0
    by_port = {s.peer[1]: s for s in sockets.tcp_sockets(pid)}
    assert by_port[ports[0]].unsent == 0
    assert sockets.sockopt(pid, by_port[ports[0]].fd, socket.IPPROTO_TCP, sockets.TCP_NOTSENT_LOWAT) != 131072


def test_shutdown_to_ends_the_child_s_connection_to_that_peer_only(child_with_two_connections):
    pid, ports, accepted = child_with_two_connections
    assert sockets.shutdown_to(pid, "127.0.0.1", ports[0]) == 1
    # the child's socket is shut down: our end reads EOF; the other connection is untouched
    accepted[0].settimeout(5)
    assert accepted[0].recv(1) == b""
    accepted[1].setblocking(False)
    with pytest.raises(BlockingIOError):
        accepted[1].recv(1)


def _settled_count(pid: int, fds: list[int], want: int) -> int:
    deadline = time.monotonic() + 5  # loopback delivers FIN/RST at once; allow a loaded machine
    while (n := sockets.established(pid, fds)) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_established_counts_what_a_dead_peer_left_half_closed_or_reset(child_with_two_connections):
    pid, ports, accepted = child_with_two_connections
    fds = sockets.stream_fds(pid, "127.0.0.1", None)
    first = sockets.stream_fds(pid, "127.0.0.1", ports[0])
    second = sockets.stream_fds(pid, "127.0.0.1", ports[1])
    assert len(first) == len(second) == 1 and sorted(first + second) == sorted(fds)
    assert sockets.established(pid, fds) == 2
    accepted[0].close()  # an orderly close (FIN): the child's end is left half-closed
    assert _settled_count(pid, first, 0) == 0
    assert sockets.established(pid, second) == 1
    # a reset (as when the peer dies with unread data): the child's socket is closed under it
    accepted[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted[1].close()
    assert _settled_count(pid, second, 0) == 0
    assert sockets.stream_fds(pid, "127.0.0.1", None) == []
    # a descriptor that is not a socket (or no longer open) never counts, and its duplicate is closed
    ours = len(os.listdir("/proc/self/fd"))
    assert sockets.established(pid, [0, 999]) == 0
    assert len(os.listdir("/proc/self/fd")) == ours


LISTENER = """
import socket, time
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()
print("accepted", flush=True)
time.sleep(60)
"""


def test_receive_buffer_set_on_a_listener_is_inherited_by_what_it_accepts():
    proc = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        default = socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        got = sockets.limit_receive_buffer(proc.pid, port, 40 << 10)
        assert got == 2 * (40 << 10)  # the kernel doubles the request (bookkeeping overhead)
        with socket.create_connection(("127.0.0.1", port)):
            assert proc.stdout.readline().strip() == "accepted"
            [conn] = [s for s in sockets.tcp_sockets(proc.pid) if not s.listening]
            assert conn.local[1] == port
            assert sockets.sockopt(proc.pid, conn.fd, socket.SOL_SOCKET, socket.SO_RCVBUF) == got != default
        with pytest.raises(OSError, match="no socket listening on port"):
            sockets.limit_receive_buffer(proc.pid, port + 1 if port < 65535 else port - 1, 40 << 10)
    finally:
        proc.kill()
        proc.wait()


WRITER = """
import ctypes, socket, sys, threading, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def write():
    ctypes.CDLL(None).prctl(15, b"mig/src/send_0")  # PR_SET_NAME: this thread's name, as QEMU's
    try:
        while True:
            conn.sendall(b"x" * 65536)
    except OSError as exc:
        print("failed", exc.errno, flush=True)
threading.Thread(target=write).start()
print(conn.fileno(), flush=True)
time.sleep(60)
"""


@pytest.fixture()
def child_blocked_in_a_write():
    """A child whose thread 'mig/src/send_0' writes to a peer that reads nothing: it blocks."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(listener.getsockname()[1])], stdout=subprocess.PIPE,
                            text=True)
    try:
        fd = int(proc.stdout.readline())
        peer, _ = listener.accept()
        deadline = time.monotonic() + 10
        while not (found := sockets.blocked_writes(proc.pid)):
            assert time.monotonic() < deadline, "the child's writer never blocked"
            time.sleep(0.02)
        yield proc, fd, found
        peer.close()
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def test_a_thread_blocked_in_a_write_is_found_by_name_descriptor_and_socket(child_blocked_in_a_write):
    proc, fd, found = child_blocked_in_a_write
    [w] = found
    assert (w.thread, w.fd) == ("mig/src/send_0", fd)
    assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == f"socket:[{w.inode}]"
    assert sockets.still_writing(proc.pid, w)


def test_shutdown_socket_fails_the_blocked_write_and_checks_the_socket_first(child_blocked_in_a_write):
    proc, fd, [w] = child_blocked_in_a_write
    assert not sockets.shutdown_socket(proc.pid, fd, w.inode + 1)  # another socket now: left alone
    assert sockets.still_writing(proc.pid, w)
    assert sockets.shutdown_socket(proc.pid, fd, w.inode)
    assert proc.stdout.readline().split() == ["failed", str(errno.EPIPE)]
    assert not sockets.still_writing(proc.pid, w)
    assert not sockets.shutdown_socket(proc.pid, 999, w.inode)  # no such descriptor
