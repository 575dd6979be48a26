"""The demo's pure parts: route, windows, per-migration checks, the dirty rate's words, act 2's
steps and work rates, the per-host timeline, the JSON report and the picture with its host lanes."""

import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest

from kvmotion.api.center import TaskKind, TaskResult, TaskState, TaskView
from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase, Summary
from kvmotion.api.operations import Move
from kvmotion.core.errors import InvalidInput
from kvmotion.demo import report as rpt
from kvmotion.demo.chart import HostLane, MigrationMark, render_svg
from kvmotion.demo.runner import DemoOptions, chart_lanes, parse_dirty_rate, route
from kvmotion.guest.cmdline import max_working_set
from kvmotion.guest.records import RecordCheck
from kvmotion.guest.serial import CpuStatus, DiskAck, MemCorrupt, MemStatus
from kvmotion.net.probe import Gap, ProbeReport, TcpResult, UdpSample, summarize_udp

T0 = 1_000_000.0  # wall clock of the probe's start


def _record(phase: Phase = Phase.DONE, start: float = T0 + 2.0, src: str = "host-a", dst: str = "host-b") -> MigrationRecord:
    times = (("check", start), ("prepare", start + 0.1), ("precopy", start + 0.4), ("switchover", start + 1.0),
             ("commit", start + 1.1), (phase.value, start + 1.2))
    summary = Summary(total_ms=900.0, downtime_ms=80.0, pause_ms=95.0, setup_ms=5.0, rounds=4, bytes=150 << 20,
                      zero_pages=1, normal_pages=2, mean_link_rate=1e9, peak_dirty_rate=5e7, throttle_max=0.0,
                      encrypted=False, converged=True, postcopy=False) if phase is Phase.DONE else None
    return MigrationRecord(id="m1", vm="web1", source=src, destination=dst, options=MigrationOptions(), phase=phase,
                           started_at=start, ended_at=start + 1.2, summary=summary, phase_times=times,
                           error=None if phase is Phase.DONE else "boom")


def _samples(duration: float, outage: tuple[float, float]) -> tuple[UdpSample, ...]:
    n = int(duration * 1000)
    return tuple(
        UdpSample(k, k / 1000, None if outage[0] <= k / 1000 < outage[1] else 0.0005) for k in range(n)
    )


def _probe(samples, clean: bool = True) -> ProbeReport:
    tcp = TcpResult(connected=True, survived=clean, error=None if clean else "reset", chunks_sent=10, chunks_ok=10,
                    lost=0, duplicated=0, reordered=0, corrupted=0, largest_stall=Gap(0, 0.1))
    return ProbeReport(target="10.0.0.1:7000", interval_s=0.001, started_wall=T0, started_mono=0.0,
                       duration_s=samples[-1].t_send, send_lateness_max_s=0.0, scheduling="normal",
                       udp=summarize_udp(samples), tcp=tcp, samples=samples)


def _obs(port: str = "b-vm", running=("host-b",), qemu=("host-b",)) -> rpt.Observation:
    return rpt.Observation(fdb_port=port, expected_port="b-vm", running_on=tuple(running), qemu_on=tuple(qemu))


def _lines(*items):
    return [rpt.ConsoleLine(at=T0 + at, host="host-b", event=ev) for at, ev in items]


GOOD_LINES = _lines((1.0, MemStatus(10, 1, 0)), (2.5, DiskAck(7)), (4.0, MemStatus(20, 3, 0)), (4.5, DiskAck(15)))


def test_route_cycles_through_the_hosts():
    assert route(4) == [("host-a", "host-b"), ("host-b", "host-c"), ("host-c", "host-a"), ("host-a", "host-b")]
    assert route(1, hosts=2) == [("host-a", "host-b")]


def test_windows_run_from_ready_to_next_start_to_the_end():
    assert rpt.windows([10.0, 20.0, 30.0], 5.0, 40.0) == [(5.0, 20.0), (20.0, 30.0), (30.0, 40.0)]


def test_mem_wss_is_a_quarter_of_ram_capped():
    opts = DemoOptions(memory=256 << 20, dirty_rate=1, link_rate=None, migrations=1, encrypted=False, report=None)  # type: ignore[arg-type]
    assert opts.mem_wss == 64 << 20
    assert DemoOptions(200 << 20, 1, None, 1, False, None).mem_wss == 50 << 20  # type: ignore[arg-type]
    assert DemoOptions(4 << 30, 1, None, 1, False, None).mem_wss == 64 << 20  # type: ignore[arg-type]
    small = DemoOptions(128 << 20, 1, None, 1, False, None)  # type: ignore[arg-type]
    assert 0 < small.mem_wss <= max_working_set(128 << 20)


def test_phase_spans_end_where_the_next_phase_begins():
    spans = rpt.phase_spans(_record())
    assert [s.phase for s in spans] == ["prepare", "precopy", "switchover", "commit"]
    assert spans[1].start == T0 + 2.4 and spans[1].end == T0 + 3.0
    assert spans[-1].end == T0 + 3.2


def test_client_gap_is_the_largest_gap_in_the_window():
    samples = _samples(6.0, (3.0, 3.25))
    ms, at = rpt.client_gap(samples, T0, T0 + 2.0, T0 + 4.0)
    assert 249 <= ms <= 252 and 2.99 <= at <= 3.0
    # a window outside the probe's timeline has no figure
    assert rpt.client_gap(samples, T0, T0 + 10, T0 + 11) is None


def test_memory_ok_needs_clean_status_after_the_migration():
    assert rpt.memory_ok(GOOD_LINES, T0, T0 + 5, after=T0 + 3)
    assert not rpt.memory_ok(GOOD_LINES, T0, T0 + 5, after=T0 + 4.5)  # writer silent since
    bad = GOOD_LINES + _lines((4.2, MemCorrupt(page=3, expected=9, found=2, word=0)))
    assert not rpt.memory_ok(bad, T0, T0 + 5, after=T0 + 3)
    errs = GOOD_LINES + _lines((4.8, MemStatus(30, 4, 1)))
    assert not rpt.memory_ok(errs, T0, T0 + 5, after=T0 + 3)
    # a corruption in another migration's window is not this one's
    assert rpt.memory_ok(bad, T0, T0 + 4.1, after=T0 + 3)


def test_disk_ok_compares_the_disk_with_what_was_acked_by_then():
    check = RecordCheck(acked=15, run=1, highest_contiguous=10, missing=5, duplicate=0, corrupt=0)
    assert rpt.disk_ok(check, GOOD_LINES, until=T0 + 3)  # 7 acked by then, 0..10 intact
    assert not rpt.disk_ok(check, GOOD_LINES, until=T0 + 5)  # 15 acked, 11..15 lost
    assert not rpt.disk_ok(check, GOOD_LINES, until=T0 + 1)  # nothing acked yet: the writer never ran
    assert not rpt.disk_ok(None, GOOD_LINES, until=T0 + 5)
    assert rpt.highest_ack(GOOD_LINES) == 15


def test_fdb_and_single_copy():
    assert rpt.fdb_ok(_obs()) and not rpt.fdb_ok(_obs(port="a-vm")) and not rpt.fdb_ok(_obs(port=None))
    assert rpt.single_copy_ok(_obs(), "host-b")
    assert not rpt.single_copy_ok(_obs(running=("host-a", "host-b")), "host-b")
    assert not rpt.single_copy_ok(_obs(qemu=("host-b", "host-b")), "host-b")
    assert not rpt.single_copy_ok(_obs(), "host-c")


def test_mem_pass_after():
    assert rpt.mem_pass_after(GOOD_LINES, T0 + 0.5) is None
    assert rpt.mem_pass_after(GOOD_LINES, T0 + 4.1) == 3


def _report(results, probe, migrations_asked=None) -> rpt.DemoReport:
    return rpt.DemoReport(lab="demo1", accel="tcg", encrypted=False, memory=256 << 20, dirty_rate=50_000_000,
                          link_rate=None, vm="web1", migrations=tuple(results),
                          migrations_asked=migrations_asked or len(results), probe=probe,
                          disk=RecordCheck(acked=15, run=1, highest_contiguous=15, missing=0, duplicate=0, corrupt=0),
                          console_lines=4, mem_errors=0, mem_corrupt_lines=0, duration_s=42.0, picture="/tmp/x.svg")


def test_a_clean_migration_reports_every_figure_and_check():
    probe = _probe(_samples(6.0, (3.0, 3.2)))
    disk = RecordCheck(acked=15, run=1, highest_contiguous=15, missing=0, duplicate=0, corrupt=0)
    run = rpt.MigrationRun(_record(), _obs(), window_start=T0 + 0.5, window_end=T0 + 6.0)
    res = rpt.migration_result(1, run, probe, GOOD_LINES, disk)
    assert res.checks.all_ok, res.checks
    assert 199 <= res.client_gap_ms <= 202
    doc = json.loads(_report([res], probe).to_json())
    assert doc["all_ok"] is True and doc["accel"] == "tcg"
    m = doc["migrations"][0]
    for key in ("from", "to", "total_ms", "downtime_ms", "pause_ms", "client_gap_ms", "rounds", "bytes", "converged"):
        assert m[key] is not None, key
    assert m["from"] == "host-a" and m["to"] == "host-b" and m["rounds"] == 4
    assert set(m["checks"]) == {"memory_ok", "tcp_ok", "disk_ok", "fdb_ok", "single_copy_ok"}
    assert m["phases"][1] == {"phase": "precopy", "start_s": 2.4, "end_s": 3.0}


def test_failed_migration_broken_tcp_or_missing_hops_fail_the_report():
    probe = _probe(_samples(6.0, (3.0, 3.2)))
    disk = RecordCheck(acked=15, run=1, highest_contiguous=15, missing=0, duplicate=0, corrupt=0)
    failed = rpt.migration_result(1, rpt.MigrationRun(_record(Phase.FAILED), None, T0, T0 + 6), probe, GOOD_LINES, disk)
    assert not any(failed.checks.to_json().values()) and failed.total_ms is None
    assert not _report([failed], probe).all_ok
    good_run = rpt.MigrationRun(_record(), _obs(), T0 + 0.5, T0 + 6.0)
    broken = rpt.migration_result(1, good_run, _probe(probe.samples, clean=False), GOOD_LINES, disk)
    assert broken.checks.failed() == ("tcp_ok",)
    good = rpt.migration_result(1, good_run, probe, GOOD_LINES, disk)
    assert _report([good], probe).all_ok
    assert not _report([good], probe, migrations_asked=3).all_ok


def test_picture_is_svg_with_the_phases_and_gaps():
    samples = _samples(6.0, (3.0, 3.2))
    mark = MigrationMark("1  a→b", (("precopy", 2.4, 3.0), ("switchover", 3.0, 3.1)), gap_start=3.0, gap_ms=200.0)
    svg = render_svg(samples, [mark], "title", "subtitle")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text for t in root.iter(f"{ns}title")]
    assert "1  a→b: precopy 600 ms" in titles and "1  a→b: client gap 200 ms" in titles
    texts = "".join(t.text or "" for t in root.iter(f"{ns}text"))
    assert "client gap 200 ms" in texts
    # an empty timeline still renders
    ET.fromstring(render_svg([], [], "t", "s"))


# ---- the dirty rate's words, act 2's pieces, the timeline and its lanes ----------------------------------


def test_dirty_rate_takes_idle_and_max_and_refuses_a_bare_zero():
    assert parse_dirty_rate("idle") is None and parse_dirty_rate(" IDLE ") is None
    assert parse_dirty_rate("max") == 0
    assert parse_dirty_rate("50M") == 50_000_000
    for zero in ("0", "0M"):
        with pytest.raises(InvalidInput, match=r"idle .* or max"):
            parse_dirty_rate(zero)
    assert rpt.dirty_rate_json(None) == "idle" and rpt.dirty_rate_json(0) == "max" and rpt.dirty_rate_json(7) == 7


def test_without_a_memory_writer_the_memory_check_is_not_run_and_does_not_fail():
    probe = _probe(_samples(6.0, (3.0, 3.2)))
    disk = RecordCheck(acked=15, run=1, highest_contiguous=15, missing=0, duplicate=0, corrupt=0)
    lines = [ln for ln in GOOD_LINES if not isinstance(ln.event, MemStatus)]
    run = rpt.MigrationRun(_record(), _obs(), window_start=T0 + 0.5, window_end=T0 + 6.0)
    res = rpt.migration_result(1, run, probe, lines, disk, memory_checked=False)
    assert res.checks.memory_ok is None and res.checks.all_ok and res.checks.failed() == ()
    assert rpt.migration_result(1, run, probe, lines, disk).checks.failed() == ("memory_ok",)
    doc = json.loads(dataclasses.replace(_report([res], probe), dirty_rate=None).to_json())
    assert doc["all_ok"] is True and doc["dirty_rate"] == "idle"
    assert doc["migrations"][0]["checks"]["memory_ok"] is None


def _task(tid: str, kind: TaskKind, vm: str, ended: float, *, src=None, dst=None, host=None,
          state=TaskState.DONE, why="") -> TaskView:
    result = TaskResult(host=host or dst, migration="m" + tid if kind is TaskKind.MIGRATE else None,
                        total_ms=1500.0 if kind is TaskKind.MIGRATE else None)
    return TaskView(id=tid, kind=kind, target=vm, state=state, created=ended - 2, started=ended - 1.5, ended=ended,
                    result=result, requested_by="user:admin", source=src, destination=dst, why=why)


TASKS = [
    _task("1", TaskKind.START, "web1", T0 - 1, host="host-a"),
    _task("2", TaskKind.MIGRATE, "web1", T0 + 5, src="host-a", dst="host-b"),
    _task("3", TaskKind.START, "busy1", T0 + 6, host="host-b"),
    _task("4", TaskKind.MIGRATE, "busy1", T0 + 9, src="host-b", dst="host-c", state=TaskState.FAILED),
    _task("5", TaskKind.MIGRATE, "busy1", T0 + 12, src="host-b", dst="host-c", why="DRS"),
    _task("6", TaskKind.STOP, "web1", T0 + 20, host="host-b"),
]


def test_timeline_follows_the_tasks_ends():
    stays = rpt.timeline(list(reversed(TASKS)), end=T0 + 30)  # the center lists newest first
    assert [(s.host, s.vm, s.start - T0, s.end - T0) for s in stays] == [
        ("host-a", "web1", -1, 5),
        ("host-b", "web1", 5, 20),  # stopped
        ("host-b", "busy1", 6, 12),  # the failed move changed nothing
        ("host-c", "busy1", 12, 30),  # still running at the end
    ]
    doc = rpt.timeline_json(stays, ("host-a", "host-b", "host-c", "host-d"), T0)
    assert doc["host-d"] == [] and doc["host-c"] == [{"vm": "busy1", "start_s": 12.0, "end_s": 30.0}]
    lanes = chart_lanes(stays, ("host-a", "host-b", "host-c"), T0)
    assert [lane.host for lane in lanes] == ["host-a", "host-b", "host-c"]
    assert sorted(lanes[1].stays) == [("busy1", 6.0, 12.0), ("web1", 5.0, 20.0)]


def test_work_rate_skips_the_settling_lines_and_needs_a_full_window():
    lines = [rpt.ConsoleLine(at=T0 + k, host="host-a", event=CpuStatus(units=100 * (k + 1), ms=1000, total=0, workers=1))
             for k in range(6)]
    assert rpt.work_rate(lines, T0, skip=2, count=3) == (300 + 400 + 500) * 1000 / 3000
    assert rpt.work_rate(lines, T0 + 3, skip=2, count=3) is None  # only three lines since
    assert rpt.work_rate(lines, T0 + 0.5, skip=0, count=1) == 200.0
    w = rpt.WorkRate("busy1", "host-a", 400.0, "host-b", 1000.0)
    assert w.ratio == 2.5 and w.to_json()["ratio"] == 2.5
    assert rpt.WorkRate("busy1", "host-a", None, "host-b", 1000.0).ratio is None


def test_act2_in_the_report_json_and_its_verdict():
    probe = _probe(_samples(6.0, (3.0, 3.2)))
    disk = RecordCheck(acked=15, run=1, highest_contiguous=15, missing=0, duplicate=0, corrupt=0)
    act1 = rpt.migration_result(1, rpt.MigrationRun(_record(), _obs(), T0 + 0.5, T0 + 6.0), probe, GOOD_LINES, disk)
    moved = rpt.migration_result(2, rpt.MigrationRun(_record(src="host-c", dst="host-b"), _obs(), T0 + 0.5, T0 + 6.0),
                                 probe, GOOD_LINES, disk, step="maintenance", task="2")
    plan = (Move(vm="web1", source="host-a", destination="host-b", order=1, why="host-a enters maintenance",
                 predicted_s=3.2, predicted_downtime_ms=120.0),)
    rate = rpt.WorkRate("busy1", "host-a", 400.0, "host-c", 1000.0)
    drs = rpt.Step("drs", "DRS", "host-a", True, "1 move(s) applied", T0 + 1, T0 + 2,
                   moves=(rpt.TaskMove.of(TASKS[4]),), rates=(rate,))
    maint = rpt.Step("maintenance", "enter", "host-a", True, "host-a maintenance", T0 + 2, T0 + 4, plan=plan,
                     moves=(rpt.TaskMove.of(TASKS[1]),), migrations=(moved,))
    stays = rpt.timeline(TASKS, T0 + 30)
    rep = dataclasses.replace(_report([act1], probe), act2=(drs, maint), act2_s=40.0, hosts=("host-a", "host-b"),
                              timeline=stays, host_cpu=1.0)
    doc = json.loads(rep.to_json())
    assert doc["all_ok"] is True and doc["act2"]["ok"] is True and doc["host_cpu"] == 1.0
    assert [m["step"] for m in doc["migrations"]] == ["act 1"]  # act 1's list is act 1's alone
    d, m = doc["act2"]["steps"]
    assert d["work_rates"] == [{"vm": "busy1", "host_before": "host-a", "before": 400.0, "host_after": "host-c",
                                "after": 1000.0, "ratio": 2.5}]
    assert d["moves"][0]["from"] == "host-b" and d["moves"][0]["why"] == "DRS" and d["moves"][0]["ended_s"] == 12.0
    assert m["plan"][0]["why"] == "host-a enters maintenance" and m["plan"][0]["predicted_downtime_ms"] == 120.0
    assert m["migrations"][0]["step"] == "maintenance" and m["migrations"][0]["task"] == "2"
    assert set(doc["timeline"]) == {"host-a", "host-b", "host-c"}
    # a step that failed, or a failed check on one of act 2's moves, fails the run; act 1 alone still holds
    broken = dataclasses.replace(maint, migrations=(dataclasses.replace(moved, checks=dataclasses.replace(
        moved.checks, fdb_ok=False)),))
    assert not dataclasses.replace(rep, act2=(drs, broken)).all_ok
    assert not dataclasses.replace(rep, act2=(dataclasses.replace(drs, ok=False),)).all_ok
    assert dataclasses.replace(rep, act2=(dataclasses.replace(drs, ok=False),)).act1_ok
    failed_move = dataclasses.replace(drs, moves=(rpt.TaskMove.of(TASKS[3]),))
    assert not failed_move.all_ok


def test_picture_has_a_lane_per_host_below_the_chart():
    samples = _samples(6.0, (3.0, 3.2))
    lanes = [HostLane("host-a", (("web1", -1.0, 2.0), ("busy1", 1.0, 5.0))), HostLane("host-b", (("web1", 2.0, 8.0),)),
             HostLane("host-c", ())]
    svg = render_svg(samples, [], "title", "subtitle", lanes=lanes)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert int(root.get("height")) > 480  # the lanes add room below the chart
    stays = [r for r in root.iter(f"{ns}rect") if r.get("class") == "stay"]
    assert len(stays) == 3
    titles = [t.text for t in root.iter(f"{ns}title")]
    assert "web1 on host-b: 2.0–8.0 s" in titles and "busy1 on host-a: 1.0–5.0 s" in titles
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert {"host-a", "host-b", "host-c"} <= set(texts)
    # the lane's time axis is the chart's: the stay that ends last reaches the plot's right edge
    b = next(r for r in stays if "host-b" in (r.find(f"{ns}title").text or ""))
    assert abs(float(b.get("x")) + float(b.get("width")) - (1200 - 24)) < 1
    # two VMs on one host share its lane in rows of their own
    a = [r for r in stays if "host-a" in (r.find(f"{ns}title").text or "")]
    assert len({r.get("y") for r in a}) == 2
    assert int(ET.fromstring(render_svg(samples, [], "t", "s")).get("height")) == 480


def test_labels_of_migrations_close_together_stagger():
    samples = _samples(100.0, (3.0, 3.2))
    marks = [MigrationMark(f"{k}  a→b", (("precopy", t, t + 1.0),), gap_start=None, gap_ms=None)
             for k, t in ((1, 2.0), (2, 4.0), (3, 60.0))]
    root = ET.fromstring(render_svg(samples, marks, "t", "s"))
    ys = {t.text: float(t.get("y")) for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text and "a→b" in t.text}
    assert ys["1  a→b"] != ys["2  a→b"] and ys["3  a→b"] == ys["1  a→b"]
