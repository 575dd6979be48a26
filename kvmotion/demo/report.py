"""The demo's report (pure): per-migration figures and checks from the migration records, the
client probe's timeline, the guest's console lines (stamped as the host saw them arrive) and what
was observed on the lab right after each migration; act 2's steps (DRS, maintenance, host health:
the center's plans, its tasks, the busy guests' work rates) and the per-host timeline of VMs.

Times are wall-clock seconds (time.time()) unless named *_s, which are seconds since the probe's start.
Each migration owns a window of the run: from its start to the next one's start (the last one's
to the end of the run); console lines and disk acknowledgements are attributed by arrival time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

from kvmotion.api.center import TaskKind, TaskState, TaskView
from kvmotion.api.migration import MigrationRecord, Phase
from kvmotion.api.operations import Move, Recommendation
from kvmotion.guest.records import RecordCheck
from kvmotion.guest.serial import CpuStatus, DiskAck, GuestEvent, MemCorrupt, MemStatus
from kvmotion.net.probe import ProbeReport, UdpSample, largest_gap

# Phases drawn and reported, each from its entry to the next phase's entry.
SPAN_PHASES = (Phase.PREPARE, Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMMIT)
# After a migration ends, the client gap keeps being searched this long (re-learning, announce
# rounds), unless the next migration starts earlier.
GAP_TAIL_S = 1.0
ACT1 = "act 1"


@dataclass(frozen=True)
class ConsoleLine:
    """A guest console event and when (wall clock) the host's serial log received it."""

    at: float
    host: str
    event: GuestEvent


@dataclass(frozen=True)
class PhaseSpan:
    phase: str
    start: float  # wall clock
    end: float


@dataclass(frozen=True)
class Observation:
    """What the lab looked like right after a migration (read from the switch, agents and /proc)."""

    fdb_port: str | None  # where the physical switch learned the VM's MAC
    expected_port: str  # the destination host's VM uplink on the switch
    running_on: tuple[str, ...]  # hosts whose agent lists the VM as running (one entry per copy)
    qemu_on: tuple[str, ...]  # hosts with a QEMU process tagged for the VM (one entry per process)


@dataclass(frozen=True)
class Checks:
    memory_ok: bool | None  # None: not run (no memory writer in the guest)
    tcp_ok: bool
    disk_ok: bool
    fdb_ok: bool
    single_copy_ok: bool

    @property
    def all_ok(self) -> bool:
        return self.memory_ok is not False and self.tcp_ok and self.disk_ok and self.fdb_ok and self.single_copy_ok

    def failed(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.to_json().items() if v is False)

    def to_json(self) -> dict[str, bool | None]:
        return {
            "memory_ok": self.memory_ok,
            "tcp_ok": self.tcp_ok,
            "disk_ok": self.disk_ok,
            "fdb_ok": self.fdb_ok,
            "single_copy_ok": self.single_copy_ok,
        }


@dataclass(frozen=True)
class MigrationRun:
    """One migration as the demo drove it: its final record, the lab right after it, its window."""

    record: MigrationRecord
    observation: Observation | None  # None when the migration did not complete
    window_start: float
    window_end: float


@dataclass(frozen=True)
class MigrationResult:
    index: int
    source: str
    destination: str
    id: str
    phase: str
    error: str | None
    total_ms: float | None
    downtime_ms: float | None
    pause_ms: float | None
    client_gap_ms: float | None
    client_gap_at_s: float | None
    rounds: int | None
    bytes: int | None
    converged: bool
    checks: Checks
    compression: str | None  # of the migration stream (none, zstd): kvmotion picks it by the link
    phases: tuple[PhaseSpan, ...]
    step: str = ACT1  # which part of the demo moved it (act 1, or a step of act 2)
    task: str | None = None  # the center's task

    def to_json(self, t0_wall: float) -> dict[str, object]:
        return {
            "index": self.index,
            "step": self.step,
            "task": self.task,
            "from": self.source,
            "to": self.destination,
            "id": self.id,
            "phase": self.phase,
            "error": self.error,
            "total_ms": _r(self.total_ms),
            "downtime_ms": _r(self.downtime_ms),
            "pause_ms": _r(self.pause_ms),
            "client_gap_ms": _r(self.client_gap_ms),
            "client_gap_at_s": _r(self.client_gap_at_s, 3),
            "rounds": self.rounds,
            "bytes": self.bytes,
            "converged": self.converged,
            "compression": self.compression,
            "checks": self.checks.to_json(),
            "phases": [
                {"phase": p.phase, "start_s": _r(p.start - t0_wall, 3), "end_s": _r(p.end - t0_wall, 3)} for p in self.phases
            ],
        }


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# --- the pieces -----------------------------------------------------------------------------------


def phase_spans(rec: MigrationRecord) -> tuple[PhaseSpan, ...]:
    """The record's phases as spans, each ending where the next phase began."""
    times = list(rec.phase_times)
    spans = []
    for (phase, start), (_, end) in itertools.pairwise(times):
        if phase in {p.value for p in SPAN_PHASES}:
            spans.append(PhaseSpan(phase, start, end))
    return tuple(spans)


def client_gap(samples: Sequence[UdpSample], started_wall: float, start: float, end: float) -> tuple[float, float] | None:
    """(largest gap without a UDP reply in [start, end] in ms, its start in probe seconds), or None
    if the probe's timeline does not cover the window."""
    if not samples:
        return None
    lo, hi = start - started_wall, end - started_wall
    if hi <= samples[0].t_send or lo >= samples[-1].t_send:
        return None
    gap = largest_gap(samples, max(lo, samples[0].t_send), min(hi, samples[-1].t_send))
    return gap.duration * 1000, gap.start


def memory_ok(lines: Sequence[ConsoleLine], start: float, end: float, after: float) -> bool:
    """No corrupt page reported in [start, end), every memory status there says errors=0, and the
    writer reported at least once after `after` (it runs on after the migration)."""
    status_after = False
    for line in lines:
        if not start <= line.at < end:
            continue
        if isinstance(line.event, MemCorrupt):
            return False
        if isinstance(line.event, MemStatus):
            if line.event.errors:
                return False
            status_after = status_after or line.at >= after
    return status_after


def acked_by(lines: Sequence[ConsoleLine], until: float) -> int:
    """Highest disk record the guest acknowledged as durable by `until` (-1: none)."""
    return max((ln.event.seq for ln in lines if isinstance(ln.event, DiskAck) and ln.at < until), default=-1)


def highest_ack(lines: Sequence[ConsoleLine]) -> int:
    return max((ln.event.seq for ln in lines if isinstance(ln.event, DiskAck)), default=-1)


def disk_ok(check: RecordCheck | None, lines: Sequence[ConsoleLine], until: float) -> bool:
    """Every record acknowledged by `until` is on the disk, in an unbroken run from record 0."""
    acked = acked_by(lines, until)
    return check is not None and acked >= 0 and check.highest_contiguous >= acked


def tcp_ok(probe: ProbeReport | None) -> bool:
    """One TCP connection spans the whole demo: its stream must be intact end to end."""
    return probe is not None and probe.tcp is not None and probe.tcp.clean


def fdb_ok(obs: Observation | None) -> bool:
    return obs is not None and obs.fdb_port == obs.expected_port


def single_copy_ok(obs: Observation | None, destination: str) -> bool:
    return obs is not None and obs.running_on == (destination,) and obs.qemu_on == (destination,)


def mem_pass_after(lines: Sequence[ConsoleLine], after: float) -> int | None:
    """The writer's pass count in its last status line before `after` (None: no line yet)."""
    found = None
    for line in lines:
        if line.at < after and isinstance(line.event, MemStatus):
            found = line.event.passes
    return found


# --- act 2: what the center did, and what it did for the guests -----------------------------------


@dataclass(frozen=True)
class Stay:
    """A VM running on a host from `start` to `end` (wall clock)."""

    vm: str
    host: str
    start: float
    end: float


def timeline(tasks: Sequence[TaskView], end: float) -> tuple[Stay, ...]:
    """Which VM ran on which host over time, from the center's finished tasks (each taken at its end):
    a start opens a stay, a migration closes it on the source and opens one on the destination, a
    stop closes it; stays still open at `end` close there. Ordered by host, then start."""
    open_: dict[str, tuple[str, float]] = {}  # vm -> (host, since)
    stays: list[Stay] = []

    def close(vm: str, at: float) -> None:
        if vm in open_:
            host, since = open_.pop(vm)
            stays.append(Stay(vm, host, since, max(since, at)))

    done = sorted((t for t in tasks if t.state is TaskState.DONE and t.ended is not None), key=lambda t: t.ended or 0.0)
    for t in done:
        at = t.ended or 0.0
        if t.kind is TaskKind.START and t.result is not None and t.result.host:
            close(t.target, at)
            open_[t.target] = (t.result.host, at)
        elif t.kind is TaskKind.MIGRATE and t.destination:
            close(t.target, at)
            open_[t.target] = (t.destination, at)
        elif t.kind is TaskKind.STOP:
            close(t.target, at)
    for vm in list(open_):
        close(vm, end)
    return tuple(sorted(stays, key=lambda x: (x.host, x.start, x.vm)))


def timeline_json(stays: Sequence[Stay], hosts: Sequence[str], t0_wall: float) -> dict[str, list[dict[str, object]]]:
    """Per host (every host named, busy or not): its VMs' stays in seconds since the probe's start."""
    out: dict[str, list[dict[str, object]]] = {h: [] for h in hosts}
    for st in stays:
        out.setdefault(st.host, []).append(
            {"vm": st.vm, "start_s": _r(st.start - t0_wall, 3), "end_s": _r(st.end - t0_wall, 3)}
        )
    return out


def work_rate(lines: Sequence[ConsoleLine], after: float, skip: int, count: int) -> float | None:
    """Work units per guest-second over `count` CPU status lines arriving after `after`, the first
    `skip` left out (the guest settling after a boot or a move); None until that many have come."""
    found = [ln.event for ln in lines if ln.at >= after and isinstance(ln.event, CpuStatus)]
    window = found[skip : skip + count]
    if count < 1 or len(window) < count:
        return None
    ms = sum(s.ms for s in window)
    return sum(s.units for s in window) * 1000 / ms if ms > 0 else None


@dataclass(frozen=True)
class WorkRate:
    """A CPU-busy VM's work rate before and after the center moved things."""

    vm: str
    host_before: str
    before: float | None
    host_after: str
    after: float | None

    @property
    def ratio(self) -> float | None:
        if self.before is None or self.after is None or self.before <= 0:
            return None
        return self.after / self.before

    def to_json(self) -> dict[str, object]:
        return {"vm": self.vm, "host_before": self.host_before, "before": _r(self.before),
                "host_after": self.host_after, "after": _r(self.after), "ratio": _r(self.ratio, 2)}


@dataclass(frozen=True)
class TaskMove:
    """One move the center ran, as its task ended."""

    task: str
    kind: str
    vm: str
    source: str | None
    destination: str | None
    state: str
    why: str
    requested_by: str
    predicted_s: float | None
    predicted_downtime_ms: float | None
    total_ms: float | None
    downtime_ms: float | None
    error: str | None
    ended: float | None

    @classmethod
    def of(cls, t: TaskView) -> TaskMove:
        r = t.result
        return cls(task=t.id, kind=t.kind.value, vm=t.target, source=t.source, destination=t.destination,
                   state=t.state.value, why=t.why, requested_by=t.requested_by, predicted_s=t.predicted_s,
                   predicted_downtime_ms=t.predicted_downtime_ms, total_ms=r.total_ms if r else None,
                   downtime_ms=r.downtime_ms if r else None, error=t.error, ended=t.ended)

    @property
    def done(self) -> bool:
        return self.state == TaskState.DONE.value

    def to_json(self, t0_wall: float) -> dict[str, object]:
        return {"task": self.task, "kind": self.kind, "vm": self.vm, "from": self.source, "to": self.destination,
                "state": self.state, "why": self.why, "requested_by": self.requested_by,
                "predicted_s": _r(self.predicted_s, 2), "predicted_downtime_ms": _r(self.predicted_downtime_ms),
                "total_ms": _r(self.total_ms), "downtime_ms": _r(self.downtime_ms), "error": self.error,
                "ended_s": None if self.ended is None else _r(self.ended - t0_wall, 3)}


def _planned(m: Move) -> dict[str, object]:
    return {"vm": m.vm, "from": m.source, "to": m.destination, "order": m.order, "why": m.why,
            "predicted_s": m.predicted_s, "predicted_downtime_ms": m.predicted_downtime_ms, "powered_off": m.powered_off}


@dataclass(frozen=True)
class Step:
    """One step of act 2: what was asked of the center, what it planned, the moves it ran and how
    they went; `migrations` are the demo VM's moves among them, with act 1's checks."""

    name: str  # drs, maintenance, move-back, health
    title: str
    host: str | None
    ok: bool
    outcome: str  # one line: what happened, or what went wrong
    started: float
    ended: float
    plan: tuple[Move, ...] = ()
    recommendations: tuple[Recommendation, ...] = ()
    moves: tuple[TaskMove, ...] = ()
    rates: tuple[WorkRate, ...] = ()
    migrations: tuple[MigrationResult, ...] = ()

    @property
    def all_ok(self) -> bool:
        return self.ok and all(m.done for m in self.moves) and all(
            m.phase == Phase.DONE.value and m.checks.all_ok for m in self.migrations)

    def to_json(self, t0_wall: float) -> dict[str, object]:
        return {
            "step": self.name, "title": self.title, "host": self.host, "ok": self.all_ok, "outcome": self.outcome,
            "start_s": _r(self.started - t0_wall, 3), "end_s": _r(self.ended - t0_wall, 3),
            "plan": [_planned(m) for m in self.plan],
            "recommendations": [{**_planned(r.move), "id": r.id, "mandatory": r.mandatory, "gain": r.gain,
                                 "cost": r.cost} for r in self.recommendations],
            "moves": [m.to_json(t0_wall) for m in self.moves],
            "work_rates": [w.to_json() for w in self.rates],
            "migrations": [m.to_json(t0_wall) for m in self.migrations],
        }


# --- the whole report -----------------------------------------------------------------------------


def dirty_rate_json(rate: int | None) -> int | str:
    """The memory writer's rate as the report says it: bytes/s, "max" (flat out) or "idle" (none)."""
    return "idle" if rate is None else "max" if rate == 0 else rate


@dataclass(frozen=True)
class DemoReport:
    lab: str
    accel: str
    encrypted: bool
    memory: int
    dirty_rate: int | None  # bytes/s; 0: flat out; None: no memory writer
    link_rate: int | None
    vm: str
    migrations: tuple[MigrationResult, ...]  # act 1's
    migrations_asked: int
    probe: ProbeReport | None
    disk: RecordCheck | None
    console_lines: int
    mem_errors: int
    mem_corrupt_lines: int
    duration_s: float
    picture: str | None
    host_cpu: float | None = None  # cores each lab host may use (None: unlimited)
    act2: tuple[Step, ...] | None = None  # None: not run
    act2_s: float | None = None
    hosts: tuple[str, ...] = ()
    timeline: tuple[Stay, ...] = ()

    @property
    def act1_ok(self) -> bool:
        return (
            len(self.migrations) == self.migrations_asked
            and all(m.phase == Phase.DONE.value and m.checks.all_ok for m in self.migrations)
        )

    @property
    def all_ok(self) -> bool:
        return self.act1_ok and (self.act2 is None or all(s.all_ok for s in self.act2))

    def to_json(self) -> str:
        t0 = self.probe.started_wall if self.probe else 0.0
        probe = None
        if self.probe is not None:
            u, t = self.probe.udp, self.probe.tcp
            probe = {
                "target": self.probe.target,
                "duration_s": round(self.probe.duration_s, 3),
                "udp": {
                    "sent": u.sent, "received": u.received, "lost": u.lost, "duplicates": u.duplicates,
                    "reordered": u.reordered, "largest_gap_ms": round(u.largest_gap.duration * 1000, 1),
                    "rtt_p50_ms": round(u.rtt_p50_ms, 3), "rtt_p99_ms": round(u.rtt_p99_ms, 3),
                },
                "tcp": None if t is None else {
                    "survived": t.survived, "error": t.error, "chunks_sent": t.chunks_sent, "chunks_ok": t.chunks_ok,
                    "lost": t.lost, "duplicated": t.duplicated, "reordered": t.reordered, "corrupted": t.corrupted,
                    "largest_stall_ms": round(t.largest_stall.duration * 1000, 1),
                },
            }
        doc = {
            "all_ok": self.all_ok,
            "act1_ok": self.act1_ok,
            "accel": self.accel,
            "encrypted": self.encrypted,
            "lab": self.lab,
            "host_cpu": self.host_cpu,
            "vm": self.vm,
            "memory": self.memory,
            "dirty_rate": dirty_rate_json(self.dirty_rate),
            "link_rate": self.link_rate,
            "migrations_asked": self.migrations_asked,
            "migrations": [m.to_json(t0) for m in self.migrations],
            "act2": None if self.act2 is None else {
                "ok": all(s.all_ok for s in self.act2),
                "duration_s": _r(self.act2_s),
                "steps": [s.to_json(t0) for s in self.act2],
            },
            "timeline": timeline_json(self.timeline, self.hosts, t0),
            "probe": probe,
            "disk": None if self.disk is None else {
                "acked": self.disk.acked, "highest_contiguous": self.disk.highest_contiguous,
                "missing": self.disk.missing, "duplicate": self.disk.duplicate, "corrupt": self.disk.corrupt,
                "ok": self.disk.ok,
            },
            "guest_memory": {"errors": self.mem_errors, "corrupt_lines": self.mem_corrupt_lines},
            "console_lines": self.console_lines,
            "duration_s": round(self.duration_s, 1),
            "picture": self.picture,
        }
        return json.dumps(doc, indent=2)


def migration_result(
    index: int,
    run: MigrationRun,
    probe: ProbeReport | None,
    lines: Sequence[ConsoleLine],
    disk: RecordCheck | None,
    *,
    memory_checked: bool = True,
    step: str = ACT1,
    task: str | None = None,
) -> MigrationResult:
    rec, s = run.record, run.record.summary
    done = rec.phase is Phase.DONE and s is not None
    end = rec.ended_at or run.window_end
    gap = None
    if probe is not None:
        gap = client_gap(probe.samples, probe.started_wall, rec.started_at, min(end + GAP_TAIL_S, run.window_end))
    checks = Checks(
        memory_ok=(done and memory_ok(lines, run.window_start, run.window_end, after=end)) if memory_checked else None,
        tcp_ok=done and tcp_ok(probe),
        disk_ok=done and disk_ok(disk, lines, run.window_end),
        fdb_ok=done and fdb_ok(run.observation),
        single_copy_ok=done and single_copy_ok(run.observation, rec.destination),
    )
    return MigrationResult(
        index=index,
        source=rec.source,
        destination=rec.destination,
        id=rec.id,
        phase=rec.phase.value,
        error=rec.error,
        total_ms=s.total_ms if s else None,
        downtime_ms=s.downtime_ms if s else None,
        pause_ms=s.pause_ms if s else None,
        client_gap_ms=gap[0] if gap else None,
        client_gap_at_s=gap[1] if gap else None,
        rounds=s.rounds if s else None,
        bytes=s.bytes if s else None,
        converged=bool(s and s.converged),
        checks=checks,
        compression=s.compression if s else None,
        phases=phase_spans(rec),
        step=step,
        task=task,
    )


def windows(starts: Sequence[float], first: float, last: float) -> list[tuple[float, float]]:
    """Each migration's window: the first from `first` (the guest ready), each up to the next
    migration's start, the last up to `last` (the end of the run)."""
    bounds = [first, *starts[1:], last]
    return list(itertools.pairwise(bounds))
