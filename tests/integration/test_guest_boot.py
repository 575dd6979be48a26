"""Boots the real guest image under QEMU (TCG) and checks every workload end to end.

Drives qemu-system-x86_64 directly (not kvmotion/qemu/): a virtio-net NIC on QEMU's user network
with host port forwards reaches the echo service, a virtio disk takes the disk writer's records.
Run under `flock /tmp/kvmotion-qemu.lock` like every guest boot on the shared machine.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmotion.api.spec import NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.guest import records, serial
from kvmotion.guest.cmdline import kernel_cmdline
from kvmotion.guest.image import GuestImage, ensure_image

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"),
]

MAC = "52:54:00:4b:56:01"
GUEST_IP = "10.0.2.15/24"  # QEMU's user network forwards host ports to this address


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return ensure_image()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """A QEMU process whose serial console is this test's stdin/stdout pipe."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self._buf = b""

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> tuple[float, str] | None:
        """The first new console line satisfying predicate, with its time since start."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                entry = (time.monotonic() - self.started, raw.decode(errors="replace").rstrip("\r"))
                self.lines.append(entry)
                if predicate(entry[1]):
                    return entry
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return None
                self._buf += chunk

    def wait_event(self, kind: type, timeout: float, check: Callable[[object], bool] = lambda e: True):  # type: ignore[no-untyped-def]
        found = self.wait_for(lambda line: isinstance(e := serial.parse_line(line), kind) and check(e), timeout)
        assert found is not None, f"no {kind.__name__} within {timeout} s; console:\n{self.console()}"
        return found[0], serial.parse_line(found[1])

    def type(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def console(self) -> str:
        return "\n".join(f"{t:6.2f} {line}" for t, line in self.lines[-40:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def boot(guest_image: GuestImage) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def start(spec: VmSpec, machine: str, extra: list[str]) -> Guest:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-M", machine, "-cpu", spec.cpu_model,
            "-m", str(spec.memory >> 20), "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initramfs),
            "-append", kernel_cmdline(spec), *extra,
        ]  # fmt: skip
        guest = Guest(argv)
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.kill()


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_boot_runs_every_workload(boot, tmp_path: Path, machine: str) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / f"disk-{os.getpid()}.img"
    disk.write_bytes(b"")
    os.truncate(disk, 64 << 20)
    port = _free_port()
    spec = VmSpec(
        name="guest-test",
        memory=512 << 20,
        nics=(NicSpec(mac=MAC, portgroup="test", ip=GUEST_IP),),
        workloads=(Workload.MEMWRITER, Workload.ECHO, Workload.DISKWRITER),
        params=WorkloadParams(mem_wss=64 << 20, mem_rate=50 * 10**6, echo_port=7000),
    )
    guest = boot(
        spec,
        machine,
        [
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7000,hostfwd=udp:127.0.0.1:{port}-:7000",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
            "-drive", f"file={disk},format=raw,if=virtio,cache=writeback",
        ],
    )  # fmt: skip

    ready_at, ready = guest.wait_event(serial.Ready, 60)
    assert ready == serial.Ready(workloads=("mem", "echo", "disk"))
    print(f"\n{machine}: READY {ready_at:.2f} s after QEMU started")
    assert not any(isinstance(serial.parse_line(line), serial.Failed) for _, line in guest.lines), guest.console()

    # The memory writer: a full pass of its working set, verified, with no error.
    _, status = guest.wait_event(serial.MemStatus, 30, lambda e: e.passes >= 2)
    assert status.errors == 0

    # The echo service, through the NIC configured by MAC.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(5):
            c.sendall(f"ping {i}\n".encode())
            got = b""
            while not got.endswith(b"\n"):
                got += c.recv(100)
            assert got == f"ping {i}\n".encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(b"datagram", ("127.0.0.1", port))
        assert u.recvfrom(100)[0] == b"datagram"

    # The serial console has a shell: ask it for the guest's address and an on-demand memory check.
    guest.type("ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; kill -USR1 $(pidof kvm-mem)")
    assert guest.wait_for(lambda line: line.strip() == f"inet {GUEST_IP}", 20), guest.console()
    _, verified = guest.wait_event(serial.MemVerified, 20)
    assert verified == serial.MemVerified(pages=(64 << 20) // 4096, errors=0)

    # The disk writer: every acknowledged record is on the host's image, even after a hard kill.
    _, _ack = guest.wait_event(serial.DiskAck, 20, lambda e: e.seq >= 10 * records.BATCH)
    guest.kill()
    last_ack = max(e.seq for _, line in guest.lines if isinstance(e := serial.parse_line(line), serial.DiskAck))
    check = records.verify_image(disk, last_ack)
    assert check.ok, check.summary()
