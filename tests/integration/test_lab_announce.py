"""A RARP like QEMU's re-teaches the lab's switch where a "migrated" MAC lives."""

import os
import uuid

import pytest

from kvmotion.net import announce, lab, links, netns
from kvmotion.net.announce import AnnounceKind

pytestmark = pytest.mark.lab

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

MAC = "52:54:00:ab:cd:01"


@pytest.fixture
def topo(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMOTION_RUN", str(tmp_path / "run"))
    t = lab.lab_up(f"a{os.getpid() % 10000}{uuid.uuid4().hex[:3]}", 2)
    try:
        yield t
    finally:
        lab.lab_down(t.name)


def _guest_on(topo, host, tag):
    """A namespace standing in for a guest: a veth into the host's port-group bridge, with MAC."""
    ns = f"kvl-{topo.name}-{tag}"  # lab prefix: lab down removes it
    netns.create_ns(ns)
    netns.create_veth("eth0", ns, tag, host.ns, up=False)
    with netns.ns_iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], address=MAC, state="up")
    netns.run_in_ns(host.ns, links.enslave, tag, host.vm_bridge)
    netns.add_address(ns, "eth0", f"{topo.vm_ip(0)}/{topo.vm_prefix}")
    return ns


def test_rarp_moves_the_fdb_entry(topo):
    a, b = topo.hosts
    _guest_on(topo, a, "ga")
    announce.send_frame("eth0", announce.build_garp(MAC, topo.vm_ip(0)), ns=f"kvl-{topo.name}-ga")
    assert netns.fdb_port(topo.switch_ns, topo.switch_bridge, MAC) == a.switch_vm_port

    # "migrate": the source side goes away, the destination announces
    netns.delete_ns(f"kvl-{topo.name}-ga")
    dest = _guest_on(topo, b, "gb")
    with announce.AnnounceListener(b.switch_vm_port, ns=topo.switch_ns) as on_switch:
        announce.send_frame("eth0", announce.build_rarp(MAC), ns=dest)
        seen = on_switch.wait_for(1, timeout=2.0)
    rarps = [s for s in seen if s.announcement.kind is AnnounceKind.RARP and not s.outgoing]
    assert rarps and rarps[0].announcement.src_mac == MAC and rarps[0].ifname == b.switch_vm_port
    entry = netns.fdb_entry(topo.switch_ns, topo.switch_bridge, MAC)
    assert entry is not None and entry.port == b.switch_vm_port and entry.updated_s_ago < 2
    assert netns.fdb_port(b.ns, b.vm_bridge, MAC) == "gb"
