"""Live migration in a lab: a memory-writing guest back and forth, a client's TCP stream and UDP
probes across migrations, the physical switch re-learning the VM's MAC, and round trips encrypted
and plain as the cluster's policy says.

Figures (pause, downtime, gaps, FDB delay) are printed as `FIGURES ...` lines (pytest -s) and
recorded as properties for the junit report.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvmotion.net.probe import ProbeReport, largest_gap
from tests.integration.lab_fixture import MigrationLab

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

ECHO_PORT = 7000


def _other(host: str) -> str:
    return "host-b" if host == "host-a" else "host-a"


def _phase_time(rec: dict, phase: str) -> float:
    return dict((p, t) for p, t in rec["phase_times"])[phase]


def _assert_done(rec: dict) -> None:
    assert rec["_returncode"] == 0 and rec["phase"] == "done", (
        f"migration {rec['source']} -> {rec['destination']} {rec['phase']}: {rec.get('error')} {rec['_stderr']}"
    )
    assert rec["summary"] is not None and rec["summary"]["converged"]


def _assert_only_on(lab: MigrationLab, vm: str, host: str) -> None:
    """`vm list` shows one running copy, on `host`, and only `host` has a QEMU for it."""
    assert lab.listed(vm) == [(host, "running")]
    assert lab.wait_qemu_hosts(vm, [host]) == [host], lab.qemu_pids(vm)


class ProbeRun:
    """The client probe against a VM's echo service, in the lab's client namespace."""

    def __init__(self, lab: MigrationLab, vm_k: int, folder: Path, *extra: str) -> None:
        self.out = folder / "probe.json"
        self.log = folder / "probe.log"
        self.proc = lab.start_probe(f"{lab.topo.vm_ip(vm_k)}:{ECHO_PORT}", self.out, self.log, *extra)
        deadline = time.monotonic() + 15
        while "probe: running" not in (self.log.read_text(errors="replace") if self.log.exists() else ""):
            assert self.proc.poll() is None, f"probe exited: {self.log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, "probe did not connect within 15 s"
            time.sleep(0.05)

    def stop(self) -> ProbeReport:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the probe did not finish within 20 s of SIGTERM") from None
        assert self.proc.returncode == 0, self.log.read_text(errors="replace")
        return ProbeReport.from_json(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.mark.slow
def test_memory_writer_ten_migrations(lab, record_property):
    """512 MiB guest rewriting 256 MiB at 100 MB/s, a->b->a ... ten times: its counter keeps
    increasing on whichever host runs it, its self-check finds no corrupt page, one copy runs."""
    vm = "mem1"
    lab.create_vm(vm, "host-a", memory="512M", workload="echo,mem", mem_wss="256M", mem_rate="100M")
    offsets = {"host-a": 0, "host-b": 0}
    first = lab.wait_mem_status("host-a", vm, 0, count=2)
    assert len(first.statuses) >= 2, "the memory writer printed no status lines"
    history = list(first.statuses)  # every status line, in the order the guest printed them
    offsets["host-a"] = first.end
    where = "host-a"
    figures = []
    for i in range(10):
        dest = _other(where)
        rec = lab.migrate(vm, dest)
        _assert_done(rec)
        _assert_only_on(lab, vm, dest)
        # What the source printed until it paused, then what the destination prints after resume.
        src = lab.mem_log(where, vm, offsets[where])
        offsets[where] = src.end
        arrived = lab.wait_mem_status(dest, vm, offsets[dest], count=1)
        assert arrived.statuses, f"migration {i + 1}: no MEM status on {dest} after resume"
        offsets[dest] = arrived.end
        for log in (src, arrived):
            assert not log.corrupt, f"migration {i + 1}: corrupt pages {log.corrupt[:3]}"
        seqs = [s.seq for s in history + list(src.statuses) + list(arrived.statuses)]
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"migration {i + 1}: counter not increasing: {seqs[-6:]}"
        history += list(src.statuses) + list(arrived.statuses)
        assert all(s.errors == 0 for s in history), f"migration {i + 1}: self-check errors {history[-1]}"
        s = rec["summary"]
        figures.append((where, dest, s["total_ms"], s["downtime_ms"], s["pause_ms"], s["rounds"]))
        where = dest
    # Every page written before the last migration is checked again before it is rewritten: wait
    # for two more full passes so the whole working set has been verified on the last host.
    passes = history[-1].passes
    deadline = time.monotonic() + 20
    while history[-1].passes < passes + 2:
        assert time.monotonic() < deadline, f"the memory writer stopped passing: {history[-1]}"
        more = lab.wait_mem_status(where, vm, offsets[where], count=1, timeout=5)
        offsets[where] = more.end
        assert not more.corrupt, f"corrupt pages after the last migration: {more.corrupt[:3]}"
        history += list(more.statuses)
    assert all(s.errors == 0 for s in history), history[-1]
    seqs = [s.seq for s in history]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    _assert_only_on(lab, vm, where)
    pauses = [f[4] for f in figures]
    downs = [f[3] for f in figures]
    line = (
        f"FIGURES mem 512M/256M@100MB/s x10: total_ms {[round(f[2]) for f in figures]} "
        f"downtime_ms {downs} pause_ms {[round(p, 1) for p in pauses]} rounds {[f[5] for f in figures]}; "
        f"final seq={history[-1].seq} passes={history[-1].passes} errors={history[-1].errors}"
    )
    print(line)
    record_property("figures", line)


@pytest.mark.slow
def test_client_tcp_stream_survives_migrations(lab, tmp_path, record_property):
    """A client's numbered TCP stream to the guest's echo service comes through ten migrations in a
    row, back and forth (guest dirtying 64 MiB at 20 MB/s), without a lost, duplicated, reordered or
    corrupted byte."""
    vm = "echo1"
    lab.create_vm(vm, "host-a", memory="256M", workload="echo,mem", mem_wss="64M", mem_rate="20M")
    probe = ProbeRun(lab, 0, tmp_path)
    recs = []
    try:
        time.sleep(0.5)
        for dest in ("host-b", "host-a") * 5:
            rec = lab.migrate(vm, dest)
            _assert_done(rec)
            recs.append(rec)
            time.sleep(0.5)
        report = probe.stop()
    finally:
        probe.kill()
    _assert_only_on(lab, vm, "host-a")
    tcp = report.tcp
    assert tcp is not None and tcp.connected
    assert tcp.survived, f"the TCP connection broke: {tcp.error}"
    assert (tcp.lost, tcp.duplicated, tcp.reordered, tcp.corrupted) == (0, 0, 0, 0), report.summary_line()
    assert tcp.chunks_ok == tcp.chunks_sent > 0
    assert report.udp.received > 0.9 * report.udp.sent, report.summary_line()
    gaps = [_gap_around(report, rec) for rec in recs]
    line = (
        f"FIGURES tcp x10 (256M, 64M@20MB/s): {report.summary_line()}; per-migration UDP gap ms "
        f"{[round(g * 1000, 1) for g in gaps]}; pause_ms {[round(r['summary']['pause_ms'], 1) for r in recs]}"
    )
    print(line)
    record_property("figures", line)


def _gap_around(report: ProbeReport, rec: dict) -> float:
    """Largest UDP reply gap (s) from the migration's switchover to 1 s after it finished."""
    start = _phase_time(rec, "switchover") - report.started_wall
    end = _phase_time(rec, "done") - report.started_wall + 1.0
    return largest_gap(report.samples, start, min(end, report.samples[-1].t_send)).duration


def test_switch_relearns_mac_soon_after_resume(lab, tmp_path, record_property):
    """The physical switch moves the VM's MAC to the destination's port within 100 ms of the
    destination's resume, and an idle guest's UDP probes see no gap of 200 ms or more."""
    vm = "idle1"
    lab.create_vm(vm, "host-a", memory="256M", workload="echo")
    mac = lab.mac(0)
    probe = ProbeRun(lab, 0, tmp_path, "--no-tcp")
    rows = []
    try:
        time.sleep(0.5)
        assert lab.fdb_port(mac) == lab.switch_port_of("host-a")
        for src, dest in (("host-a", "host-b"), ("host-b", "host-a")):
            with lab.fdb_watch(mac) as watch:
                rec = lab.migrate(vm, dest)
                time.sleep(0.3)
            _assert_done(rec)
            resumed_at = lab.vm_record(dest, vm).resumed_at
            assert resumed_at is not None
            port = lab.switch_port_of(dest)
            moved = watch.first_on(port, after=_phase_time(rec, "precopy"))
            assert moved is not None, f"the switch never learned {mac} on {port}: last {watch.samples[-1:]}"
            assert watch.samples[-1].port == port, f"{mac} moved away from {port} again: {watch.samples[-1]}"
            # stamped when the bridge notified the move (netlink), not by polling
            rows.append((src, dest, (moved.at - resumed_at) * 1000, rec["summary"]["pause_ms"]))
        report = probe.stop()
    finally:
        probe.kill()
    gap = report.udp.largest_gap.duration
    line = (
        "FIGURES fdb (idle 256M): "
        + "; ".join(f"{s}->{d}: the switch moved the MAC to the new port {dl:+.1f} ms after resume "
                    f"(pause {p:.1f} ms)" for s, d, dl, p in rows)
        + f"; UDP largest gap {gap * 1000:.1f} ms; {report.summary_line()}"
    )
    print(line)
    record_property("figures", line)
    for src, dest, delay_ms, *_ in rows:
        assert delay_ms < 100, f"{src}->{dest}: the switch learned the MAC {delay_ms:.1f} ms after resume"
    assert gap < 0.2, f"largest UDP gap {gap * 1000:.1f} ms (bar: < 200 ms)"


@pytest.mark.parametrize("encrypted", [True, False], ids=["tls", "plain"])
def test_round_trip_tls_or_plain(make_lab, tmp_path, record_property, encrypted):
    """A guest goes a->b->a with its TCP client intact; the stream is TLS (each QEMU with its own
    qemu:HOST identity, the destination admitting only the source's) exactly when the cluster's
    policy says encrypted: a lab set up plain migrates plain."""
    lab = make_lab(encrypted=encrypted)
    vm = "tls1"
    lab.create_vm(vm, "host-a", memory="256M", workload="echo,mem", mem_wss="64M", mem_rate="20M")
    checks = {c["name"]: c["level"] for c in lab.cli_json("migrate", vm, "--to", "host-b", "--check")}
    assert checks["encryption"] == ("pass" if encrypted else "warning"), checks
    probe = ProbeRun(lab, 0, tmp_path)
    recs = []
    try:
        for dest in ("host-b", "host-a"):
            rec = lab.migrate(vm, dest)
            _assert_done(rec)
            assert rec["encrypted"] is encrypted and rec["summary"]["encrypted"] is encrypted
            assert "encrypted" not in rec["options"]  # the cluster's policy, not a caller's option
            recs.append(rec)
        report = probe.stop()
    finally:
        probe.kill()
    _assert_only_on(lab, vm, "host-a")
    assert report.tcp is not None and report.tcp.clean, report.summary_line()
    line = (f"FIGURES {'tls' if encrypted else 'plain'} x2: total_ms {[round(r['summary']['total_ms']) for r in recs]} "
            f"pause_ms {[round(r['summary']['pause_ms'], 1) for r in recs]}; {report.summary_line()}")
    print(line)
    record_property("figures", line)
