"""The agent's built-in health providers: CPU contention over a window, memory pressure, a port
group's link; and the sampler's window."""

from __future__ import annotations

from pathlib import Path

from kvmotion.api.center import Severity
from kvmotion.host.health import (
    NS,
    Bridge,
    HealthSampler,
    Psi,
    Sample,
    Thresholds,
    cpu_health,
    link_health,
    memory_health,
    parse_psi,
    read_bridge,
)

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


def test_link_lost() -> None:
    assert link_health("vm-net", "br0", Bridge(up=True, ports={"eth1": True, "tap3": True})).severity is Severity.OK
    lost = link_health("vm-net", "br0", Bridge(up=True, ports={"eth1": False, "tap3": True}))
    assert lost.severity is Severity.SEVERE and lost.reason == "port group vm-net lost its link (eth1 down)"
    assert link_health("vm-net", "br0", Bridge(up=False, ports={"eth1": True})).severity is Severity.SEVERE
    # No uplink to lose: a host-only bridge, one with only the VMs' TAPs, one not made yet.
    assert link_health("vm-net", "br0", Bridge(up=False, ports={})).severity is Severity.OK
    assert link_health("vm-net", "br0", Bridge(up=True, ports={"tap0": True})).severity is Severity.OK
    assert link_health("vm-net", "br0", None).severity is Severity.OK


def test_read_bridge_from_a_sysfs_tree(tmp_path: Path) -> None:
    for name, state in (("br0", "up"), ("eth1", "down"), ("tap0", "up")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "operstate").write_text(state + "\n")
    (tmp_path / "br0" / "brif").mkdir()
    for port in ("eth1", "tap0"):
        (tmp_path / "br0" / "brif" / port).mkdir()
    assert read_bridge("br0", tmp_path) == Bridge(up=True, ports={"eth1": False, "tap0": True})
    assert read_bridge("nope", tmp_path) is None


def test_sampler_keeps_a_window_and_reports_every_provider() -> None:
    sampler = HealthSampler(lambda: {"vm-net": "br0"}, Thresholds(window=10),
                            psi=lambda: Psi(0.0, 0.0), bridge=lambda _b: Bridge(up=True, ports={"eth1": True}))
    for t in range(0, 61, 2):
        sampler.add(float(t), [("a", int(t * NS), int(t * NS))])  # waits as long as it runs
    assert sampler.samples[-1].at - sampler.samples[0].at < 14  # the window, not the whole history
    reports = {r.component: r.severity for r in sampler.reports()}
    assert reports == {"cpu": Severity.MODERATE, "memory": Severity.OK, "net.vm-net": Severity.OK}
