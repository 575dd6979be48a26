"""Maintenance mode as pure plans: evacuate a host (each VM -> destination, why, in order, with its
predicted time and downtime; what cannot move and why), and move the VMs back when it returns.

Destinations keep the cluster balanced: the biggest units (by memory) go first, each onto the host
with the least load after it arrives among those that can take it, so later, smaller VMs fill in
around them. Should rules are kept where any host allows it, and broken (said in the plan's notes)
only when nothing else fits; must rules never are. Powered-off VMs are re-homed, preferably where
they would fit when started.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from kvmotion.api.center import Candidate
from kvmotion.center.cluster import (
    EVEN,
    Layout,
    MigrationCost,
    Move,
    MoveKind,
    Plan,
    Snapshot,
    Stuck,
    Weights,
    default_cost,
    mib,
    summarize,
)
from kvmotion.center.placement import Status
from kvmotion.center.rules import refusals, units
from kvmotion.core.errors import NotFound

STAY_AWAY = (Status.MAINTENANCE, Status.ENTERING_MAINTENANCE)


def _host(snapshot: Snapshot, host: str) -> None:
    if host not in snapshot.host:
        raise NotFound(f"no host named {host} in the cluster")


def order(layout: Layout, groups: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Units with a powered-on VM first, biggest memory first (then CPU demand, then name); powered-off after."""
    snap = layout.snapshot

    def key(u: Sequence[str]) -> tuple[bool, int, float, str]:
        vms = [snap.vm[v] for v in u]
        return (not any(v.on for v in vms), -sum(v.memory for v in vms), -sum(v.cpu_demand for v in vms), u[0])

    return sorted((tuple(u) for u in groups if u), key=key)


def place(layout: Layout, unit: Sequence[str], kind: MoveKind, reason: str, cost: MigrationCost,
          cpu_limit: float | None = None) -> tuple[list[Move], Stuck | None, str | None]:
    """Move `unit` (VMs on one host) to the least loaded host that takes it, on `layout`: its moves, or why it
    stays; and a note when only breaking a should rule made room. `cpu_limit`: refuse hosts whose CPU load
    would pass it (a quarantine evacuation must not overload others)."""
    snap = layout.snapshot
    vms = [snap.vm[v] for v in unit]
    source = layout.where[unit[0]]
    local = [v.name for v in vms if v.local_disk]
    if local:
        return [], Stuck(tuple(unit), source, f"{' and '.join(unit)} cannot leave {source}: {' and '.join(local)} "
                                              f"{'has' if len(local) == 1 else 'have'} a disk on it, and a migration "
                                              "needs every disk on a datastore"), None
    running = [v for v in vms if v.on]
    cpu = sum(v.cpu_demand for v in running)
    mem = sum(v.memory for v in running)
    whole = sum(v.memory for v in vms)
    note = None
    candidates: list[Candidate] = []
    for should in (True, False):
        candidates = []
        for host in sorted(snap.host):
            if host == source:
                continue
            reasons = refusals(layout, unit, host, should=should)
            if not reasons and cpu_limit is not None and running and layout.cpu_load(host, cpu) > cpu_limit:
                reasons = [f"{host} would run at {layout.cpu_load(host, cpu):.0%} CPU, over the {cpu_limit:.0%} allowed"]
            score = None
            if not reasons:
                # A powered-off VM prefers a host where it would fit once started.
                score = layout.load(host, cpu, mem) + (0.0 if running or whole <= layout.free(host) else 1.0)
            candidates.append(Candidate(host=host, reasons=tuple(reasons), score=score))
        eligible = [c for c in candidates if c.eligible]
        if eligible:
            break
        if not snap.rules or all(r.must for r in snap.rules):
            break
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        return [], Stuck(tuple(unit), source, f"{' and '.join(unit)} cannot leave {source}: {summarize(candidates)}",
                         tuple(candidates)), None
    best = min(eligible, key=lambda c: (c.score, c.host))
    dest = best.host
    if not should:
        broken = [r for c in candidates if c.host == dest for r in refusals(layout, unit, dest, should=True)]
        note = f"{' and '.join(unit)} to {dest} breaks a should rule ({'; '.join(broken)}): no host kept it"
    with_ = f" with {' and '.join(unit)} (keep-together)" if len(unit) > 1 else ""
    if running:
        why = (f"{reason}: {dest} is the least loaded of {len(eligible)} host(s) that can take it{with_}, "
               f"at {layout.load(dest, cpu, mem):.0%} load after")
    else:
        fits = whole <= layout.free(dest)
        why = (f"{reason}: powered off, its home moves to {dest} ({mib(layout.free(dest))} free, "
               f"{'enough' if fits else 'too little'} to start it there), no migration")
    moves = []
    for v in vms:
        estimate = cost(v, snap.host[source], snap.host[dest], snap.rate(source, dest))
        moves.append(Move(vm=v.name, source=source, destination=dest,
                          kind=kind if v.on else MoveKind.REHOME, why=why, estimate=estimate))
        layout.move(v.name, dest)
    return moves, None, note


def plan_evacuation(snapshot: Snapshot, host: str, *, cost: MigrationCost = default_cost,
                    weights: Weights = EVEN) -> Plan:
    """Every VM off `host` (treated as entering maintenance, whatever its state), or why it stays."""
    _host(snapshot, host)
    if snapshot.host[host].state not in STAY_AWAY:
        hosts = tuple(replace(h, state=Status.ENTERING_MAINTENANCE) if h.name == host else h for h in snapshot.hosts)
        snapshot = replace(snapshot, hosts=hosts)
    layout = Layout(snapshot, weights)
    before = layout.imbalance()
    here = [tuple(v for v in u if layout.where[v] == host) for u in units(snapshot)]
    moves: list[Move] = []
    stuck: list[Stuck] = []
    notes: list[str] = []
    for unit in order(layout, here):
        got, why, note = place(layout, unit, MoveKind.EVACUATE, f"{host} enters maintenance", cost)
        moves += got
        stuck += [why] if why else []
        notes += [note] if note else []
    if stuck:
        notes.append(f"{host} stays entering maintenance while {len(stuck)} VM(s) or group(s) cannot leave it")
    return Plan(moves=tuple(moves), stuck=tuple(stuck), imbalance_before=before, imbalance_after=layout.imbalance(),
                notes=tuple(notes))


def plan_move_back(snapshot: Snapshot, host: str, vms: Iterable[str], *, cost: MigrationCost = default_cost,
                   weights: Weights = EVEN) -> Plan:
    """Each of `vms` (those `host` held before maintenance) back to `host` if it still fits there; VMs of a
    keep-together group move back together. VMs gone from the cluster or back already are skipped."""
    _host(snapshot, host)
    layout = Layout(snapshot, weights)
    before = layout.imbalance()
    wanted = {v for v in vms if v in snapshot.vm and layout.where[v] != host}
    groups = [tuple(v for v in u if v in wanted) for u in units(snapshot)]
    # A unit moves back from one host: split a group the evacuation scattered by where its VMs are now.
    split = [tuple(v for v in g if layout.where[v] == at) for g in groups for at in sorted({layout.where[v] for v in g})]
    moves: list[Move] = []
    stuck: list[Stuck] = []
    for unit in order(layout, split):
        source = layout.where[unit[0]]
        vmobjs = [snapshot.vm[v] for v in unit]
        reasons = refusals(layout, unit, host, should=True)
        if reasons:
            stuck.append(Stuck(tuple(unit), source, f"{' and '.join(unit)} stay(s) on {source}: {'; '.join(reasons)}",
                               (Candidate(host=host, reasons=tuple(reasons)),)))
            continue
        why = f"{' and '.join(unit)} ran on {host} before its maintenance and fit(s) there again"
        for v in vmobjs:
            moves.append(Move(vm=v.name, source=source, destination=host,
                              kind=MoveKind.MOVE_BACK if v.on else MoveKind.REHOME, why=why,
                              estimate=cost(v, snapshot.host[source], snapshot.host[host], snapshot.rate(source, host))))
            layout.move(v.name, host)
    return Plan(moves=tuple(moves), stuck=tuple(stuck), imbalance_before=before, imbalance_after=layout.imbalance())
