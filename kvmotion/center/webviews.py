"""What the web client reads beside the CLI's routes: a VM's possible destinations (placement's
reasons and the predicted time and downtime of each), a migration task's detail (the source
agent's last record, which the dispatcher keeps in the store: rounds, rates, throttle, summary)
and the hosts' loads its event stream carries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kvmotion.api.center import HostView, MigrateRequest
from kvmotion.api.migration import Level
from kvmotion.api.spec import VmSpec
from kvmotion.api.web import (
    CheckView,
    Destination,
    Destinations,
    HostLoads,
    HostLoadView,
    LiveProgress,
    MigrationDetail,
    MigrationSummary,
    RoundView,
)
from kvmotion.center.store import Store
from kvmotion.center.tasks import Tasks
from kvmotion.core.errors import NotFound

Predict = Callable[[str, str, str], tuple[float | None, float | None]]
DEFAULT_DOWNTIME_MS = MigrateRequest.model_fields["max_downtime_ms"].default


def host_loads(hosts: list[HostView]) -> HostLoads:
    """Each host's CPU and memory figures as its last full report gave them."""
    return HostLoads(hosts=tuple(
        HostLoadView(host=h.name, cpus=h.load.cpus, cpu_demand=h.cpu_demand, memory_total=h.load.memory_total,
                     memory_available=h.load.memory_available) if h.load else HostLoadView(host=h.name)
        for h in hosts))


def destination(host: str, reasons: tuple[str, ...], score: float | None, predicted: tuple[float | None, float | None],
                limit_ms: float) -> Destination:
    """One host's verdict: refused (error); warning when no convergence is predicted or the predicted
    downtime is over the migration's limit; pass otherwise."""
    seconds, downtime = predicted
    if reasons:
        return Destination(host=host, verdict=Level.ERROR, reasons=reasons)
    warnings: list[str] = []
    if seconds is None:
        warnings.append("no prediction: the model expects no convergence, or knows too little of the VM")
    elif downtime is not None and downtime > limit_ms:
        warnings.append(f"predicted downtime {downtime:.0f} ms is over the {limit_ms:.0f} ms limit")
    return Destination(host=host, verdict=Level.WARNING if warnings else Level.PASS, reasons=tuple(warnings),
                       score=score, predicted_s=seconds, predicted_downtime_ms=downtime)


def destinations(tasks: Tasks, store: Store, vm: str, predict: Predict | None) -> Destinations:
    row = store.vm(vm)
    if row is None:
        raise NotFound(f"no VM {vm} in the cluster")
    source = row.observed_host or row.desired_host
    if row.spec is None:  # observed only: no spec to check a host against
        return Destinations(vm=vm, source=source, chosen=None, destinations=tuple(
            Destination(host=h.name, verdict=Level.WARNING, reasons=("VM not created through the center: no prechecks",))
            for h in store.hosts() if h.name != source))
    placement = tasks.placement(VmSpec.from_json(json.loads(row.spec)), source)
    out = []
    for c in placement.candidates:
        if c.host == source:
            continue
        predicted = predict(vm, source, c.host) if predict and source and not c.reasons else (None, None)
        out.append(destination(c.host, c.reasons, c.score, predicted, DEFAULT_DOWNTIME_MS))
    return Destinations(vm=vm, source=source, chosen=placement.chosen, destinations=tuple(out))


def _round(d: dict[str, Any]) -> RoundView:
    return RoundView(round=int(d.get("round", 0)), wall_time=float(d.get("wall_time", 0.0)),
                     bytes_sent=int(d.get("bytes_sent", 0)), link_rate=float(d.get("link_rate", 0.0)),
                     dirty_rate=float(d.get("dirty_rate", 0.0)), remaining=int(d.get("remaining", 0)),
                     throttle=float(d.get("throttle", 0.0)))


def migration_detail(tasks: Tasks, store: Store, task_id: str) -> MigrationDetail:
    task = tasks.task(task_id)
    row = store.migration(task_id)
    if row is None:
        raise NotFound(f"task {task_id} drives no migration")
    rec: dict[str, Any] = json.loads(row.record) if row.record else {}
    if not rec:
        return MigrationDetail(task=task, agent_id=row.agent_id)
    p = rec.get("progress") or {}
    s = rec.get("summary")
    return MigrationDetail(
        task=task, agent_id=row.agent_id, phase=str(rec.get("phase", "")), error=rec.get("error"),
        checks=tuple(CheckView(name=c["name"], level=Level(c["level"]), reason=c["reason"]) for c in rec.get("checks", ())),
        progress=LiveProgress(**{k: p[k] for k in LiveProgress.model_fields if k in p}),
        rounds=tuple(_round(r) for r in rec.get("rounds", ())),
        summary=MigrationSummary(**{k: s[k] for k in MigrationSummary.model_fields if k in s}) if s else None)
