"""The demo's second act (I/O): what live migration is for, asked of the center as a user asks it
(kvmotion.api.operations calls, as `kvmotion drs`, `host maintenance` and `host health` make them):
DRS relieving a CPU-contended host, a host's maintenance and its move-back, a host's health fault.

Each step becomes a report.Step. The center starts the moves; the demo follows its tasks, and the
demo VM's moves among them go to the story's checks (memory, TCP, disk, FDB, one copy) as they end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from kvmotion.api import operations as ops
from kvmotion.api.center import CenterClient, HostMode, Severity, TaskKind, TaskState, TaskView
from kvmotion.api.migration import MigrationRecord
from kvmotion.api.operations import DrsApply, DrsStatus, HealthReport, MaintenanceExit, MaintenanceRequest, Plan
from kvmotion.api.spec import NicSpec, VmSpec, Workload
from kvmotion.core.errors import KvmotionError
from kvmotion.demo import report as rpt
from kvmotion.demo.guestlog import GuestLog
from kvmotion.lab.cluster import LabCluster
from kvmotion.net import lab as labmod

VM = "web1"  # the demo VM (kvmotion.demo.runner), whose moves are checked
BUSY = ("busy1", "busy2")  # CPU-busy guests: 1 vCPU each, booted together on the demo VM's host
BUSY_MEMORY = 256 << 20
BUSY_MAC = "52:54:00:de:30:{:02x}"
RATE_SKIP, RATE_LINES = 2, 6  # CPU status lines (one per guest-second) skipped after a change, then counted
RATE_TIMEOUT_S = 60.0
# The center's picture of CPU demand comes with the agents' full reports (up to ~20 s apart) and
# needs two samples of a process: DRS may see the contention that long after the guests are busy.
DRS_WAIT_S = 75.0
STEP_TIMEOUT_S = 180.0
POLL_S = 0.5
HEALTH_HOST = "host-b"
PROVIDER = "demo"
MOVES = (TaskKind.MIGRATE, TaskKind.REHOME)


class View(Protocol):
    def step(self, text: str) -> None: ...

    def detail(self, text: str) -> None: ...


class Lab(Protocol):
    """What act 2 needs of the demo's story (kvmotion.demo.runner.Story)."""

    @property
    def cluster(self) -> LabCluster: ...

    @property
    def topo(self) -> labmod.LabTopology: ...

    @property
    def center(self) -> CenterClient: ...

    @property
    def view(self) -> View: ...

    def where(self, vm: str = VM) -> str | None: ...

    def check_move(self, task: TaskView, step: str) -> MigrationRecord: ...

    def boot(self, spec: VmSpec, host: str) -> None: ...

    def start(self, names: Sequence[str]) -> None: ...


def run(lab: Lab) -> Iterator[rpt.Step]:
    """The steps, one after the other on the same lab; a step that breaks says why and the next runs."""
    yield _guarded(lab, "drs", "DRS relieves a contended host", drs)
    steps = _guarded_many(lab, "maintenance", "a host's maintenance and move-back", maintenance)
    yield from steps
    yield _guarded(lab, "health-severe", f"{HEALTH_HOST} reports a severe fault", health_fault)
    yield _guarded(lab, "health-ok", f"{HEALTH_HOST} reports ok again", health_ok)


def _guarded(lab: Lab, name: str, title: str, step: Callable[[Lab], rpt.Step]) -> rpt.Step:
    began = time.time()
    try:
        return step(lab)
    except KvmotionError as exc:
        lab.view.detail(f"[red]{title}: {exc}[/]")
        return rpt.Step(name, title, None, False, str(exc), began, time.time())


def _guarded_many(lab: Lab, name: str, title: str, steps: Callable[[Lab], list[rpt.Step]]) -> list[rpt.Step]:
    began = time.time()
    try:
        return steps(lab)
    except KvmotionError as exc:
        lab.view.detail(f"[red]{title}: {exc}[/]")
        return [rpt.Step(name, title, None, False, str(exc), began, time.time())]


# ---- following the center's tasks ----
def _ended(t: TaskView) -> str:
    hop = f"{t.target} {t.source} → {t.destination}"
    if t.state is not TaskState.DONE:
        return f"[red]{hop} {t.state.value}[/]: {t.error or 'no reason given'}"
    r = t.result
    took = f" in {r.total_ms / 1000:.1f} s" if r and r.total_ms is not None else ""
    down = f", downtime {r.downtime_ms:.0f} ms" if r and r.downtime_ms is not None else ""
    pred = f" (predicted {t.predicted_s:.1f} s)" if t.predicted_s is not None else ""
    return f"[green]done[/] {hop}{took}{down}{pred}"


def follow_moves(lab: Lab, step: str, since: float, match: Callable[[TaskView], bool], settled: Callable[[], bool],
                 timeout: float = STEP_TIMEOUT_S) -> tuple[list[TaskView], bool]:
    """The center's move tasks created since `since` that `match`, until every one has ended and
    `settled()` holds (True), or `timeout` (False). The demo VM's moves are checked as they end."""
    seen: dict[str, TaskView] = {}
    checked: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for t in lab.center.tasks(limit=200):
            if t.kind not in MOVES or t.created < since or not match(t):
                continue
            old = seen.get(t.id)
            seen[t.id] = t
            if old is None:
                lab.view.detail(f"task {t.id}: {t.kind.value} {t.target} {t.source} → {t.destination}"
                                + (f" ({t.why})" if t.why else ""))
            mine = t.target == VM and t.kind is TaskKind.MIGRATE
            if t.state.terminal and (old is None or not old.state.terminal) and not mine:
                lab.view.detail(_ended(t))
        for t in sorted(seen.values(), key=lambda x: x.created):
            if t.target == VM and t.kind is TaskKind.MIGRATE and t.state.terminal and t.id not in checked:
                checked.add(t.id)
                lab.check_move(t, step)  # at once: the checks look at the lab right after the move
        tasks = sorted(seen.values(), key=lambda x: x.created)
        if all(t.state.terminal for t in tasks) and settled():
            return tasks, True
        if time.monotonic() > deadline:
            lab.view.detail(f"[red]not settled within {timeout:.0f} s[/]")
            return tasks, False
        time.sleep(POLL_S)


def _moves(tasks: Sequence[TaskView]) -> tuple[rpt.TaskMove, ...]:
    return tuple(rpt.TaskMove.of(t) for t in tasks)


def show_plan(view: View, plan: Plan) -> None:
    for m in plan.moves:
        if m.powered_off:
            view.detail(f"{m.order}. {m.vm} {m.source} → {m.destination}: {m.why}; powered off, re-homed")
            continue
        pred = "-" if m.predicted_s is None else f"{m.predicted_s:.1f} s"
        down = "-" if m.predicted_downtime_ms is None else f"{m.predicted_downtime_ms:.0f} ms"
        view.detail(f"{m.order}. {m.vm} {m.source} → {m.destination}: {m.why}; predicted {pred}, downtime {down}")
    for u in plan.unmovable:
        view.detail(f"[yellow]cannot move[/] {u.vm}: {u.reason}")
    if not plan.moves and not plan.unmovable:
        view.detail("nothing to move")
    elif plan.predicted_s is not None:
        view.detail(f"the whole plan: predicted {plan.predicted_s:.1f} s")


# ---- 1: DRS ----
def busy_spec(topo: labmod.LabTopology, vm: str, k: int) -> VmSpec:
    """A CPU-busy guest: one vCPU kept busy, printing its work rate (CpuStatus) every guest-second."""
    nic = NicSpec(mac=BUSY_MAC.format(k + 1), portgroup=topo.portgroup, ip=f"{topo.vm_ip(k)}/{topo.vm_prefix}")
    return VmSpec(name=vm, memory=BUSY_MEMORY, vcpus=1, nics=(nic,), workloads=(Workload.CPU,))


def _rates(logs: Mapping[str, GuestLog], after: float) -> dict[str, float | None]:
    """Each busy VM's work rate over the same stretch of time, from status lines arriving after `after`."""
    deadline = time.monotonic() + RATE_TIMEOUT_S
    while True:
        rates = {vm: rpt.work_rate(log.lines(), after, RATE_SKIP, RATE_LINES) for vm, log in logs.items()}
        if all(r is not None for r in rates.values()) or time.monotonic() > deadline:
            return rates
        time.sleep(POLL_S)


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{r:,.0f}"


def _wait_for_drs(lab: Lab, host: str) -> DrsStatus:
    """DRS's status once it recommends moving a busy VM off `host`, or its last status after DRS_WAIT_S."""
    deadline = time.monotonic() + DRS_WAIT_S
    said = False
    while True:
        status: DrsStatus = lab.center.call(ops.drs())
        if any(r.move.vm in BUSY and r.move.source == host for r in status.recommendations):
            return status
        if time.monotonic() > deadline:
            return status
        if not said:
            lab.view.detail("waiting for the center to see the contention (the agents' reports)")
            said = True
        time.sleep(2 * POLL_S)


def drs(lab: Lab) -> rpt.Step:
    began = time.time()
    host = lab.where(VM)
    if host is None:
        raise KvmotionError(f"the center does not know where {VM} runs")
    view = lab.view
    view.step(f"act 2 · DRS: two CPU-busy VMs ({', '.join(BUSY)}: 1 vCPU, {BUSY_MEMORY >> 20} MiB) boot on {host}, "
              f"beside {VM}")
    logs = {vm: GuestLog({h.name: lab.cluster.serial_log(h.name, vm) for h in lab.topo.hosts}).start() for vm in BUSY}
    try:
        for k, vm in enumerate(BUSY, start=1):
            lab.boot(busy_spec(lab.topo, vm, k), host)
        lab.start(BUSY)
        before = _rates(logs, time.time())
        view.detail(f"work rate on {host} (units per guest-second): "
                    + ", ".join(f"{vm} {_rate(r)}" for vm, r in before.items()))
        status = _wait_for_drs(lab, host)
        loads = ", ".join(f"{h} {load:.2f}" for h, load in status.loads)
        tolerated = "-" if status.target is None else f"{status.target:.3f}"
        view.detail(f"drs recommend: imbalance {status.imbalance:.3f} (tolerated {tolerated}); load {loads}")
        for r in status.recommendations:
            view.detail(f"recommends {r.move.vm} {r.move.source} → {r.move.destination}: {r.why} "
                        f"(gain {r.gain:.1f}, cost {r.cost:.1f} s)")
        for note in status.notes:
            view.detail(f"note: {note}")
        if not status.recommendations:
            return rpt.Step("drs", "DRS relieves a contended host", host, False,
                            f"DRS recommended nothing within {DRS_WAIT_S:.0f} s (imbalance {status.imbalance:.3f}, "
                            f"load {loads})", began, time.time(),
                            rates=tuple(rpt.WorkRate(vm, host, before[vm], host, None) for vm in BUSY))
        since = time.time()
        applied = lab.center.call(ops.apply_drs(DrsApply(ids=tuple(r.id for r in status.recommendations))))
        for why in applied.skipped:
            view.detail(f"[yellow]skipped[/] {why}")
        ids = {t.id for t in applied.tasks}
        tasks, finished = follow_moves(lab, "drs", since, lambda t: t.id in ids, lambda: True)
        after = _rates(logs, time.time())
        where = {vm: next((t.destination or host for t in tasks if t.target == vm and t.state is TaskState.DONE), host)
                 for vm in BUSY}
        rates = tuple(rpt.WorkRate(vm, host, before[vm], where[vm], after[vm]) for vm in BUSY)
        for w in rates:
            ratio = "-" if w.ratio is None else f"x{w.ratio:.2f}"
            view.detail(f"{w.vm}: {_rate(w.before)} on {w.host_before} → {_rate(w.after)} on {w.host_after} ({ratio})")
        ok = finished and bool(tasks) and all(t.state is TaskState.DONE for t in tasks)
        moved = [f"{t.target} → {t.destination}" for t in tasks if t.state is TaskState.DONE]
        outcome = f"{len(moved)} move(s) applied: {', '.join(moved) or 'none'}"
        return rpt.Step("drs", "DRS relieves a contended host", host, ok, outcome, began, time.time(),
                        recommendations=status.recommendations, moves=_moves(tasks), rates=rates)
    finally:
        for log in logs.values():
            log.stop()


# ---- 2: maintenance, and back ----
def maintenance(lab: Lab) -> list[rpt.Step]:
    center, view = lab.center, lab.view
    host = lab.where(VM)
    if host is None:
        raise KvmotionError(f"the center does not know where {VM} runs")
    began = time.time()
    view.step(f"act 2 · maintenance: {host} (where {VM} runs) enters maintenance; the dry-run plan first")
    dry = center.call(ops.enter_maintenance(host, MaintenanceRequest(dry_run=True)))
    show_plan(view, dry.plan)
    since = time.time()
    answer = center.call(ops.enter_maintenance(host, MaintenanceRequest()))
    view.detail(f"{host} is {answer.mode.value.replace('_', ' ')}; {len(answer.tasks)} migration(s) queued")
    tasks, finished = follow_moves(lab, "maintenance", since, lambda t: t.source == host,
                                   lambda: center.host(host).mode is HostMode.MAINTENANCE)
    mode = center.host(host).mode
    view.detail(f"{host} is {mode.value.replace('_', ' ')}")
    evacuated = sorted(t.target for t in tasks if t.state is TaskState.DONE)
    enter = rpt.Step("maintenance", f"{host} enters maintenance", host, finished and mode is HostMode.MAINTENANCE,
                     f"{host} {mode.value} after moving {', '.join(evacuated) or 'nothing'}", began, time.time(),
                     plan=dry.plan.moves, moves=_moves(tasks))

    began = time.time()
    view.step(f"act 2 · {host} exits maintenance with --move-back: the VMs it held return")
    back = center.call(ops.exit_maintenance(host, MaintenanceExit(move_back=True)))
    show_plan(view, back.plan)
    ids = {t.id for t in back.tasks}
    tasks, finished = follow_moves(lab, "move-back", began, lambda t: t.id in ids or t.destination == host,
                                   lambda: True)
    returned = sorted(t.target for t in tasks if t.state is TaskState.DONE and t.destination == host)
    planned = {m.vm for m in back.plan.moves}
    mode = center.host(host).mode
    stayed = sorted(set(evacuated) - set(returned))
    outcome = f"{host} {mode.value}; back: {', '.join(returned) or 'none'}" + (
        f"; stayed away: {', '.join(stayed)}" if stayed else "")
    view.detail(outcome)
    ok = finished and mode is HostMode.NORMAL and planned <= set(returned)
    leave = rpt.Step("move-back", f"{host} exits maintenance, VMs move back", host, ok, outcome, began, time.time(),
                     plan=back.plan.moves, moves=_moves(tasks))
    return [enter, leave]


# ---- 3: a host's health ----
def health_fault(lab: Lab) -> rpt.Step:
    center, view = lab.center, lab.view
    began = time.time()
    view.step(f"act 2 · host health: {HEALTH_HOST}'s power supply reports a severe fault; the center evacuates it "
              "before it fails")
    report = HealthReport(provider=PROVIDER, component="psu", severity=Severity.SEVERE,
                          reason="PSU 1 failed, PSU 2 carries the host alone")
    h = center.call(ops.report_health(HEALTH_HOST, report))
    view.detail(f"POST /v1/hosts/{HEALTH_HOST}/health: {h.host} is {h.severity.value}"
                + (" (quarantined)" if h.quarantined else ""))
    tasks, finished = follow_moves(lab, "health", began, lambda t: t.source == HEALTH_HOST,
                                   lambda: center.host(HEALTH_HOST).mode is HostMode.MAINTENANCE)
    mode = center.host(HEALTH_HOST).mode
    evacuated = sorted(t.target for t in tasks if t.state is TaskState.DONE)
    outcome = f"{HEALTH_HOST} {mode.value} after moving {', '.join(evacuated) or 'nothing'}"
    view.detail(outcome)
    return rpt.Step("health-severe", f"{HEALTH_HOST} reports a severe fault", HEALTH_HOST,
                    finished and mode is HostMode.MAINTENANCE, outcome, began, time.time(), moves=_moves(tasks))


def health_ok(lab: Lab) -> rpt.Step:
    center, view = lab.center, lab.view
    began = time.time()
    view.step(f"act 2 · {HEALTH_HOST}'s power supply is replaced: it reports ok and takes VMs again")
    report = HealthReport(provider=PROVIDER, component="psu", severity=Severity.OK, reason="PSU 1 replaced")
    h = center.call(ops.report_health(HEALTH_HOST, report))
    mode = center.host(HEALTH_HOST).mode
    outcome = f"{HEALTH_HOST} {h.severity.value}, {mode.value}" + (", quarantined" if h.quarantined else "")
    view.detail(outcome + " (the VMs that left stay where they went)")
    return rpt.Step("health-ok", f"{HEALTH_HOST} reports ok again", HEALTH_HOST,
                    h.severity is Severity.OK and mode is HostMode.NORMAL and not h.quarantined, outcome, began,
                    time.time())
