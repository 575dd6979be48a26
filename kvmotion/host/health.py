"""The agent's built-in health providers, from real signals, as pure functions of samples.

- cpu: sustained CPU contention of the host's VMs. Over the last `window` seconds (60), the time their
  vCPU threads waited on a run queue (schedstat's wait: vSphere's "ready") against the time they
  ran: moderate when they waited `contention` (50 %) of their run time or more, with at least
  `min_busy` cores busy (an idle host is not contended). Moderate only: the host works, slowly.
- memory: pressure stall information (/proc/pressure/memory, avg10): moderate when some task was
  stalled on memory 10 % of the time or more, severe when all were ("full") 10 % or more.
- net.PORTGROUP: the VM network's link: severe when the port group's bridge has uplinks (ports
  other than the VMs' TAPs) and none of them is up, or the bridge is set down while they are (the
  host's VMs are cut off: evacuate them). A bridge with no uplink (a host-only network) has no link
  to lose.

`HealthSampler` is the thin I/O shell: it reads /proc, and the bridges through netlink in the
agent's own network namespace (kvmotion.net.links.read_bridge), and keeps the window of samples.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.center import AGENT_PROVIDER as PROVIDER
from kvmotion.api.center import HealthReport, Severity
from kvmotion.net.links import TAP_KIND, Bridge, read_bridge

NS = 1_000_000_000
_PSI_RE = re.compile(r"^(some|full) avg10=(\d+(?:\.\d+)?)", re.MULTILINE)


@dataclass(frozen=True)
class Thresholds:
    window: float = 60.0  # seconds a CPU contention must last
    contention: float = 0.5  # waited / ran
    min_busy: float = 0.2  # cores the VMs kept busy over the window, at least
    psi_moderate: float = 10.0  # % of time some task stalled on memory (avg10)
    psi_severe: float = 10.0  # % of time all tasks stalled on memory (avg10, "full")


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    run_ns: int  # the VMs' vCPU threads: cumulative run time (sum over running VMs)
    wait_ns: int  # and run-queue wait
    vms: frozenset[str]  # which VMs the sums cover (a VM that started or left breaks the comparison)


@dataclass(frozen=True)
class Psi:
    some: float
    full: float


def parse_psi(text: str) -> Psi | None:
    found = dict((kind, float(value)) for kind, value in _PSI_RE.findall(text))
    if "some" not in found:
        return None
    return Psi(some=found["some"], full=found.get("full", 0.0))


def cpu_health(samples: Sequence[Sample], t: Thresholds = Thresholds()) -> HealthReport:
    """From the samples (oldest first) of the last window or more."""
    ok = HealthReport(provider=PROVIDER, component="cpu", severity=Severity.OK)
    if len(samples) < 2:
        return ok
    last = samples[-1]
    first = next((s for s in reversed(samples[:-1]) if last.at - s.at >= t.window), None)
    if first is None:
        return ok  # not a whole window yet
    common = first.vms & last.vms
    if not common or first.vms != last.vms:
        # VMs came or went within the window: only a window with the same VMs counts
        return ok
    span = last.at - first.at
    ran = (last.run_ns - first.run_ns) / NS
    waited = (last.wait_ns - first.wait_ns) / NS
    if ran / span < t.min_busy or ran <= 0:
        return ok
    ratio = waited / ran
    if ratio < t.contention:
        return ok
    return HealthReport(provider=PROVIDER, component="cpu", severity=Severity.MODERATE,
                        reason=f"VMs waited {ratio:.0%} of their run time for a CPU over {span:.0f} s "
                               f"({waited / span:.2f} cores' worth)")


def memory_health(psi: Psi | None, t: Thresholds = Thresholds()) -> HealthReport:
    if psi is None:
        return HealthReport(provider=PROVIDER, component="memory", severity=Severity.OK)
    if psi.full >= t.psi_severe:
        return HealthReport(provider=PROVIDER, component="memory", severity=Severity.SEVERE,
                            reason=f"all tasks stalled on memory {psi.full:.0f} % of the last 10 s")
    if psi.some >= t.psi_moderate:
        return HealthReport(provider=PROVIDER, component="memory", severity=Severity.MODERATE,
                            reason=f"tasks stalled on memory {psi.some:.0f} % of the last 10 s")
    return HealthReport(provider=PROVIDER, component="memory", severity=Severity.OK)


def link_health(portgroup: str, bridge_name: str, bridge: Bridge | None) -> HealthReport:
    component = f"net.{portgroup}"[:32]
    ok = HealthReport(provider=PROVIDER, component=component, severity=Severity.OK)
    if bridge is None:
        return ok  # not made yet (the agent makes it for its first VM): nothing is lost
    # Uplinks: every port but the VMs' TAPs (told by their link kind, whatever their names).
    uplinks = {p: port.up for p, port in bridge.ports.items() if port.kind != TAP_KIND}
    if uplinks and (not bridge.up or not any(uplinks.values())):
        down = ", ".join(sorted(p for p, up in uplinks.items() if not up)) or bridge_name
        return HealthReport(provider=PROVIDER, component=component, severity=Severity.SEVERE,
                            reason=f"port group {portgroup} lost its link ({down} down)")
    return ok


# ---- the I/O shell ----
def read_psi(path: Path = Path("/proc/pressure/memory")) -> Psi | None:
    try:
        return parse_psi(path.read_text())
    except OSError:
        return None  # a kernel without PSI: no signal, not a fault


class HealthSampler:
    """Keeps the window of CPU samples; `reports` gives every built-in provider's word now."""

    def __init__(self, portgroups: Callable[[], Mapping[str, str]], thresholds: Thresholds = Thresholds(),
                 psi: Callable[[], Psi | None] = read_psi, bridge: Callable[[str], Bridge | None] = read_bridge) -> None:
        self.portgroups = portgroups  # port group -> bridge
        self.thresholds = thresholds
        self.psi = psi
        self.bridge = bridge
        self.samples: deque[Sample] = deque()

    def add(self, at: float, per_vm: Iterable[tuple[str, int, int]]) -> None:
        """One sample: (VM, cumulative run ns, cumulative wait ns) of each running VM."""
        rows = list(per_vm)
        self.samples.append(Sample(at=at, run_ns=sum(r[1] for r in rows), wait_ns=sum(r[2] for r in rows),
                                   vms=frozenset(r[0] for r in rows)))
        while len(self.samples) > 2 and at - self.samples[1].at >= self.thresholds.window:
            self.samples.popleft()

    def reports(self) -> tuple[HealthReport, ...]:
        """Blocking reads of /proc and netlink: run in a worker thread."""
        out = [cpu_health(list(self.samples), self.thresholds), memory_health(self.psi(), self.thresholds)]
        for portgroup, bridge in sorted(self.portgroups().items()):
            out.append(link_health(portgroup, bridge, self.bridge(bridge)))
        return tuple(out)
