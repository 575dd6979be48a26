"""Foundation: real QEMU, real guest, through the agent's API and the CLI (logged in to the center
the host joined: VM changes are the center's tasks, `vm list` and `host info` ask the agent)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from kvmotion.core.errors import Conflict
from kvmotion.guest.records import verify_image
from kvmotion.guest.serial import DiskAck, Ready, parse_line
from kvmotion.net import netns
from tests.integration.lab_fixture import wait_until

pytestmark = pytest.mark.qemu
MAC = "52:54:00:12:34:56"
MEM_RATE = 40_000_000  # bytes/s the guest's memory writer dirties


def guest_events(host, vm: str) -> list:
    log = host.dir / "run" / "hosts" / host.name / "vms" / vm / "serial.log"
    return [e for e in map(parse_line, log.read_text(errors="replace").splitlines()) if e is not None]


def wait_ready(host, vm: str, timeout: float = 60.0):
    """The VM's status once its guest said ready (the center's start task does not wait for the
    guest; `vm start` without a center waited up to 60 s for it)."""
    deadline = time.monotonic() + timeout
    while True:
        status = host.client().vm(vm)
        if status.ready or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def _dirty_rate(store, host: str, vm: str) -> float | None:
    row = store.host(host)
    loads = {v.name: v for v in row.load.vms} if row is not None and row.load is not None else {}
    return loads[vm].dirty_rate if vm in loads else None


def _echo_roundtrip(ip: str, port: int) -> tuple[bytes, bytes]:
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"hello kvmotion\n")
        tcp = b""
        while len(tcp) < 15:
            tcp += s.recv(64)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(b"probe-1", (ip, port))
    udp, _ = u.recvfrom(64)
    u.close()
    return tcp, udp


def test_boot_echo_disk_list_stop(host):
    ip = f"{host.vm_net}.2"
    r = host.cli("cluster", "settings", "--report-interval", "1s")  # full reports, with dirty rates, each second
    assert r.returncode == 0, r.stderr
    r = host.cli("vm", "create", "web1", "--memory", "256M", "--disk", "web1.img:64M",
                 "--nic", f"pg=vm-net,mac={MAC},ip={ip}/24", "--workload", "echo,disk,mem",
                 "--mem-wss", "64M", "--mem-rate", f"{MEM_RATE}")
    assert r.returncode == 0, r.stderr
    r = host.cli("vm", "start", "web1", "--json")
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "done" and task["result"]["host"] == "host-a", task
    status = wait_ready(host, "web1")
    assert status.state.value == "running" and status.ready is True
    assert any(isinstance(e, Ready) and set(e.workloads) == {"echo", "disk", "mem"} for e in guest_events(host, "web1"))

    # QEMU's page-sampling estimate of the writer's rate reaches the center with the host's load.
    assert host.center is not None
    store = host.center.prepared.center.store
    rate = wait_until("a dirty rate of web1 at the center", lambda: _dirty_rate(store, "host-a", "web1"), 30, 0.5)
    print(f"\ndirty rate at the center: {rate / 1e6:.1f} MB/s (writer {MEM_RATE / 1e6:.0f} MB/s)")
    assert MEM_RATE / 4 <= rate <= MEM_RATE * 10, f"dirty rate {rate / 1e6:.0f} MB/s for a writer of {MEM_RATE / 1e6:.0f}"

    tcp, udp = netns.run_in_ns(host.ns, _echo_roundtrip, ip, 7000)
    assert tcp == b"hello kvmotion\n" and udp == b"probe-1"

    r = host.cli("vm", "list", "--json")
    listed = json.loads(r.stdout)
    assert [(v["name"], v["state"], v["host"], v["memory"], v["vcpus"]) for v in listed] == [
        ("web1", "running", "host-a", 256 << 20, 1)
    ]
    table = host.cli("vm", "list").stdout
    assert "web1" in table and "running" in table and "host-a" in table

    # Let the disk writer acknowledge some batches, then stop cleanly.
    deadline = time.monotonic() + 30
    while not [e for e in guest_events(host, "web1") if isinstance(e, DiskAck) and e.seq >= 50]:
        assert time.monotonic() < deadline, "disk writer acknowledged nothing"
        time.sleep(0.2)
    r = host.cli("vm", "stop", "web1")
    assert r.returncode == 0, r.stderr
    acked = max(e.seq for e in guest_events(host, "web1") if isinstance(e, DiskAck))
    check = verify_image(host.dir / "state" / "hosts" / "host-a" / "disks" / "web1.img", acked)
    assert check.ok, check.summary()
    assert host.qemu_pids() == []
    assert json.loads(host.cli("vm", "list", "--json").stdout)[0]["state"] == "stopped"


def test_agent_sigkill_reattaches_without_second_copy(host):
    client = host.client()
    r = host.cli("vm", "create", "db1", "--memory", "256M")
    assert r.returncode == 0, r.stderr
    before = client.start("db1", wait_ready=True)
    assert before.pid and host.qemu_pids() == [before.pid]

    host.kill_agent()
    host.start_agent()
    after = host.client().vm("db1")
    assert after.state.value == "running" and after.pid == before.pid and after.ready
    assert host.qemu_pids() == [before.pid]
    with pytest.raises(Conflict, match="already running"):
        host.client().start("db1")
    assert host.qemu_pids() == [before.pid]
    # The re-attached VM is fully controllable: a clean stop through the new agent.
    host.client().stop("db1")
    assert host.qemu_pids() == []


def _one_line_error(r, pattern: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert pattern in lines[0], lines[0]


def test_bad_input_is_one_clear_line(host):
    assert host.cli("vm", "create", "ok1", "--memory", "256M").returncode == 0
    _one_line_error(host.cli("vm", "start", "nosuchvm"), "no VM nosuchvm in the cluster")
    _one_line_error(host.cli("vm", "create", "ok1", "--memory", "256M"), "exists already")
    _one_line_error(host.cli("vm", "create", "tiny", "--memory", "16M"), "too small")
    _one_line_error(host.cli("vm", "create", "huge", "--memory", "4096G"), "MiB free, the VM needs")
    _one_line_error(host.cli("vm", "create", "nodisk", "--disk", "absent.img"), "does not exist")
    _one_line_error(host.cli("vm", "create", "abspath", "--disk", "/etc/shadow"), "invalid local disk")
    _one_line_error(host.cli("vm", "create", "badnic", "--nic", "pg=vm-net,mac=zz"), "invalid MAC")
    _one_line_error(host.cli("vm", "create", "badpg", "--nic", f"pg=nope,mac={MAC}"), "port group nope")
    _one_line_error(host.cli("vm", "create", "Bad_Name"), "invalid VM name")
    _one_line_error(host.cli("vm", "create", "x1", "--memory", "lots"), "invalid size")
    host.kill_agent()
    _one_line_error(host.cli("vm", "list"), "no host agent answered")
    _one_line_error(host.cli("vm", "start", "ok1"), f"host agent at {host.url} is not reachable")
    _one_line_error(host.cli("host", "info", "host-a"), "not reachable")


def test_console_is_interactive(host):
    """The serial console through the agent's WebSocket: typed commands run in the guest."""
    from websockets.sync.client import connect

    assert host.cli("vm", "create", "con1", "--memory", "256M").returncode == 0
    host.client().start("con1", wait_ready=True)
    with connect(f"wss://{host.mgmt_ns}:{host.port}/v1/vms/con1/console", ssl=host.tls(), open_timeout=10) as ws:
        ws.send(b"\recho con$((40+2))sole\r")
        seen = b""
        deadline = time.monotonic() + 15
        while b"con42sole" not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            try:
                seen += ws.recv(timeout=1)
            except TimeoutError:
                continue
    host.client().stop("con1", force=True)
