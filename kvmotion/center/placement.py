"""Placement as a pure decision: which host a VM goes to, from a snapshot of the hosts.

Ganeti style: every host considered gets every reason it was refused for (not just the first), and
an eligible host a score; the least loaded eligible host wins (ties: by name, so the choice is
stable). The score is the host's memory use and CPU demand after the VM arrives, each as a fraction
of the host's capacity, weighted equally; CPU demand is what its VMs kept busy as its agent measured
it (the sum of their figures in its last full report), the VM's own demand estimated as half its
vCPUs (it has no history there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kvmotion.api.center import Candidate, HostFacts, HostLoad, HostMode, HostState, Placement
from kvmotion.api.spec import VmSpec


class Status(str, Enum):
    """A host as the planners see it: whether it answers, its mode and its health in one."""

    CONNECTED = "connected"
    NOT_RESPONDING = "not_responding"
    ENTERING_MAINTENANCE = "entering_maintenance"
    MAINTENANCE = "maintenance"
    QUARANTINE = "quarantine"  # a moderate health fault: placed on last; planners move nothing there


def status_of(state: HostState, mode: HostMode, quarantined: bool) -> Status:
    if state is not HostState.CONNECTED:
        return Status.NOT_RESPONDING
    if mode is HostMode.MAINTENANCE:
        return Status.MAINTENANCE
    if mode is HostMode.ENTERING_MAINTENANCE:
        return Status.ENTERING_MAINTENANCE
    return Status.QUARANTINE if quarantined else Status.CONNECTED


QUARANTINE_PENALTY = 100.0  # added to a quarantined host's score: chosen only when no other host can take it


@dataclass(frozen=True)
class HostSnapshot:
    """What placement knows of one host."""

    name: str
    state: HostState
    load: HostLoad | None = None
    facts: HostFacts | None = None
    cpu_demand: float | None = None  # cores busy, as the host's agent measured them
    reserved_memory: int = 0  # bytes promised to VMs on their way there (queued or running tasks)
    reserved_cpus: float = 0.0
    mode: HostMode = HostMode.NORMAL
    quarantined: bool = False

    @property
    def status(self) -> Status:
        return status_of(self.state, self.mode, self.quarantined)


def refusals(spec: VmSpec, host: HostSnapshot, source: str | None, baseline: str | None,
             migrating: bool) -> list[str]:
    """Every reason `host` cannot take `spec` (empty: it can)."""
    if host.name == source:
        return [f"VM {spec.name} is already on {host.name}"]
    out: list[str] = []
    # Quarantine is soft for placement (vSphere's Proactive HA): a quarantined host scores last
    # (QUARANTINE_PENALTY) but takes the VM when no healthy host can.
    refused = state_refusal(host.name, host.status) if host.status is not Status.QUARANTINE else None
    if refused:
        out.append(refused)
    if host.load is None:
        out.append(f"{host.name} has not reported its load yet")
    else:
        free = host.load.memory_available - host.reserved_memory
        if free < spec.memory:
            out.append(f"{host.name} has {max(free, 0) >> 20} MiB free, the VM needs {spec.memory >> 20} MiB")
    return out + fact_refusals(spec, host.name, host.facts, source, baseline, migrating)


def state_refusal(name: str, status: Status) -> str | None:
    """Why a host takes no VM (None: connected, it does); the planners refuse quarantine too."""
    if status is Status.CONNECTED:
        return None
    if status is Status.MAINTENANCE:
        return f"{name} is in maintenance"
    if status is Status.QUARANTINE:
        return f"{name} is quarantined (a health fault)"
    return f"{name} is {status.value.replace('_', ' ')}"


def fact_refusals(spec: VmSpec, name: str, facts: HostFacts | None, source: str | None, baseline: str | None,
                  migrating: bool) -> list[str]:
    """Why host `name` can never run `spec`, whatever its load: CPU models, port groups, datastores, local disks."""
    out: list[str] = []
    if facts is None:
        return [f"{name}'s CPU models, port groups and datastores are not known yet"]
    models = set(facts.cpu_models)
    for model, why in ((spec.cpu_model, "the VM's CPU model"), (baseline, "the cluster's CPU baseline")):
        if model is not None and model not in models:
            out.append(f"{name} cannot run CPU model {model} ({why})")
    lacking_pg = sorted({n.portgroup for n in spec.nics} - set(facts.portgroups))
    if lacking_pg:
        out.append(f"{name} lacks port group {', '.join(lacking_pg)}")
    lacking_ds = sorted({d.datastore for d in spec.disks if d.datastore} - set(facts.datastores))
    if lacking_ds:
        out.append(f"{name} does not reach datastore {', '.join(lacking_ds)}")
    if migrating:
        local = [d.source for d in spec.disks if d.datastore is None]
        if local:
            out.append(f"disk {', '.join(local)} is local to {source}: a migration needs every disk on a datastore")
    return out


def score(spec: VmSpec, host: HostSnapshot) -> float:
    """The host's load with the VM on it: memory used + CPU demand, each a fraction of capacity."""
    if host.load is None:
        return float("inf")
    total = max(host.load.memory_total, 1)
    used = host.load.memory_total - host.load.memory_available + host.reserved_memory + spec.memory
    cpus = host.load.cpu_capacity or max(host.load.cpus, 1)  # a limited host's cores, when its agent reports them
    demand = (host.cpu_demand or 0.0) + host.reserved_cpus + spec.vcpus * 0.5  # a new VM: half its vCPUs busy
    penalty = QUARANTINE_PENALTY if host.status is Status.QUARANTINE else 0.0
    return round(used / total + demand / cpus + penalty, 6)


def place(spec: VmSpec, hosts: Sequence[HostSnapshot], *, source: str | None = None,
          baseline: str | None = None) -> Placement:
    """The least loaded host that can take `spec` (None if none can), with every host's reasons.
    `source`: the VM's current host when it migrates (never chosen; local disks refuse every host)."""
    migrating = source is not None
    candidates = []
    for host in sorted(hosts, key=lambda h: h.name):
        reasons = refusals(spec, host, source, baseline, migrating)
        candidates.append(Candidate(host=host.name, reasons=tuple(reasons),
                                    score=None if reasons else score(spec, host)))
    eligible = [c for c in candidates if c.eligible]
    chosen = min(eligible, key=lambda c: (c.score, c.host)).host if eligible else None
    return Placement(chosen=chosen, candidates=tuple(candidates))


def summary(placement: Placement) -> str:
    """One line: the choice, or why every host was refused."""
    if placement.chosen is not None:
        return f"placed on {placement.chosen}"
    if not placement.candidates:
        return "no host has joined the cluster"
    reasons = dict.fromkeys(r for c in placement.candidates for r in c.reasons)  # each once, in order
    return "no host can take it: " + "; ".join(reasons)
