"""A VM the agent boots runs confined: QEMU as the unprivileged kvmotion-qemu, under its seccomp
sandbox, with its TAP, sockets, serial log and disk handed over as descriptors; the network,
the disk, the serial console and the agent's socket tuning still work, and it stops cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kvmotion.guest.serial import DiskAck, parse_line
from kvmotion.host.throttle import GROUP_PREFIX, VcpuThrottle
from kvmotion.net import netns
from kvmotion.qemu import confine, sockets

pytestmark = pytest.mark.qemu
MAC = "52:54:00:12:34:57"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "qemu-user.sh"


@pytest.fixture(scope="module")
def qemu_user():
    """The user as scripts/setup-host.sh creates it; made here (and removed after) if missing."""
    user = confine.lookup()
    created = user is None
    if created:
        if os.geteuid() != 0:
            pytest.skip(f"no user {confine.QEMU_USER} and not root to create it (run scripts/setup-host.sh)")
        subprocess.run(["bash", str(SCRIPT)], check=True, capture_output=True)
        user = confine.lookup()
        assert user is not None
    try:
        yield user
    finally:
        if created:
            subprocess.run(["userdel", confine.QEMU_USER], check=False, capture_output=True)
            subprocess.run(["groupdel", confine.QEMU_USER], check=False, capture_output=True)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _echo(ip: str, port: int) -> bytes:
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"confined\n")
        got = b""
        while len(got) < 9:
            got += s.recv(64)
    return got


def _serial_events(path: Path) -> list:
    return [e for e in map(parse_line, path.read_text(errors="replace").splitlines()) if e is not None]


def test_vm_runs_unprivileged_and_sandboxed(qemu_user, host):
    from websockets.sync.client import connect

    client = host.client()
    info = client.host()
    assert (info.qemu_user, info.qemu_user_reason) == (qemu_user.name, f"QEMU runs as user {qemu_user.name}, sandboxed")

    ip = f"{host.vm_net}.3"
    r = host.cli("vm", "create", "conf1", "--memory", "256M", "--disk", "conf1.img:32M",
                 "--nic", f"pg=vm-net,mac={MAC},ip={ip}/24", "--workload", "echo,disk")
    assert r.returncode == 0, r.stderr
    status = client.start("conf1", wait_ready=True)
    pid = status.pid
    assert pid and host.qemu_pids() == [pid]

    st = _status(pid)
    assert st["Uid"].split() == [str(qemu_user.uid)] * 4  # real, effective, saved, filesystem
    assert st["Gid"].split() == [str(qemu_user.gid)] * 4
    assert st["Seccomp"] == "2"  # filter mode: QEMU's -sandbox
    assert st["CapEff"] == "0000000000000000"

    # The TAP by descriptor: the guest answers on the VM network.
    assert netns.run_in_ns(host.ns, _echo, ip, 7000) == b"confined\n"

    # The disk by descriptor: the guest's writer gets acknowledgements.
    run = host.dir / "run" / "hosts" / host.name / "vms" / "conf1"
    deadline = time.monotonic() + 30
    while not any(isinstance(e, DiskAck) for e in _serial_events(run / "serial.log")):
        assert time.monotonic() < deadline, "the disk writer acknowledged nothing"
        time.sleep(0.2)
    disk = host.dir / "state" / "hosts" / host.name / "disks" / "conf1.img"
    assert (disk.stat().st_uid, disk.stat().st_mode & 0o777) == (0, 0o600)  # root's file, QEMU got it open

    # The agent still reaches into QEMU's sockets (pidfd_getfd): the monitor's listening socket.
    fds = [int(e.name) for e in Path(f"/proc/{pid}/fd").iterdir()
           if os.readlink(e).startswith("socket:")]
    assert any(sockets.sockopt(pid, fd, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1 for fd in fds)

    # CPU bandwidth control still moves the unprivileged QEMU's threads (the migration throttle).
    tids = [pid]  # its main thread: QEMU's worker threads come and go
    with VcpuThrottle("conf1", tids) as throttle:
        throttle.set_throttle(0.5)
        assert all(GROUP_PREFIX in Path(f"/proc/{pid}/task/{t}/cgroup").read_text() for t in tids)
    assert not any(GROUP_PREFIX in Path(f"/proc/{pid}/task/{t}/cgroup").read_text() for t in tids)

    # The serial console through the agent.
    with connect(f"wss://{host.mgmt_ns}:{host.port}/v1/vms/conf1/console", ssl=host.tls(), open_timeout=10) as ws:
        ws.send(b"\recho con$((40+2))fined\r")
        seen = b""
        deadline = time.monotonic() + 15
        while b"con42fined" not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            try:
                seen += ws.recv(timeout=1)
            except TimeoutError:
                continue

    # A clean stop: QMP stop + quit, QEMU exits by itself (the agent kills only after 15 s).
    t0 = time.monotonic()
    r = host.cli("vm", "stop", "conf1", "--json")  # a task of the center: it asks the agent to stop
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "done" and time.monotonic() - t0 < 10
    assert host.client().vm("conf1").state.value == "stopped"
    assert host.qemu_pids() == []
    assert "error" not in (run / "qemu.log").read_text().lower()
