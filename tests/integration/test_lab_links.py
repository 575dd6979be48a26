"""kvmotion.net.links against the real kernel, inside a throwaway namespace."""

import os

import pytest

from kvmotion.core.errors import Conflict, NotFound
from kvmotion.net import links, netns
from tests.namespaces import throwaway_namespace

pytestmark = pytest.mark.lab

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)


@pytest.fixture
def ns():
    with throwaway_namespace("kvtl") as name:
        yield name


def _bridge_and_tap_state(bridge: str, tap: str):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        br = ipr.get_links(ipr.link_lookup(ifname=bridge)[0])[0]
        tp = ipr.get_links(ipr.link_lookup(ifname=tap)[0])[0]
        brdata = dict(br.get(("linkinfo", "data"))["attrs"])
        tapdata = dict(tp.get(("linkinfo", "data"))["attrs"])
        brport = next(p for p in ipr.brport("dump") if p["index"] == tp["index"])
        port = dict(brport.get("IFLA_PROTINFO")["attrs"])
        return {
            "br_up": br.get("flags") & 1,
            "stp": brdata["IFLA_BR_STP_STATE"],
            "fwd_delay": brdata["IFLA_BR_FORWARD_DELAY"],
            "tap_up": tp.get("flags") & 1,
            "tap_type": tapdata["IFLA_TUN_TYPE"],
            "persist": tapdata["IFLA_TUN_PERSIST"],
            "mq": tapdata["IFLA_TUN_MULTI_QUEUE"],
            "vnet_hdr": tapdata["IFLA_TUN_VNET_HDR"],
            "master": links.master_of(tap),
            "learning": port.get("IFLA_BRPORT_LEARNING"),
            "arp_ignore": open(f"/proc/sys/net/ipv4/conf/{bridge}/arp_ignore").read().strip(),
        }


def _scenario():
    tap = links.tap_name("web1", 0)
    links.ensure_bridge("br-vm")
    links.ensure_bridge("br-vm")  # idempotent
    links.create_tap(tap, "br-vm")
    links.create_tap(tap, "br-vm")  # idempotent
    state = _bridge_and_tap_state("br-vm", tap)
    links.delete_tap(tap)
    links.delete_tap(tap)  # absent: no error
    gone = not links.link_exists(tap)
    return state, gone


def test_bridge_and_tap_lifecycle(ns):
    state, gone = netns.run_in_ns(ns, _scenario)
    assert state == {
        "br_up": 1,
        "stp": 0,
        "fwd_delay": 0,
        "tap_up": 1,
        "tap_type": 2,  # TAP, not TUN
        "persist": 1,
        "mq": 0,
        "vnet_hdr": 1,
        "master": "br-vm",
        "learning": 1,
        "arp_ignore": "8",  # L2 only: never answers ARP for the host's addresses
    }
    assert gone


def test_tap_needs_existing_bridge(ns):
    with pytest.raises(NotFound):
        netns.run_in_ns(ns, links.create_tap, "kvtapx", "br-missing")


def _bridge_over_tap():
    links.ensure_bridge("br-a")
    links.create_tap("kvtapy", "br-a")
    links.ensure_bridge("kvtapy")


def test_bridge_name_clash_is_a_conflict(ns):
    with pytest.raises(Conflict):
        netns.run_in_ns(ns, _bridge_over_tap)


def test_nothing_created_outside_the_namespace(ns):
    netns.run_in_ns(ns, _scenario)
    assert not links.link_exists("br-vm")
