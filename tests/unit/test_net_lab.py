"""Pure lab planning: names, subnets and the JSON description."""

import ipaddress
import json

import pytest

from kvmotion.core.errors import InvalidInput, NotFound
from kvmotion.net.lab import LabTopology, plan_lab


def test_plan_names_and_addresses():
    topo = plan_lab("dc1", 0, hosts=3, link_rate=125_000_000)
    assert [h.name for h in topo.hosts] == ["host-a", "host-b", "host-c"]
    assert all(ns.startswith("kvl-dc1-") for ns in topo.namespaces())
    assert len(set(topo.namespaces())) == 7  # switch, 3 hosts, datastore, center, client
    mgmt = ipaddress.ip_network(topo.mgmt_subnet)
    vm = ipaddress.ip_network(topo.vm_subnet)
    mgmt_ips = [topo.root_ip, topo.datastore.ip, topo.center.ip, *(h.mgmt_ip for h in topo.hosts)]
    assert len(set(mgmt_ips)) == len(mgmt_ips)
    assert all(ipaddress.ip_address(ip) in mgmt for ip in mgmt_ips)
    assert ipaddress.ip_address(topo.client.ip) in vm
    assert ipaddress.ip_address(topo.vm_ip(0)) in vm and topo.vm_ip(0) != topo.client.ip
    assert not mgmt.overlaps(vm)
    names = [topo.root_if, *(p for h in topo.hosts for p in (h.switch_mgmt_port, h.switch_vm_port))]
    assert all(len(n) <= 15 for n in names)
    assert topo.host("b") == topo.host("host-b") == topo.hosts[1]
    with pytest.raises(NotFound):
        topo.host("host-z")


def test_two_labs_have_disjoint_subnets_and_names():
    a, b = plan_lab("one", 0), plan_lab("two", 1)
    nets = [ipaddress.ip_network(n) for n in (a.mgmt_subnet, a.vm_subnet, b.mgmt_subnet, b.vm_subnet)]
    assert all(not x.overlaps(y) for i, x in enumerate(nets) for y in nets[i + 1 :])
    assert not set(a.namespaces()) & set(b.namespaces())
    assert a.root_if != b.root_if


def test_json_roundtrip():
    topo = plan_lab("dc1", 5, hosts=2, link_rate=None)
    assert LabTopology.from_json(topo.to_json()) == topo
    limited = plan_lab("dc1", 5, hosts=2, host_cpu=0.5)
    assert limited.host_cpu == 0.5
    assert LabTopology.from_json(limited.to_json()) == limited


def test_a_description_from_before_host_cpu_loads_unlimited():
    raw = json.loads(plan_lab("dc1", 5, hosts=2).to_json())
    del raw["host_cpu"]
    assert LabTopology.from_json(json.dumps(raw)).host_cpu is None


@pytest.mark.parametrize("cores", [0, -1, 0.005, float("nan"), 5000])
def test_bad_host_cpu(cores):
    with pytest.raises(InvalidInput, match="CPU capacity"):
        plan_lab("dc1", 0, host_cpu=cores)


@pytest.mark.parametrize("name", ["", "UP", "a-b", "x" * 11, "a b"])
def test_bad_lab_names(name):
    with pytest.raises(InvalidInput):
        plan_lab(name, 0)


@pytest.mark.parametrize("hosts,index", [(0, 0), (27, 0), (3, 128), (3, -1)])
def test_bad_sizes(hosts, index):
    with pytest.raises(InvalidInput):
        plan_lab("dc1", index, hosts=hosts)
