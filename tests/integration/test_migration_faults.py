"""Faults during pre-copy: the destination's QEMU or agent dies. The VM must end up running on
exactly one host (the source), the destination must be cleaned up, and the error must say what
happened."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.lab_fixture import MigrationLab

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

SLOW_LINK = 20_000_000  # bytes/s: pre-copy of a guest dirtying memory flat out lasts seconds
VM = "busy1"


def _busy_lab(make_lab) -> tuple[MigrationLab, int]:
    lab = make_lab(link_rate=SLOW_LINK)
    lab.create_vm(VM, "host-a", workload="echo,mem", mem_wss="128M", mem_rate="0")
    log = lab.wait_mem_status("host-a", VM, 0, count=1)
    assert log.statuses, "the memory writer printed no status"
    return lab, log.statuses[-1].seq


def _assert_kept_on_source(lab: MigrationLab, rec: dict, seq_before: int, phase: str = "failed") -> None:
    """Failed (or cancelled), one running copy on host-a, nothing left on host-b, the guest still writing."""
    assert rec["phase"] == phase and rec["_returncode"] != 0, rec
    assert "keeps running on host-a" in rec["error"], rec["error"]
    lines = [ln for ln in rec["_stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in rec["_stderr"], rec["_stderr"]
    assert lab.listed(VM) == [("host-a", "running")]
    assert lab.wait_qemu_hosts(VM, ["host-a"]) == ["host-a"], lab.qemu_pids(VM)
    assert lab.vm_record("host-b", VM) is None
    offset = lab.mem_log("host-a", VM).end
    after = lab.wait_mem_status("host-a", VM, offset, count=2)
    assert len(after.statuses) >= 2 and not after.corrupt
    assert seq_before < after.statuses[0].seq < after.statuses[-1].seq
    assert all(s.errors == 0 for s in after.statuses)


def test_destination_qemu_killed_during_precopy(make_lab, record_property):
    lab, seq = _busy_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM)
        shadow = lab.qemu_pids(VM)["host-b"]
        assert len(shadow) == 1, f"no shadow QEMU on host-b: {lab.qemu_pids(VM)}"
        t_kill = time.time()
        os.kill(shadow[0], signal.SIGKILL)
        rec = lab.finish_migrate(mig, timeout=60)
    finally:
        if mig.poll() is None:
            mig.kill()
    _assert_kept_on_source(lab, rec, seq)
    assert "shadow VM on host-b is gone" in rec["error"], rec["error"]
    line = (f"FIGURES kill destination QEMU in pre-copy: failed {(dict(rec['phase_times'])['failed'] - t_kill) * 1000:.0f} ms "
            f"after the kill; error: {rec['error']}")
    print(line)
    record_property("figures", line)


def test_destination_agent_killed_during_precopy_then_restarted(make_lab, record_property):
    lab, seq = _busy_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM)
        lab.kill_agent("host-b")
        # The shadow's QEMU outlives its agent and keeps receiving: the source cannot tell yet.
        time.sleep(1.0)
        assert lab.migration_of("host-a", VM)["phase"] == "precopy"
        assert len(lab.qemu_pids(VM)["host-b"]) == 1
        t_restart = time.time()
        # It must destroy the shadow it finds uncommitted, having the source cancel first (a source
        # QEMU 10.0 can abort when its TLS stream's sockets die under it: qemu/cancel.py).
        lab.start_agent("host-b")
        rec = lab.finish_migrate(mig, timeout=60)
    finally:
        if mig.poll() is None:
            mig.kill()
    _assert_kept_on_source(lab, rec, seq, phase="cancelled")
    assert "cancelled by host-b, which gave up its shadow VM" in rec["error"], rec["error"]
    assert [v for v in lab.agent("host-b").vms()] == []
    line = (f"FIGURES kill destination agent in pre-copy, restart it: cancelled "
            f"{(dict(rec['phase_times'])['cancelled'] - t_restart) * 1000:.0f} ms after the restart began; error: {rec['error']}")
    print(line)
    record_property("figures", line)


def test_destination_qemu_frozen_during_precopy(make_lab, record_property):
    """A stalled stream (the shadow's QEMU frozen by SIGSTOP): the source gives up after its stall
    timeout, says so, and the destination's agent destroys the frozen shadow."""
    lab, seq = _busy_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM)
        shadow = lab.qemu_pids(VM)["host-b"]
        assert len(shadow) == 1, f"no shadow QEMU on host-b: {lab.qemu_pids(VM)}"
        t_stop = time.time()
        os.kill(shadow[0], signal.SIGSTOP)
        rec = lab.finish_migrate(mig, timeout=90)
    finally:
        if mig.poll() is None:
            mig.kill()
    _assert_kept_on_source(lab, rec, seq)
    assert "no data reached host-b" in rec["error"] and "stalled" in rec["error"], rec["error"]
    assert "destination cleanup" not in rec["error"], rec["error"]  # host-b answered and destroyed the shadow
    line = (f"FIGURES freeze destination QEMU in pre-copy: failed {(dict(rec['phase_times'])['failed'] - t_stop):.1f} s "
            f"after SIGSTOP; error: {rec['error']}")
    print(line)
    record_property("figures", line)


def test_link_cut_during_precopy(make_lab, record_property):
    """The destination's uplink is cut during pre-copy: the source detects the stall and keeps the
    VM; it cannot reach the destination to clean up, so once the link is back the destination's
    agent learns the migration failed and destroys its shadow by itself."""
    lab, seq = _busy_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM)
        t_cut = time.time()
        lab.set_mgmt_link("host-b", up=False)
        rec = lab.finish_migrate(mig, timeout=120)
        t_failed = dict(rec["phase_times"])["failed"]
        assert len(lab.qemu_pids(VM)["host-b"]) == 1  # unreachable: the shadow is still there
    finally:
        lab.set_mgmt_link("host-b", up=True)
        if mig.poll() is None:
            mig.kill()
    assert "stalled" in rec["error"] and "agent on host-b does not answer" in rec["error"], rec["error"]
    assert "destination cleanup" in rec["error"], rec["error"]
    t_back = time.time()
    assert lab.wait_qemu_hosts(VM, ["host-a"], timeout=20) == ["host-a"], lab.qemu_pids(VM)
    t_clean = time.time()
    _assert_kept_on_source(lab, rec, seq)
    assert "destroying its uncommitted shadow" in lab.agent_log("host-b")
    line = (f"FIGURES cut host-b's link in pre-copy: failed {t_failed - t_cut:.1f} s after the cut; shadow destroyed "
            f"{t_clean - t_back:.1f} s after the link came back; error: {rec['error']}")
    print(line)
    record_property("figures", line)


def test_destination_agent_dead_at_commit(make_lab, record_property):
    """The destination's agent dies during pre-copy and stays dead: QEMU completes the stream, but
    nobody commits. The source retries, gives up, resumes its own (complete) copy, and the
    restarted destination agent destroys the shadow that was never committed."""
    lab = make_lab(link_rate=SLOW_LINK)
    lab.create_vm(VM, "host-a", workload="echo,mem", mem_wss="16M", mem_rate="5M")
    seq = lab.wait_mem_status("host-a", VM, 0, count=1).statuses[-1].seq
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM, min_bytes=1 << 20)
        lab.kill_agent("host-b")
        t_kill = time.time()
        rec = lab.finish_migrate(mig, timeout=90)
    finally:
        if mig.poll() is None:
            mig.kill()
    phases = [p for p, _ in rec["phase_times"]]
    assert "commit" in phases, f"the stream did not complete before the commit: {phases} {rec['error']}"
    assert "could not commit on host-b" in rec["error"] and "not reachable" in rec["error"], rec["error"]
    assert len(lab.qemu_pids(VM)["host-b"]) == 1  # the orphan shadow, paused, until its agent returns
    lab.start_agent("host-b")
    _assert_kept_on_source(lab, rec, seq)
    line = (f"FIGURES destination agent dead at commit: failed {dict(rec['phase_times'])['failed'] - t_kill:.1f} s after "
            f"the kill (phases {phases}); error: {rec['error']}")
    print(line)
    record_property("figures", line)


def _gentle_lab(make_lab) -> tuple[MigrationLab, int]:
    """A slow-link lab whose VM writes memory gently: pre-copy completes in seconds."""
    lab = make_lab(link_rate=SLOW_LINK)
    lab.create_vm(VM, "host-a", workload="echo,mem", mem_wss="16M", mem_rate="5M")
    return lab, lab.wait_mem_status("host-a", VM, 0, count=1).statuses[-1].seq


def _freeze_destination_in_precopy(lab: MigrationLab) -> list[int]:
    """SIGSTOP host-b's agent once pre-copy is under way (QEMU's stream goes on without it)."""
    lab.wait_precopy("host-a", VM, min_bytes=1 << 20)
    frozen = lab.agent_pids("host-b")
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    return frozen


def _settles_on_one_host(lab: MigrationLab, seq_before: int, timeout: float) -> tuple[str, str]:
    """Wait until exactly one copy runs; its memory must be intact and still written. Returns
    (its host, the source's record's error, which says how it was settled)."""
    deadline = time.monotonic() + timeout
    while True:
        running = [h for h, pids in lab.qemu_pids(VM).items() for _ in pids]
        listed = lab.listed(VM)
        if len(running) == 1 and listed == [(running[0], "running")]:
            break
        assert time.monotonic() < deadline, f"not exactly one copy: QEMU on {running}, listed {listed}"
        time.sleep(0.5)
    where = running[0]
    settled = lab.migration_of("host-a", VM)["error"]
    assert "settled:" in settled, settled
    after = lab.wait_mem_status(where, VM, lab.mem_log(where, VM).end, count=2)
    assert len(after.statuses) >= 2 and not after.corrupt and all(s.errors == 0 for s in after.statuses)
    assert seq_before < after.statuses[0].seq < after.statuses[-1].seq
    return where, settled


def test_destination_agent_frozen_at_commit(make_lab, record_property):
    """The destination's agent hangs (SIGSTOP) during pre-copy: the stream completes, the commit
    gets no answer. Whatever the agent does once it wakes (it may still process the commit), the
    VM must end up running on exactly one host, with its memory intact."""
    lab, seq = _gentle_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    frozen: list[int] = []
    try:
        frozen = _freeze_destination_in_precopy(lab)
        t_freeze = time.time()
        rec = lab.finish_migrate(mig, timeout=150)
        t_failed = time.time()
        # No answer either way: the source must not resume while host-b might resume its copy.
        assert lab.agent("host-a").vm(VM).state.value == "paused"
        assert rec["phase"] == "failed" and rec["_returncode"] != 0
        assert "stays paused on host-a so that it never runs twice" in rec["error"], rec["error"]
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        if mig.poll() is None:
            mig.kill()
    phases = [p for p, _ in rec["phase_times"]]
    assert "commit" in phases, f"the stream did not complete before the commit: {phases} {rec['error']}"
    # Once the agent is back, one copy runs, on one host; the other is destroyed.
    where, settled = _settles_on_one_host(lab, seq, timeout=40)
    t_settled = time.time()
    line = (f"FIGURES destination agent frozen at commit: migrate returned {t_failed - t_freeze:.1f} s after the freeze "
            f"({rec['phase']}), one copy on {where} {t_settled - t_failed:.1f} s after the agent woke; record: {settled}")
    print(line)
    record_property("figures", line)


@pytest.mark.slow  # a source agent's restart is also met in switchover (_phases) and at commit (below)
def test_source_agent_killed_during_precopy_then_restarted(make_lab, record_property):
    """The driving agent dies mid pre-copy: its QEMU keeps the VM; the restarted agent cancels the
    orphaned migration and the destination's guard destroys the shadow the source forgot."""
    lab, seq = _busy_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM)
        lab.kill_agent("host-a")
        t_restart = time.time()
        lab.start_agent("host-a")
        deadline = time.monotonic() + 60
        while lab.qemu_hosts(VM) != ["host-a"] or lab.vm_record("host-b", VM) is not None:
            assert time.monotonic() < deadline, (lab.qemu_pids(VM), lab.vm_record("host-b", VM))
            time.sleep(0.2)
        settled = time.time() - t_restart
    finally:
        if mig.poll() is None:
            mig.kill()
    assert lab.listed(VM) == [("host-a", "running")]
    offset = lab.mem_log("host-a", VM).end
    after = lab.wait_mem_status("host-a", VM, offset, count=2)
    assert seq < after.statuses[0].seq < after.statuses[-1].seq and not after.corrupt
    assert all(s.errors == 0 for s in after.statuses)
    line = f"FIGURES kill source agent in pre-copy, restart it: one copy on host-a, shadow gone {settled:.1f} s after the restart"
    print(line)
    record_property("figures", line)


def test_source_agent_killed_at_commit_then_restarted(make_lab, record_property):
    """The driving agent dies after the stream completed, its commit request waiting on a frozen
    destination agent: the VM is paused on host-a, its whole state on host-b, committed or not.
    The restarted agent keeps it paused and asks host-b (its record says what it was driving);
    once host-b's agent wakes, exactly one copy runs, with its memory intact."""
    lab, seq = _gentle_lab(make_lab)
    mig = lab.start_migrate(VM, "host-b")
    frozen: list[int] = []
    try:
        frozen = _freeze_destination_in_precopy(lab)
        lab.wait_phase("host-a", VM, "commit", timeout=60)
        lab.kill_agent("host-a")
        t_restart = time.time()
        lab.start_agent("host-a")
        # Without host-b's answer the VM must not run on host-a: it may run on host-b.
        assert lab.agent("host-a").vm(VM).state.value == "paused"
        rec = lab.migration_of("host-a", VM)
        assert rec is not None and rec["phase"] == "failed" and "restarted after the stream had completed" in rec["error"], rec
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        if mig.poll() is None:
            mig.kill()
    where, settled = _settles_on_one_host(lab, seq, timeout=60)
    line = (f"FIGURES kill source agent at commit, restart it: one copy on {where} {time.time() - t_restart:.1f} s "
            f"after the restart; record: {settled}")
    print(line)
    record_property("figures", line)
