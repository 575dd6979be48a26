"""The agent's built-in health providers: CPU contention over a window, memory pressure, a port
group's link; and the sampler's window."""

from __future__ import annotations

import secrets

import pytest
from pyroute2 import IPRoute

from kvmotion.api.center import Severity
from kvmotion.host.health import (
    NS,
    HealthSampler,
    Psi,
    Sample,
    Thresholds,
    cpu_health,
    link_health,
    memory_health,
    parse_psi,
)
from kvmotion.net import links, netns
from kvmotion.net.links import TAP_KIND, Bridge, Port, read_bridge
from tests.namespaces import throwaway_namespace

VMS = frozenset({"a", "b"})


def samples(ran_per_s: float, waited_per_s: float, seconds: int = 40, step: int = 2, vms=VMS) -> list[Sample]:
    return [Sample(at=float(t), run_ns=int(ran_per_s * t * NS), wait_ns=int(waited_per_s * t * NS), vms=vms)
            for t in range(0, seconds + 1, step)]


def test_cpu_contention_must_last_a_window_and_be_large_enough() -> None:
    assert cpu_health(samples(1.5, 1.2, seconds=70)).severity is Severity.MODERATE  # waited 80 % of their run time
    report = cpu_health(samples(1.5, 1.2, seconds=70))
    assert report.component == "cpu" and "waited 80% of their run time" in report.reason
    assert cpu_health(samples(1.5, 0.6, seconds=70)).severity is Severity.OK  # 40 %: under 50 %
    assert cpu_health(samples(1.5, 1.2, seconds=40)).severity is Severity.OK  # not a whole window yet
    assert cpu_health(samples(0.1, 0.1)).severity is Severity.OK  # idle VMs waiting a little: no contention
    assert cpu_health([]).severity is Severity.OK


def test_cpu_window_with_vms_coming_or_going_does_not_count() -> None:
    mixed = [*samples(1.5, 1.2, seconds=70)[:-1],
             Sample(at=70.0, run_ns=int(105 * NS), wait_ns=int(84 * NS), vms=frozenset({"a"}))]
    assert cpu_health(mixed).severity is Severity.OK


def test_memory_pressure() -> None:
    text = "some avg10=12.50 avg60=3.00 avg300=1.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    assert parse_psi(text) == Psi(some=12.5, full=0.0)
    assert parse_psi("garbage") is None
    assert memory_health(Psi(12.5, 0.0)).severity is Severity.MODERATE
    assert memory_health(Psi(40.0, 15.0)).severity is Severity.SEVERE
    assert memory_health(Psi(1.0, 0.0)).severity is Severity.OK
    assert memory_health(None).severity is Severity.OK


UP, DOWN, TAP_UP = Port(up=True, kind="veth"), Port(up=False, kind=None), Port(up=True, kind=TAP_KIND)


def test_link_lost() -> None:
    assert link_health("vm-net", "br0", Bridge(up=True, ports={"eth1": UP, "kv0n0": TAP_UP})).severity is Severity.OK
    lost = link_health("vm-net", "br0", Bridge(up=True, ports={"eth1": DOWN, "kv0n0": TAP_UP}))
    assert lost.severity is Severity.SEVERE and lost.reason == "port group vm-net lost its link (eth1 down)"
    one_left = Bridge(up=True, ports={"eth1": DOWN, "eth2": UP})  # a bond's worth: one uplink is enough
    assert link_health("vm-net", "br0", one_left).severity is Severity.OK
    set_down = link_health("vm-net", "br0", Bridge(up=False, ports={"eth1": UP}))
    assert set_down.severity is Severity.SEVERE and set_down.reason == "port group vm-net lost its link (br0 down)"
    # No uplink to lose: a host-only bridge, one with only the VMs' TAPs (whatever their names, up or
    # not), one not made yet.
    assert link_health("vm-net", "br0", Bridge(up=False, ports={})).severity is Severity.OK
    only_taps = Bridge(up=True, ports={"eth9": Port(up=False, kind=TAP_KIND), "tap0": TAP_UP})
    assert link_health("vm-net", "br0", only_taps).severity is Severity.OK
    assert link_health("vm-net", "br0", None).severity is Severity.OK


@pytest.fixture
def namespace():
    with throwaway_namespace("kvt-health-") as ns:
        yield ns


def test_read_bridge_through_netlink_in_the_callers_namespace(namespace: str) -> None:
    """A bridge with a veth uplink (its peer in the same namespace) and a TAP, read from inside the
    namespace (a forked child that entered it, as the agent lives in a lab host's)."""
    tag = secrets.token_hex(3)
    br, up, peer, tap = f"kvb{tag}", f"kvu{tag}", f"kvp{tag}", f"kvt{tag}"
    netns.run_in_ns(namespace, links.ensure_bridge, br)
    netns.create_veth(up, namespace, peer, namespace)
    netns.run_in_ns(namespace, links.enslave, up, br)
    netns.run_in_ns(namespace, links.create_tap, tap, br)  # no VM attached: no carrier

    def health() -> tuple[Bridge | None, Severity]:
        bridge = netns.run_in_ns(namespace, read_bridge, br)
        return bridge, link_health("vm-net", br, bridge).severity

    bridge, severity = health()
    assert bridge == Bridge(up=True, ports={up: Port(up=True, kind="veth"), tap: Port(up=False, kind=TAP_KIND)})
    assert severity is Severity.OK
    assert read_bridge(br) is None  # this namespace has no such bridge: the reader looks where it runs
    netns.run_in_ns(namespace, _set, peer, "down")  # the far end goes: the uplink loses its carrier
    bridge, severity = health()
    assert bridge is not None and bridge.ports[up] == Port(up=False, kind="veth") and severity is Severity.SEVERE
    netns.run_in_ns(namespace, _set, peer, "up")
    netns.run_in_ns(namespace, _set, br, "down")  # the bridge set down: its VMs are cut off as well
    bridge, severity = health()
    assert bridge is not None and not bridge.up and bridge.ports[up].up and severity is Severity.SEVERE
    assert netns.run_in_ns(namespace, read_bridge, up) is None  # not a bridge
    assert netns.run_in_ns(namespace, read_bridge, f"kvn{tag}") is None  # no such link


def _set(name: str, state: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state=state)


def test_sampler_keeps_a_window_and_reports_every_provider() -> None:
    sampler = HealthSampler(lambda: {"vm-net": "br0"}, Thresholds(window=10),
                            psi=lambda: Psi(0.0, 0.0), bridge=lambda _b: Bridge(up=True, ports={"eth1": UP}))
    for t in range(0, 61, 2):
        sampler.add(float(t), [("a", int(t * NS), int(t * NS))])  # waits as long as it runs
    assert sampler.samples[-1].at - sampler.samples[0].at < 14  # the window, not the whole history
    reports = {r.component: r.severity for r in sampler.reports()}
    assert reports == {"cpu": Severity.MODERATE, "memory": Severity.OK, "net.vm-net": Severity.OK}
