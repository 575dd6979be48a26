"""Labs on the real kernel: up/down leave nothing behind, labs coexist, traffic flows, tbf shapes."""

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from kvmotion.core.errors import Conflict, NotFound
from kvmotion.net import lab, links, netns

pytestmark = pytest.mark.lab

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

TCP_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(10)
n, t0, t1 = 0, None, None
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    now = time.monotonic()
    if t0 is None:
        t0 = now
    n += len(d); t1 = now
print(n / (t1 - t0), flush=True)
"""


def _name() -> str:
    return f"t{os.getpid() % 10000}{uuid.uuid4().hex[:3]}"


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMOTION_RUN", str(tmp_path / "run"))
    return tmp_path / "run"


@pytest.fixture
def make_lab(run_dir):
    made = []

    def _make(hosts=2, link_rate=None):
        topo = lab.lab_up(_name(), hosts, link_rate)
        made.append(topo.name)
        return topo

    yield _make
    for name in made:
        lab.lab_down(name)


def _nothing_left(topo: lab.LabTopology) -> None:
    present = netns.list_ns()
    assert not [ns for ns in present if ns.startswith(f"kvl-{topo.name}-")]
    assert not netns.link_exists_in(None, topo.root_if)
    assert not lab.lab_dir(topo.name).exists()


def _start(ns, script, *args):
    proc = lab.netns.popen_in_ns(ns, [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _udp_roundtrip(ip: str, port: int) -> bytes:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    try:
        for _ in range(3):  # the first datagram may wait for ARP
            s.sendto(b"ping", (ip, port))
            try:
                return s.recvfrom(2048)[0]
            except TimeoutError:
                continue
        return b""
    finally:
        s.close()


def test_up_down_leaves_nothing_behind(run_dir):
    name = _name()
    topo = lab.lab_up(name, 3, 125_000_000)
    try:
        assert lab.load_lab(name) == topo
        assert lab.lab_health(topo).ok
        with pytest.raises(Conflict):
            lab.lab_up(name, 3)
        # processes the lab did not start itself: an "agent" in each host and something in the switch
        procs = [lab.spawn_in_ns(h.ns, ["sleep", "300"], run_dir / f"{h.name}.log") for h in topo.hosts]
        procs.append(lab.spawn_in_ns(topo.switch_ns, ["sleep", "300"], run_dir / "sw.log"))
        # a persistent TAP in a host, as an agent would create
        netns.run_in_ns(topo.hosts[0].ns, links.create_tap, links.tap_name("web1", 0), topo.hosts[0].vm_bridge)
    finally:
        report = lab.lab_down(name)
    assert {p.pid for p in procs} <= set(report.killed_pids)
    for p in procs:
        assert p.wait(timeout=5) is not None
    _nothing_left(topo)
    assert lab.lab_down(name).namespaces_removed == ()  # idempotent


def test_down_cleans_half_built_lab(run_dir):
    name = _name()
    topo = lab.plan_lab(name, 0)
    netns.create_ns(topo.switch_ns)
    netns.create_ns(topo.hosts[0].ns)
    netns.create_veth(topo.root_if, None, "root", topo.switch_ns)
    lab.lab_down(name)
    _nothing_left(topo)


def test_two_labs_coexist_and_root_reaches_hosts(make_lab):
    one, two = make_lab(2), make_lab(2)
    assert one.mgmt_subnet != two.mgmt_subnet
    for topo in (one, two):
        echo = _start(topo.hosts[1].ns, UDP_ECHO, 7001)
        try:
            assert _udp_roundtrip(topo.hosts[1].mgmt_ip, 7001) == b"ping"
            # hosts reach each other and the datastore on mgmt
            assert netns.run_in_ns(topo.hosts[0].ns, _udp_roundtrip, topo.hosts[1].mgmt_ip, 7001) == b"ping"
            # ...over the mgmt uplink: the VM-network bridge must not answer ARP for the host's IP
            expected = netns.link_mac(topo.hosts[1].ns, topo.hosts[1].mgmt_if)
            assert netns.neighbour_mac(topo.hosts[0].ns, topo.hosts[1].mgmt_ip) == expected
        finally:
            echo.kill()
            echo.wait()


def test_client_reaches_a_guest_behind_a_host_bridge(make_lab):
    topo = make_lab(2)
    host = topo.hosts[0]
    guest_ns = f"kvl-{topo.name}-g1"  # carries the lab prefix: lab down removes it too
    netns.create_ns(guest_ns)
    netns.create_veth("eth0", guest_ns, "g1", host.ns)
    netns.run_in_ns(host.ns, links.enslave, "g1", host.vm_bridge)
    netns.add_address(guest_ns, "eth0", f"{topo.vm_ip(0)}/{topo.vm_prefix}")
    echo = _start(guest_ns, UDP_ECHO, 7000)
    try:
        assert netns.run_in_ns(topo.client.ns, _udp_roundtrip, topo.vm_ip(0), 7000) == b"ping"
        guest_mac = netns.link_mac(guest_ns, "eth0")
        assert netns.fdb_port(topo.switch_ns, topo.switch_bridge, guest_mac) == host.switch_vm_port
        assert netns.fdb_port(host.ns, host.vm_bridge, guest_mac) == "g1"
    finally:
        echo.kill()
        echo.wait()


def _tcp_stream(ip: str, port: int, seconds: float) -> None:
    s = socket.create_connection((ip, port), timeout=5)
    buf = b"x" * (1 << 16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(buf)
    s.close()


@pytest.mark.parametrize("rate", [125_000_000])  # 1 Gbit/s
def test_tbf_shaping_rate(make_lab, rate):
    topo = make_lab(2, link_rate=rate)
    src, dst = topo.hosts
    for direction in ((src, dst), (dst, src)):
        sender, receiver = direction
        sink = _start(receiver.ns, TCP_SINK, 5001)
        try:
            netns.run_in_ns(sender.ns, _tcp_stream, receiver.mgmt_ip, 5001, 2.0)
            measured = float(sink.stdout.readline())
        finally:
            sink.kill()
            sink.wait()
        print(f"tbf {rate * 8 / 1e9:g} Gbit/s: measured {measured * 8 / 1e9:.3f} Gbit/s")
        assert 0.8 * rate < measured < 1.05 * rate


def test_labs_under_other_run_dirs_get_other_subnets(make_lab, run_dir, monkeypatch):
    first = make_lab(1)
    monkeypatch.setenv("KVMOTION_RUN", str(run_dir.parent / "elsewhere"))  # e.g. another developer's
    try:
        second = lab.lab_up(_name(), 1)
        try:
            assert second.mgmt_subnet != first.mgmt_subnet
        finally:
            lab.lab_down(second.name)
    finally:
        monkeypatch.setenv("KVMOTION_RUN", str(run_dir))


def test_a_machine_sees_no_other_machines_files(make_lab, tmp_path):
    """spawn_in_ns(hide=...): the lab's machines share network addresses, not files; the center
    reaches the lab's mgmt subnet from its own namespace."""
    topo = make_lab(hosts=2)
    a, b = (tmp_path / "host-a", tmp_path / "host-b")
    for root in (a, b):
        root.mkdir()
        (root / "secret").write_text(root.name)
    script = ("import os, sys; print(sorted(os.listdir(sys.argv[1])), sorted(os.listdir(sys.argv[2])), flush=True);"
              " open(sys.argv[2] + '/x', 'w')")
    proc = lab.spawn_in_ns(topo.hosts[0].ns, [sys.executable, "-c", script, str(a), str(b)], tmp_path / "out.log",
                           hide=[b])
    assert proc.wait(timeout=30) != 0  # the write into the other machine's folder failed
    out = (tmp_path / "out.log").read_text()
    assert out.startswith("['secret'] []\n") and "Read-only file system" in out, out
    assert sorted(p.name for p in b.iterdir()) == ["secret"]  # nothing written below the cover
    assert b.name in (b / "secret").read_text()  # and the folder itself untouched for everyone else

    with pytest.raises(NotFound, match="cannot hide"):
        lab.spawn_in_ns(topo.hosts[0].ns, ["true"], tmp_path / "out.log", hide=[tmp_path / "missing"])

    echo = _start(topo.center.ns, UDP_ECHO, 7002)
    try:
        assert netns.run_in_ns(topo.hosts[1].ns, _udp_roundtrip, topo.center.ip, 7002) == b"ping"
    finally:
        echo.kill()
        echo.wait()
