"""The demo's pure parts: route, windows, per-migration checks, the JSON report and the picture."""

import json
import xml.etree.ElementTree as ET

from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase, Summary
from kvmotion.demo import report as rpt
from kvmotion.demo.chart import MigrationMark, render_svg
from kvmotion.demo.runner import DemoOptions, route
from kvmotion.guest.cmdline import max_working_set
from kvmotion.guest.records import RecordCheck
from kvmotion.guest.serial import DiskAck, MemCorrupt, MemStatus
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
