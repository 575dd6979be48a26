"""The guest's C programs, compiled and run natively on this host (loopback and temp files only)."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmotion.guest import records, serial
from kvmotion.guest.image import SOURCES


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guest-bin")
    for src in sorted(SOURCES.glob("*.c")):
        # -Werror here, not in the image build: warnings are for developers, not for setups.
        subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out / src.stem), str(src)], check=True
        )
    return out


class Program:
    """A running program whose stdout lines are parsed as console events."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._buf = b""
        self.lines: list[str] = []

    def read_until(self, predicate, timeout: float = 5.0) -> serial.GuestEvent | None:  # type: ignore[no-untyped-def]
        """Reads lines until one parses to an event satisfying predicate; returns it (None on timeout)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                event = serial.parse_line(line)
                if event is not None and predicate(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buf += chunk

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def run() -> Iterator:
    started: list[Program] = []

    def start(*argv: str) -> Program:
        prog = Program(list(argv))
        started.append(prog)
        return prog

    yield start
    for prog in started:
        prog.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- kvm-mem ----


def test_mem_writer_paced_and_clean(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    rate = 8 << 20
    prog = run(str(bins / "kvm-mem"), str(1 << 20), str(rate))
    first = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
    second = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
    assert isinstance(first, serial.MemStatus) and isinstance(second, serial.MemStatus)
    assert second.errors == 0 and second.passes >= 1
    per_second = (second.seq - first.seq) * 4096
    assert 0.8 * rate <= per_second <= 1.2 * rate, per_second


def test_mem_writer_unpaced(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    prog = run(str(bins / "kvm-mem"), str(1 << 20), "0")
    status = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
    assert isinstance(status, serial.MemStatus) and status.errors == 0 and status.passes > 10


def _region(pid: int, size: int) -> int:
    """Start address of the process's anonymous mapping of exactly `size` bytes."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if end - start == size and perms.startswith("rw") and len(rest) == 3:
            return start
    raise AssertionError(f"no {size}-byte anonymous mapping in {pid}")


def test_mem_writer_detects_corruption(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    wss = (16 << 20) + 3 * 4096  # an odd size, to find the working set in /proc/PID/maps
    # 1024 pages a second: pages 200 and 201 are written once early on, and not again for 4 s.
    prog = run(str(bins / "kvm-mem"), str(wss), str(4 << 20))
    assert prog.read_until(lambda e: isinstance(e, serial.MemStatus) and e.passes == 0 and e.seq > 220)
    base = _region(prog.proc.pid, wss)
    with open(f"/proc/{prog.proc.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(base + 200 * 4096 + 8)  # page 200's sequence word
        mem.write((123456789).to_bytes(8, "little"))
        mem.seek(base + 201 * 4096 + 2048)  # page 201's body
        mem.write(b"\xff" * 8)
    prog.proc.send_signal(signal.SIGUSR1)
    corrupt = prog.read_until(lambda e: isinstance(e, serial.MemCorrupt) and e.page == 200)
    assert corrupt == serial.MemCorrupt(page=200, expected=201, found=123456789, word=1)
    torn = prog.read_until(lambda e: isinstance(e, serial.MemCorrupt))
    assert torn == serial.MemCorrupt(page=201, expected=202, found=202, word=256)
    verified = prog.read_until(lambda e: isinstance(e, serial.MemVerified))
    assert verified == serial.MemVerified(pages=wss // 4096, errors=2)
    # Repaired pages are not counted again.
    status = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
    assert isinstance(status, serial.MemStatus) and status.errors == 2


def test_mem_writer_stride_dirties_more_pages_and_still_checks_every_word(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    def pages_per_second(*stride: str) -> int:
        prog = run(str(bins / "kvm-mem"), *stride, str(4 << 20), "0")
        first = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
        second = prog.read_until(lambda e: isinstance(e, serial.MemStatus))
        assert isinstance(first, serial.MemStatus) and isinstance(second, serial.MemStatus) and second.errors == 0
        prog.proc.kill()
        return second.seq - first.seq

    # One word in 64 rewritten: natively about 30x the pages of whole-page writes.
    assert pages_per_second("-s", "64") > 3 * pages_per_second()

    wss = 64 * 4096 + 3 * 4096  # 67 pages, an odd size to find in /proc/PID/maps
    prog = run(str(bins / "kvm-mem"), "-s", "8", str(wss), str(64 * 4096))  # 64 pages a second
    assert prog.read_until(lambda e: isinstance(e, serial.MemStatus) and e.passes >= 2)
    base = _region(prog.proc.pid, wss)
    with open(f"/proc/{prog.proc.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(base + 10 * 4096 + 3 * 8)  # a word the stride leaves alone: only a full check sees it
        mem.write(b"\xff" * 8)
        mem.seek(base + 11 * 4096 + 16 * 8)  # a rewritten word
        mem.write(b"\xff" * 8)
    prog.proc.send_signal(signal.SIGUSR1)
    found = set()
    while True:
        event = prog.read_until(lambda e: isinstance(e, (serial.MemCorrupt, serial.MemVerified)))
        if isinstance(event, serial.MemVerified):
            break
        assert isinstance(event, serial.MemCorrupt)
        found.add((event.page, event.word))
    assert found == {(10, 3), (11, 16)}
    assert event == serial.MemVerified(pages=67, errors=2)


def test_mem_writer_rejects_bad_arguments(bins: Path) -> None:
    for argv in (["12", "0"], ["-s", "3", "1048576", "0"], ["-s", "1024", "1048576", "0"], ["-s", "0", "1048576", "0"]):
        proc = subprocess.run([str(bins / "kvm-mem"), *argv], capture_output=True, text=True)
        assert proc.returncode != 0, argv
        assert isinstance(serial.parse_line(proc.stdout), serial.Failed), argv


def test_mem_writer_refuses_a_working_set_larger_than_memory(bins: Path) -> None:
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) << 10  # type: ignore[union-attr]
    proc = subprocess.run([str(bins / "kvm-mem"), str(available + (1 << 30)), "0"], capture_output=True, text=True)
    event = serial.parse_line(proc.stdout)
    assert proc.returncode == 1
    assert isinstance(event, serial.Failed) and event.what == "mem" and "does not fit" in event.reason


def test_background_mode_returns_once_set_up(bins: Path, tmp_path: Path) -> None:
    console = tmp_path / "console"
    argv = [str(bins / "kvm-mem"), "-b", str(1 << 20), "1000000"]
    with open(console, "wb") as out:
        proc = subprocess.run(argv, stdout=out, timeout=5)
    assert proc.returncode == 0
    # The writer runs on in its own session; find it by its unique path to end it.
    found = subprocess.run(["pgrep", "-f", "-x", " ".join(argv)], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    try:
        assert len(pids) == 1
        deadline = time.monotonic() + 5
        while "KVMOTION MEM seq=" not in console.read_text():
            assert time.monotonic() < deadline, "the background writer printed nothing"
            time.sleep(0.1)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


# ---- kvm-cpu ----


def test_cpu_worker_reports_its_work_each_second_and_ends_with_its_reporter(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    prog = run(str(bins / "kvm-cpu"), "-n", "1")
    first = prog.read_until(lambda e: isinstance(e, serial.CpuStatus))
    second = prog.read_until(lambda e: isinstance(e, serial.CpuStatus))
    assert isinstance(first, serial.CpuStatus) and isinstance(second, serial.CpuStatus)
    assert first.workers == second.workers == 1
    assert second.units > 0 and second.total == first.total + second.units
    assert 900 <= second.ms <= 1500, second.ms  # about a second of the clock (slack for a loaded machine)
    prog.stop()  # SIGKILL to the reporter: its worker follows it (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", "-x", f"{bins / 'kvm-cpu'} -n 1"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a kvm-cpu worker outlived its reporter"
        time.sleep(0.05)


def test_cpu_worker_rejects_bad_arguments(bins: Path) -> None:
    for argv in (["-n", "0"], ["-n", "x"], ["-n", "999"]):
        proc = subprocess.run([str(bins / "kvm-cpu"), *argv], capture_output=True, text=True, timeout=5)
        assert proc.returncode == 2, argv
        assert isinstance(serial.parse_line(proc.stdout), serial.Failed), argv


# ---- kvm-echo ----


def test_echo_tcp_many_clients_and_udp(bins: Path, run) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    run(str(bins / "kvm-echo"), str(port))
    deadline = time.monotonic() + 5
    while True:
        try:
            first = socket.create_connection(("127.0.0.1", port), timeout=2)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    clients = [first] + [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(9)]
    try:
        for i, c in enumerate(clients):
            c.sendall(f"hello {i}".encode())
        for i, c in enumerate(clients):
            assert c.recv(100) == f"hello {i}".encode()
        assert clients[3].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) is not None
        big = os.urandom(1 << 20)  # larger than socket buffers: the echo must apply backpressure
        clients[0].sendall(big[: 1 << 19])
        got = bytearray()
        clients[0].sendall(big[1 << 19 :])
        while len(got) < len(big):
            got += clients[0].recv(1 << 16)
        assert bytes(got) == big
        clients[5].close()  # a client leaving does not disturb the others
        clients[6].sendall(b"still here")
        assert clients[6].recv(100) == b"still here"
    finally:
        for c in clients:
            c.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        for i in range(3):
            u.sendto(f"ping {i}".encode(), ("127.0.0.1", port))
            data, addr = u.recvfrom(100)
            assert data == f"ping {i}".encode() and addr[1] == port


def test_echo_reports_a_taken_port(bins: Path) -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([str(bins / "kvm-echo"), str(port)], capture_output=True, text=True, timeout=5)
    event = serial.parse_line(proc.stdout)
    assert proc.returncode == 1
    assert isinstance(event, serial.Failed) and event.what == "echo" and "bind" in event.reason


# ---- kvm-disk ----


def test_disk_writer_records_verify(bins: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 8 << 20)
    prog = run(str(bins / "kvm-disk"), str(image))
    acks = []
    while len(acks) < 5:
        ack = prog.read_until(lambda e: isinstance(e, serial.DiskAck))
        assert isinstance(ack, serial.DiskAck), prog.lines
        acks.append(ack.seq)
    assert acks == [records.BATCH * (i + 1) - 1 for i in range(5)]  # never a skipped seq
    prog.stop()
    check = records.verify_image(image, acks[-1])
    assert check.ok, check.summary()
    assert check.missing == check.duplicate == check.corrupt == 0


def test_disk_writer_pace(bins: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    prog = run(str(bins / "kvm-disk"), str(image))
    assert prog.read_until(lambda e: isinstance(e, serial.DiskAck))
    start = time.monotonic()
    count = 0
    while time.monotonic() - start < 1.0:
        if prog.read_until(lambda e: isinstance(e, serial.DiskAck), 1.0):
            count += 1
    assert 10 <= count <= 25, count  # about 20 batches a second


def test_disk_writer_reports_errors_and_retries_same_seq(bins: Path, run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A device that ends after 3 batches: writes beyond it fail and are retried, never skipped.
    image = tmp_path / "small.img"
    image.write_bytes(b"")
    loop = subprocess.run(["losetup", "--version"], capture_output=True)
    if loop.returncode != 0:
        pytest.skip("losetup is not available")
    os.truncate(image, records.OFFSET + 3 * records.BATCH * records.SIZE)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    if dev.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {dev.stderr.strip()}")
    device = dev.stdout.strip()
    try:
        prog = run(str(bins / "kvm-disk"), device)
        err = prog.read_until(lambda e: isinstance(e, serial.DiskError))
        assert isinstance(err, serial.DiskError) and "seq 24" in err.message
        again = prog.read_until(lambda e: isinstance(e, (serial.DiskError, serial.DiskAck)))
        assert isinstance(again, serial.DiskError) and "seq 24" in again.message
        acks = [serial.parse_line(line) for line in prog.lines]
        assert [a.seq for a in acks if isinstance(a, serial.DiskAck)] == [7, 15, 23]
        prog.stop()
        assert records.verify_image(Path(device), 23).ok
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_c_and_python_share_the_format() -> None:
    # The constants are written twice (C and Python); the tests above prove the bytes agree, this
    # names the constant that drifted if they do not.
    src = (SOURCES / "kvm-disk.c").read_text()

    def define(name: str) -> int:
        m = re.search(rf"#define {name} \(?([0-9a-fA-Fx]+)u?(?: << (\d+))?", src)
        assert m, name
        value = int(m.group(1), 0)
        return value << int(m.group(2)) if m.group(2) else value

    assert define("REC_SIZE") == records.SIZE
    assert define("REC_MAGIC") == records.MAGIC
    assert define("REC_OFFSET") == records.OFFSET
    assert define("PAYLOAD_OFF") == records.PAYLOAD_OFF
    assert define("PAYLOAD_MUL") == records.PAYLOAD_MUL
    assert define("BATCH") == records.BATCH
