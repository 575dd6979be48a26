"""Maintenance mode, DRS, rules and host health: the thin shell around the pure planners.

The planners (kvmotion.center.drs, .maintenance, .rules) decide from a snapshot of the cluster;
this module builds the snapshot from the store, turns plans into queued tasks (Tasks.queue_move:
the dispatcher runs them under the center's migration limits) and records modes, health and rules.

The controller is level-triggered and idempotent: every tick it looks at the whole picture again.
- A host whose health is severe enters maintenance (reason "health"); one that recovers leaves
  a maintenance that health caused. Moderate health quarantines it (placement refuses it; DRS
  moves VMs off when others have room).
- A host entering maintenance gets migration tasks for its VMs that have none open, as its
  evacuation plan says; it becomes "maintenance" only when no VM runs there and none of its
  tasks is open. VMs that cannot move keep it "entering maintenance", and say why in its reason.
- DRS in full automation applies its recommendations every `interval`; mandatory moves (rules,
  quarantine) too. Manual and partial only recommend moves; partial and full place a VM created
  without a host, manual refuses it naming the host it recommends (kvmotion.center.drs.initial_host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence

from kvmotion.api.center import HostMode, HostState, ObservedState, Severity, TaskState, TaskView
from kvmotion.api.identity import Identity
from kvmotion.api.operations import (
    Automation,
    DrsApplied,
    DrsApply,
    DrsConfig,
    DrsStatus,
    HealthReport,
    HostHealth,
    MaintenanceAnswer,
    MaintenanceExit,
    MaintenanceRequest,
    Move,
    Plan,
    RuleSpec,
    RuleView,
)
from kvmotion.api.spec import VmSpec
from kvmotion.center import planning
from kvmotion.center.cluster import Health
from kvmotion.center.health import next_state
from kvmotion.center.placement import Status, status_of
from kvmotion.center.store import HostRow, Store
from kvmotion.center.tasks import Tasks
from kvmotion.core.errors import Conflict, InvalidInput, KvmotionError, NotFound
from kvmotion.migration.predict import Guest, Route

log = logging.getLogger("kvmotion.center")

RUNNING = (ObservedState.RUNNING, ObservedState.PAUSED, ObservedState.STARTING, ObservedState.MIGRATING,
           ObservedState.STOPPING)
HEALTH = "health"  # the reason of a maintenance that health caused
CENTER_MAINTENANCE = "center:maintenance"  # who asked, in tasks and events
CENTER_DRS = "center:drs"
CENTER_HEALTH = "center:health"
PREDICTOR_TTL = 60.0  # seconds a calibrated predictor is used before it learns the newest migrations
RETRY_AFTER = 60.0  # seconds before a failed evacuation of a VM is tried again


class Operations:
    """The routes' operations and the controller's tick, over `store`; `clock`: wall-clock seconds."""

    def __init__(self, store: Store, tasks: Tasks, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tasks = tasks
        self.clock = clock
        self._last_drs = float("-inf")
        self._predictor: tuple[float, planning.Predictor] | None = None  # when calibrated, the predictor

    # ---- the picture ----
    def snapshot(self) -> planning.Snapshot:
        return planning.snapshot(self.store, self.clock())

    def cost(self) -> planning.cluster.MigrationCost:
        """The planners' cost of a move, from a predictor calibrated on this cluster's migrations
        (again every PREDICTOR_TTL seconds)."""
        now = self.clock()
        if self._predictor is None or now - self._predictor[0] > PREDICTOR_TTL:
            self._predictor = (now, planning.predictor(self.store))
        return planning.cost_function(self._predictor[1], self.store.settings().encrypted)

    def predict(self, vm: str, source: str, destination: str) -> tuple[float | None, float | None]:
        """A user's migration's predicted seconds and downtime (ms), for its task (None: unknown)."""
        row, src, dst = self.store.vm(vm), self.store.host(source), self.store.host(destination)
        if row is None or row.spec is None or src is None or dst is None:
            return None, None
        spec = VmSpec.from_json(json.loads(row.spec))
        settings = self.store.settings()
        link = min((h.facts.link_bps if h.facts and h.facts.link_bps else settings.link_bps) for h in (src, dst)) / 8
        if self._predictor is None or self.clock() - self._predictor[0] > PREDICTOR_TTL:
            self.cost()
        assert self._predictor is not None
        guest = Guest(memory=spec.memory, dirty_rate=planning.dirty_rate(planning.measured_load(src, vm)))
        p = self._predictor[1].predict(guest, Route(link_rate=int(link), encrypted=settings.encrypted))
        return (round(p.duration, 2), round(p.pause * 1000, 1)) if p.converged else (None, None)

    def _host(self, name: str) -> HostRow:
        host = self.store.host(name)
        if host is None:
            raise NotFound(f"no host {name} has joined")
        return host

    # ---- maintenance ----
    def enter_maintenance(self, name: str, request: MaintenanceRequest, who: Identity | str,
                          reason: str = "") -> MaintenanceAnswer:
        host = self._host(name)
        plan = planning.evacuation(self.snapshot(), name, self.cost())
        if request.dry_run:
            return MaintenanceAnswer(plan=plan, mode=host.mode)
        if host.mode is HostMode.NORMAL:
            homes = [vm.name for vm in self.store.vms() if vm.observed_host == name or
                     (vm.observed_host is None and vm.desired_host == name)]
            host = self.store.set_host_mode(name, HostMode.ENTERING_MAINTENANCE, reason or f"asked by {who}",
                                            str(who), self.clock(), homes=homes)
        tasks = self._queue(plan.moves, CENTER_MAINTENANCE)
        host = self._settle(host) or host
        return MaintenanceAnswer(plan=plan, mode=host.mode, tasks=tuple(tasks))

    def exit_maintenance(self, name: str, request: MaintenanceExit, who: Identity | str) -> MaintenanceAnswer:
        host = self._host(name)
        if host.mode is HostMode.NORMAL:
            raise InvalidInput(f"host {name} is not in maintenance")
        snap = planning.without_maintenance(self.snapshot(), name)
        plan = planning.move_back(snap, name, self.store.homes(name), self.cost()) if request.move_back \
            else Plan(host=name)
        if request.dry_run:
            return MaintenanceAnswer(plan=plan, mode=host.mode)
        for task in self.store.tasks(open_only=True, limit=100_000):  # its evacuation stops
            if task.source == name and task.requested_by == CENTER_MAINTENANCE and task.state is TaskState.QUEUED:
                self.store.request_cancel(task.id, str(who), self.clock())
        host = self.store.set_host_mode(name, HostMode.NORMAL, f"asked by {who}", str(who), self.clock())
        tasks = self._queue(plan.moves, CENTER_MAINTENANCE)
        self.store.clear_homes(name)
        return MaintenanceAnswer(plan=plan, mode=host.mode, tasks=tuple(tasks))

    def _queue(self, moves: Sequence[Move], who: str) -> list[TaskView]:
        """Each move a task, in the plan's order; a VM with an open task is left to it."""
        queued = []
        for move in sorted(moves, key=lambda m: m.order):
            if self.store.open_task(move.vm) is not None:
                continue
            try:
                queued.append(self.tasks.queue_move(move.vm, move.source, move.destination, who, why=move.why,
                                                    predicted_s=move.predicted_s,
                                                    predicted_downtime_ms=move.predicted_downtime_ms,
                                                    rehome=move.powered_off))
            except (Conflict, NotFound) as exc:  # a task came in between, or the VM went
                log.info("%s: %s not queued: %s", who, move.vm, exc)
        return queued

    def _settle(self, host: HostRow) -> HostRow | None:
        """An evacuating host with no VM running there and no open task of its own is in maintenance."""
        if host.mode is not HostMode.ENTERING_MAINTENANCE:
            return None
        running = [vm.name for vm in self.store.vms() if vm.observed_host == host.name and vm.observed_state in RUNNING]
        busy = [t for t in self.store.tasks(open_only=True, limit=100_000) if host.name in (t.source, t.destination)]
        if running or busy:
            return None
        return self.store.set_host_mode(host.name, HostMode.MAINTENANCE, host.mode_reason, CENTER_MAINTENANCE,
                                        self.clock())

    def _recently_failed(self, host: str, now: float) -> set[str]:
        """VMs whose evacuation from `host` failed within RETRY_AFTER: not retried at every tick."""
        return {t.target for t in self.store.tasks(state=TaskState.FAILED, limit=200)
                if t.source == host and t.requested_by == CENTER_MAINTENANCE and (t.ended or 0) > now - RETRY_AFTER}

    # ---- health ----
    def health(self, name: str) -> HostHealth:
        host = self._host(name)
        return HostHealth(host=name, severity=host.health, quarantined=host.quarantined,
                          entries=tuple(self.store.health(name)))

    def report_health(self, name: str, report: HealthReport, who: Identity | str) -> HostHealth:
        self._host(name)
        self.store.report_health(name, report, str(who), self.clock())
        self._apply_health(self._host(name))
        return self.health(name)

    def _apply_health(self, host: HostRow) -> None:
        """The pure policy (kvmotion.center.health) applied: severe -> maintenance (evacuate), recovered
        -> out of a maintenance health caused; moderate quarantines by itself (HostRow.quarantined)."""
        by_health = host.mode_reason.startswith(f"{HEALTH}:") or host.mode is HostMode.NORMAL
        status = status_of(host.state, host.mode, host.quarantined)
        change = next_state(host.name, status, by_health, Health(host.health.value))
        if change.state is Status.ENTERING_MAINTENANCE and host.mode is HostMode.NORMAL:
            worst = [e for e in self.store.health(host.name) if e.severity is Severity.SEVERE]
            why = "; ".join(f"{e.component}: {e.reason or e.severity.value}" for e in worst)
            self.enter_maintenance(host.name, MaintenanceRequest(), CENTER_HEALTH, reason=f"{HEALTH}: {why}")
        elif change.state in (Status.CONNECTED, Status.QUARANTINE) and host.mode is not HostMode.NORMAL and by_health:
            self.exit_maintenance(host.name, MaintenanceExit(), CENTER_HEALTH)

    # ---- rules ----
    def rules(self) -> list[RuleView]:
        snap = self.snapshot()
        return [RuleView(rule=r.rule, created=r.created, created_by=r.created_by,
                         violations=tuple(planning.violations(snap, r.rule))) for r in self.store.rules()]

    def add_rule(self, rule: RuleSpec, who: Identity) -> RuleView:
        known = {vm.name for vm in self.store.vms()}
        unknown = [vm for vm in rule.vms if vm not in known]
        if unknown:
            raise InvalidInput(f"unknown VM {', '.join(unknown)}: no such VM in the cluster")
        if rule.host is not None:
            self._host(rule.host)
        now = self.clock()
        self.store.add_rule(rule, str(who), now)
        return RuleView(rule=rule, created=now, created_by=str(who),
                        violations=tuple(planning.violations(self.snapshot(), rule)))

    def remove_rule(self, name: str, who: Identity) -> None:
        self.store.remove_rule(name, str(who), self.clock())

    # ---- DRS ----
    def drs(self) -> DrsStatus:
        return planning.recommend(self.snapshot(), self.store.drs_config(), self.cost())

    def configure_drs(self, config: DrsConfig, who: Identity) -> DrsConfig:
        self.store.save_drs_config(config, str(who), self.clock())
        return config

    def apply_drs(self, request: DrsApply, who: Identity | str) -> DrsApplied:
        status = self.drs()
        by_id = {r.id: r for r in status.recommendations}
        chosen = list(status.recommendations) if request.all else [by_id[i] for i in request.ids if i in by_id]
        skipped = [f"{i}: no longer recommended (run `kvmotion drs recommend` again)" for i in request.ids
                   if i not in by_id]
        moves = [r.move for r in chosen]
        tasks = self._queue(moves, str(who) if isinstance(who, Identity) else who)
        done = {t.target for t in tasks}
        skipped += [f"{r.id}: VM {r.move.vm} has a task open already" for r in chosen if r.move.vm not in done]
        return DrsApplied(tasks=tuple(tasks), skipped=tuple(skipped))

    # ---- the controller ----
    def tick_sync(self) -> None:
        now = self.clock()
        for host in self.store.hosts():
            if host.state is not HostState.CONNECTED:
                continue
            self._apply_health(host)
        for host in self.store.hosts():
            if host.mode is HostMode.ENTERING_MAINTENANCE:
                plan = planning.evacuation(self.snapshot(), host.name, self.cost())
                failed = self._recently_failed(host.name, now)
                self._queue([m for m in plan.moves if m.vm not in failed], CENTER_MAINTENANCE)
                self._settle(self._host(host.name))
        config = self.store.drs_config()
        if config.automation is Automation.FULL and now - self._last_drs >= config.interval:
            self._last_drs = now
            applied = self.apply_drs(DrsApply(all=True), CENTER_DRS)
            if applied.tasks:
                log.info("DRS queued %d migration(s)", len(applied.tasks))

    async def run(self, stop: asyncio.Event, interval: float = 2.0, tick_timeout: float = 30.0) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(tick_timeout):
                    await asyncio.to_thread(self.tick_sync)
            except TimeoutError:
                log.warning("operations tick took over %.0f s; trying again", tick_timeout)
            except KvmotionError as exc:
                log.warning("operations tick: %s", exc)
            except Exception:  # the next tick decides again from the current picture
                log.exception("operations tick failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
