"""The planners' side of the center: a cluster snapshot built from the store, and their plans as
wire models. The planners themselves (cluster, maintenance, drs, rules) are pure; this is the only
place that reads the store for them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace

from kvmotion.api.center import ObservedState, PowerState, Severity, TaskKind, TaskState, VmLoad
from kvmotion.api.migration import MigrationRecord, record_from_json
from kvmotion.api.operations import DrsConfig, DrsStatus, Move, Plan, Recommendation, RuleKind, RuleSpec, Unmovable
from kvmotion.api.spec import VmSpec
from kvmotion.center import cluster, drs, maintenance, rules
from kvmotion.center.placement import Status, fact_refusals, status_of
from kvmotion.center.store import HostRow, Store, VmRow
from kvmotion.core.errors import KvmotionError
from kvmotion.migration.predict import Guest, Predictor, Route, observed_from_record

Snapshot = cluster.Snapshot
RECENT_TASKS = 2000  # migrations looked at for when each VM last moved
HISTORY = 500  # finished migrations a predictor is calibrated on
STOPPED = (ObservedState.STOPPED, ObservedState.CRASHED, ObservedState.ABSENT)


def _status(host: HostRow) -> Status:
    if host.load is None:
        return Status.NOT_RESPONDING  # nothing known of its capacity yet
    return status_of(host.state, host.mode, host.quarantined)


def _health(severity: Severity) -> cluster.Health:
    return cluster.Health(severity.value)


def measured_load(host: HostRow, vm: str) -> VmLoad | None:
    """What `host`'s agent last measured of `vm` (None: nothing)."""
    return next((v for v in host.load.vms if v.name == vm), None) if host.load else None


def dirty_rate(measured: VmLoad | None, otherwise: float = 0.0) -> float:
    """The VM's dirty rate as its agent last measured it, else `otherwise` (its last migration's)."""
    return measured.dirty_rate if measured is not None and measured.dirty_rate is not None else otherwise


def _vm(row: VmRow, hosts: dict[str, HostRow], moved_at: dict[str, float],
        dirty: dict[str, float]) -> cluster.Vm | None:
    where = row.observed_host if row.observed_state is not ObservedState.ABSENT else None
    where = where or row.desired_host
    if where is None or where not in hosts:
        return None
    spec = VmSpec.from_json(json.loads(row.spec)) if row.spec else None
    measured = measured_load(hosts[where], row.name)
    demand = (measured.cpu_demand or 0.0) + (measured.cpu_ready or 0.0) if measured else 0.0
    memory = spec.memory if spec else (measured.memory if measured and measured.memory else 1 << 20)
    on = row.observed_state not in STOPPED if row.observed_state is not ObservedState.UNKNOWN \
        else row.desired_power is PowerState.ON
    barred: dict[str, str] = {}
    if spec is not None:
        for name, host in hosts.items():
            if name != where:
                why = fact_refusals(spec, name, host.facts, where, None, migrating=True)
                if why:
                    barred[name] = "; ".join(why)
    local = spec is not None and any(d.datastore is None for d in spec.disks)
    return cluster.Vm(name=row.name, host=where, memory=memory, vcpus=spec.vcpus if spec else 1, cpu_demand=demand,
                      dirty_rate=dirty_rate(measured, dirty.get(row.name, 0.0)), local_disk=local,
                      power=PowerState.ON if on else PowerState.OFF,
                      moved_at=moved_at.get(row.name), barred=barred)


def _rule(spec: RuleSpec, known: set[str]) -> cluster.Rule | None:
    vms = tuple(v for v in spec.vms if v in known)
    kind = cluster.RuleKind(spec.kind.value)
    if (kind is cluster.RuleKind.VM_HOST and not vms) or (kind is not cluster.RuleKind.VM_HOST and len(vms) < 2):
        return None  # its VMs left the cluster: nothing to keep
    return cluster.Rule(name=spec.name, kind=kind, vms=vms, hosts=(spec.host,) if spec.host else (),
                        must=spec.strength.value == "must")


def _records(store: Store) -> list[MigrationRecord]:
    out = []
    for row in store.finished_migrations(HISTORY):
        try:
            out.append(record_from_json(json.loads(row.record)))
        except (KvmotionError, ValueError, KeyError, TypeError):
            continue  # a record of another version: no lesson from it
    return out


def predictor(store: Store) -> Predictor:
    """Calibrated on the cluster's own finished migrations (defaults when it has none)."""
    return Predictor.from_history(o for rec in _records(store) if (o := observed_from_record(rec)) is not None)


def cost_function(predict: Predictor, encrypted: bool) -> cluster.MigrationCost:
    """The planners' cost of a move: the predictor's duration, downtime and bytes (infinite when the
    migration would not converge); a powered-off VM costs nothing (it only changes home)."""
    def cost(vm: cluster.Vm, source: cluster.Host, destination: cluster.Host, link_rate: float) -> cluster.Estimate:
        if not vm.on:
            return cluster.Estimate(0.0, 0.0, 0)
        p = predict.predict(Guest(memory=vm.memory, dirty_rate=vm.dirty_rate),
                            Route(link_rate=max(1, int(link_rate)), encrypted=encrypted))
        if not p.converged:
            return cluster.Estimate(math.inf, math.inf, p.bytes)
        return cluster.Estimate(p.duration, p.pause, p.bytes)  # the guest's downtime, not QEMU's part of it
    return cost


def snapshot(store: Store, now: float) -> Snapshot:
    hosts = {h.name: h for h in store.hosts()}
    dirty: dict[str, float] = {}
    for rec in reversed(_records(store)):  # oldest first: the newest record of each VM wins
        if rec.summary is not None:
            dirty[rec.vm] = rec.forecast.dirty_rate if rec.forecast else rec.summary.peak_dirty_rate
    moved_at: dict[str, float] = {}
    for task in store.tasks(state=TaskState.DONE, limit=RECENT_TASKS):
        if task.kind is TaskKind.MIGRATE and task.ended is not None:
            moved_at[task.target] = max(moved_at.get(task.target, 0.0), task.ended)
    vms = [vm for row in store.vms() if (vm := _vm(row, hosts, moved_at, dirty)) is not None]
    known = {v.name for v in vms}
    rule_list = [r for row in store.rules() if (r := _rule(row.rule, known)) is not None
                 and all(h in hosts for h in r.hosts)]
    snap_hosts = []
    links: dict[tuple[str, str], float] = {}
    default_link = store.settings().link_bps
    for h in hosts.values():
        cpus = (h.load.cpu_capacity or float(h.load.cpus)) if h.load else 1.0  # a cgroup-limited host: its cores
        memory = h.load.memory_total if h.load and h.load.memory_total > 0 else 1
        snap_hosts.append(cluster.Host(name=h.name, state=_status(h), cpus=cpus, memory=memory,
                                       health=_health(h.health)))
    for a in hosts.values():
        for b in hosts.values():
            if a.name != b.name:
                bps = min((x.facts.link_bps if x.facts and x.facts.link_bps else default_link) for x in (a, b))
                links[(a.name, b.name)] = bps / 8
    return Snapshot(hosts=tuple(snap_hosts), vms=tuple(vms), rules=tuple(rule_list), links=links,
                    link_rate=default_link / 8, now=now)


def without_maintenance(snap: Snapshot, host: str) -> Snapshot:
    """The snapshot as it will be once `host` leaves maintenance (for its move-back plan)."""
    hosts = tuple(replace(h, state=Status.CONNECTED) if h.name == host and h.state in
                  (Status.MAINTENANCE, Status.ENTERING_MAINTENANCE) else h for h in snap.hosts)
    return replace(snap, hosts=hosts)


# ---- plans on the wire ----
def _finite(x: float, scale: float = 1.0) -> float | None:
    return round(x * scale, 2) if math.isfinite(x) else None


def _move(m: cluster.Move, order: int) -> Move:
    off = m.kind is cluster.MoveKind.REHOME
    return Move(vm=m.vm, source=m.source, destination=m.destination, order=order, why=m.why,
                predicted_s=None if off else _finite(m.estimate.seconds),
                predicted_downtime_ms=None if off else _finite(m.estimate.downtime, 1000), powered_off=off)


def _plan(host: str, plan: cluster.Plan) -> Plan:
    moves = tuple(_move(m, i) for i, m in enumerate(plan.moves, start=1))
    return Plan(host=host, moves=moves, unmovable=tuple(Unmovable(vm=s.vm, reason=s.why) for s in plan.stuck),
                predicted_s=_finite(plan.seconds))


def evacuation(snap: Snapshot, host: str, cost: cluster.MigrationCost = cluster.default_cost) -> Plan:
    return _plan(host, maintenance.plan_evacuation(snap, host, cost=cost))


def move_back(snap: Snapshot, host: str, vms: Sequence[str], cost: cluster.MigrationCost = cluster.default_cost) -> Plan:
    return _plan(host, maintenance.plan_move_back(snap, host, [v for v in vms if v in snap.vm], cost=cost))


def violations(snap: Snapshot, spec: RuleSpec) -> list[str]:
    return [v.sentence for v in rules.violations(snap) if v.rule == spec.name]


def _recommendation_id(m: cluster.Move) -> str:
    return hashlib.sha256(f"{m.vm}:{m.source}:{m.destination}".encode()).hexdigest()[:12]


def recommend(snap: Snapshot, config: DrsConfig, cost: cluster.MigrationCost = cluster.default_cost) -> DrsStatus:
    settings = drs.DrsConfig(threshold=config.threshold)
    plan = drs.recommend(snap, settings, cost)
    recs = tuple(Recommendation(id=_recommendation_id(m), move=_move(m, i), mandatory=m.kind.mandatory,
                                gain=round(m.benefit, 3), cost=round(m.cost, 3), why=m.why)
                 for i, m in enumerate(plan.moves, start=1))
    by = cluster.loads(snap)
    loads = tuple((h.name, round(by[h.name].total(settings.weights), 4)) for h in snap.hosts)
    tolerated = drs.TOLERANCE[config.threshold]
    return DrsStatus(config=config, imbalance=round(cluster.imbalance(snap, settings.weights), 4),
                     target=None if math.isinf(tolerated) else tolerated, recommendations=recs, loads=loads,
                     notes=tuple(f"{s.vm} stays on {s.host}: {s.why}" for s in plan.stuck) + plan.notes)


__all__ = ["RuleKind", "Snapshot", "evacuation", "move_back", "recommend", "snapshot", "violations"]
