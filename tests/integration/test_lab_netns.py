"""kvmotion.net.netns against the real kernel: namespaces, veths, a bridge's FDB, processes."""

import os
import subprocess
import sys
import uuid

import pytest

from kvmotion.core.errors import Conflict, NotFound
from kvmotion.net import links, netns

pytestmark = pytest.mark.lab

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""


@pytest.fixture
def three_ns():
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
    names = [f"kvtn-sw{tag}", f"kvtn-a{tag}", f"kvtn-b{tag}"]
    for ns in names:
        netns.create_ns(ns)
    try:
        yield names
    finally:
        for ns in names:
            netns.kill_ns_processes(ns)
            netns.delete_ns(ns)
    assert not any(netns.ns_exists(ns) for ns in names)


def _udp_roundtrip(addr: str, port: int) -> bytes:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    s.sendto(b"hello", (addr, port))
    return s.recvfrom(2048)[0]


def _raise_not_found():
    raise NotFound("from inside")


def test_run_in_ns_returns_and_raises(three_ns):
    sw = three_ns[0]
    assert netns.run_in_ns(sw, os.getpid) != os.getpid()
    with pytest.raises(NotFound, match="from inside"):
        netns.run_in_ns(sw, _raise_not_found)
    with pytest.raises(NotFound):
        netns.run_in_ns("kvtn-no-such-ns", os.getpid)
    with pytest.raises(Conflict):
        netns.create_ns(sw)


def test_veth_bridge_path_fdb_and_process_cleanup(three_ns):
    sw, a, b = three_ns
    netns.run_in_ns(sw, links.ensure_bridge, "br0")
    netns.create_veth("eth0", a, "pa", sw)
    netns.create_veth("eth0", b, "pb", sw)
    netns.run_in_ns(sw, links.enslave, "pa", "br0")
    netns.run_in_ns(sw, links.enslave, "pb", "br0")
    netns.add_address(a, "eth0", "10.254.77.1/24")
    netns.add_address(b, "eth0", "10.254.77.2/24")
    assert netns.link_exists_in(a, "eth0") and not netns.link_exists_in(None, "pa")

    echo = netns.popen_in_ns(
        b, [sys.executable, "-c", ECHO, "10.254.77.2", "7000"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert echo.stdout.readline().strip() == "ready"
        assert netns.run_in_ns(a, _udp_roundtrip, "10.254.77.2", 7000) == b"hello"
        mac_a = netns.link_mac(a, "eth0")
        entry = netns.fdb_entry(sw, "br0", mac_a)
        assert entry is not None and entry.port == "pa" and not entry.static
        assert entry.updated_s_ago is not None and entry.updated_s_ago < 5
        assert netns.fdb_port(sw, "br0", netns.link_mac(b, "eth0")) == "pb"
        assert netns.fdb_port(sw, "br0", "52:54:00:00:00:99") is None
        assert echo.pid in netns.pids_in_ns(b)
        killed = netns.kill_ns_processes(b)
        assert echo.pid in killed
        assert echo.wait(timeout=5) is not None
    finally:
        echo.kill()
        echo.wait()


def test_shape_and_unshape(three_ns):
    a = three_ns[1]
    netns.create_veth("v0", a, "v1", a)
    assert netns.shaping(a, "v0") is None
    params = netns.shape(a, "v0", 125_000_000)
    assert netns.shaping(a, "v0") == 125_000_000 == params.rate
    netns.shape(a, "v0", 1_250_000_000)  # replaces
    assert netns.shaping(a, "v0") == 1_250_000_000
    netns.unshape(a, "v0")
    netns.unshape(a, "v0")
    assert netns.shaping(a, "v0") is None


def test_egress_link_takes_the_slower_of_nic_and_shaping(three_ns):
    a, b = three_ns[1], three_ns[2]
    netns.create_veth("up0", a, "up1", b)
    netns.add_address(a, "up0", "10.254.78.1/24")
    netns.add_address(b, "up1", "10.254.78.2/24")
    link = netns.run_in_ns(a, netns.egress_link, "10.254.78.2")
    # a veth reports 10 Gbit/s to ethtool; nothing shapes it yet
    assert link == netns.EgressLink(ifname="up0", nic_rate=1_250_000_000, shaped_rate=None)
    assert link.rate == 1_250_000_000
    netns.shape(a, "up0", 125_000_000)
    link = netns.run_in_ns(a, netns.egress_link, "10.254.78.2")
    assert link.shaped_rate == 125_000_000 and link.rate == 125_000_000
    # an address of the namespace itself goes over lo, which has no speed: unknown
    assert netns.run_in_ns(a, netns.egress_link, "10.254.78.1").rate is None
    with pytest.raises(NotFound, match=r"no route to 192.0.2.1"):
        netns.run_in_ns(a, netns.egress_link, "192.0.2.1")
