"""Faults in the prepare and switchover phases (pre-copy and commit: test_migration_faults.py).
The VM must end up running on exactly one host (the source), the destination must be cleaned
up, and the one-line error must say what happened.

Each phase is held open on purpose so the fault lands in it: prepare by freezing the
destination's agent (the shadow request waits unread) or its new QEMU before its monitor is up;
switchover by freezing the datastore's control service, so that the disk lease hand-over blocks
while the source is paused before switchover.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmotion.lab.cluster import DATASTORE
from kvmotion.net import netns
from tests.integration.lab_fixture import MigrationLab
from tests.integration.test_migration_checks import _one_line_error
from tests.integration.test_migration_faults import SLOW_LINK, VM, _assert_kept_on_source, _busy_lab
from tests.integration.test_storage_migration import DISK_SIZE, _datastore_processes, disk_log, lease_of, wait_ack_above

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

DISK = f"{VM}.img"


@contextmanager
def sigstopped(pids: list[int]) -> Iterator[list[int]]:
    """SIGSTOP `pids`; whatever is still in the yielded list gets SIGCONT on exit (a test that
    thaws or kills one removes it), so a failed test never leaves a frozen process behind."""
    held = list(pids)
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield held
    finally:
        for pid in held:
            netns._signal(pid, signal.SIGCONT)  # tolerant of a pid already gone


def _catch_shadow_qemu(lab: MigrationLab, host: str, vm: str, timeout: float = 30) -> int:
    """SIGSTOP the shadow QEMU of `vm` that `host`'s agent starts, as soon as it has exec'd,
    before it opens its monitor: the agent's prepare then waits for it. Returns its pid.

    Watches the agent's children (QEMU is one, in its own session) rather than the whole
    namespace: a /proc scan takes tens of ms, the agent answers the source soon after QEMU starts."""
    (agent,) = lab.agent_pids(host)
    tag = f"process=kvmotion:{vm}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{agent}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"qemu-system" in cmd and tag in cmd:
                    os.kill(child, signal.SIGSTOP)
                    return child
        time.sleep(0.001)
    raise AssertionError(f"{host}'s agent started no QEMU for {vm} within {timeout} s")


@contextmanager
def _held_in_prepare(lab: MigrationLab) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """Start migrating VM to host-b and freeze its shadow's QEMU before its monitor is up, so the
    migration sits in prepare. Yields the CLI process and the frozen pid (a test that kills or
    thaws it pops it); on exit whatever is left is thawed and the CLI stopped."""
    mig = lab.start_migrate(VM, "host-b")
    shadow: list[int] = []
    try:
        shadow.append(_catch_shadow_qemu(lab, "host-b", VM))
        yield mig, shadow
    finally:
        for pid in shadow:
            netns._signal(pid, signal.SIGCONT)  # a failed test must not leave it frozen
        if mig.poll() is None:
            mig.kill()


def _figures(record_property, line: str) -> None:
    print(line)
    record_property("figures", line)


# ---- check --------------------------------------------------------------------------------------
def test_destination_agent_dead_at_check(make_lab, record_property):
    """The destination's agent is gone before the checks: the migration is refused in one line
    naming the unreachable agent, and nothing starts anywhere."""
    lab = make_lab()
    lab.create_vm(VM, "host-a")
    lab.kill_agent("host-b")
    t0 = time.time()
    line = _one_line_error(lab.cli("migrate", VM, "--to", "host-b", timeout=60),
                           f"migration of {VM} to host-b refused", "not reachable")
    took = time.time() - t0
    assert lab.listed(VM) == [("host-a", "running")]
    assert lab.qemu_hosts(VM) == ["host-a"]
    lab.start_agent("host-b")
    assert lab.vm_record("host-b", VM) is None and lab.agent("host-b").vms() == []
    _figures(record_property, f"FIGURES destination agent dead at check: refused in {took:.1f} s; error: {line}")


# ---- prepare ------------------------------------------------------------------------------------
def test_destination_agent_killed_in_prepare_then_restarted(make_lab, record_property):
    """The destination's agent dies while it starts the shadow's QEMU: the source fails in
    prepare and keeps its VM; the orphan shadow QEMU lives on until the agent restarts and
    destroys the shadow it finds uncommitted."""
    lab, seq = _busy_lab(make_lab)
    with _held_in_prepare(lab) as (mig, shadow):
        assert lab.migration_of("host-a", VM)["phase"] == "prepare"  # the agent waits for QEMU's monitor
        t_kill = time.time()
        lab.kill_agent("host-b")
        os.kill(shadow.pop(), signal.SIGCONT)  # an orphan from here on, as after a real crash
        rec = lab.finish_migrate(mig, timeout=60)
    assert "precopy" not in dict(rec["phase_times"]), rec["phase_times"]
    assert "preparing the shadow VM on host-b failed" in rec["error"] and "not reachable" in rec["error"], rec["error"]
    assert len(lab.qemu_pids(VM)["host-b"]) == 1 and lab.vm_record("host-b", VM) is not None  # the orphan
    t_restart = time.time()
    lab.start_agent("host-b")
    assert lab.wait_qemu_hosts(VM, ["host-a"]) == ["host-a"], lab.qemu_pids(VM)
    t_clean = time.time()
    # The agent forgets the shadow a few ms after its QEMU has exited (it releases the TAP first).
    deadline = time.monotonic() + 2
    while (left := lab.agent("host-b").vms()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left == []
    _assert_kept_on_source(lab, rec, seq)
    _figures(record_property, f"FIGURES kill destination agent in prepare, restart it: failed "
             f"{(dict(rec['phase_times'])['failed'] - t_kill) * 1000:.0f} ms after the kill; orphan shadow destroyed "
             f"{t_clean - t_restart:.1f} s after the restart began; error: {rec['error']}")


def test_destination_qemu_killed_in_prepare(make_lab, record_property):
    """The shadow's QEMU dies while the destination's agent is still starting it: the agent
    gives the shadow up and tells the source, which fails in prepare and keeps its VM."""
    lab, seq = _busy_lab(make_lab)
    with _held_in_prepare(lab) as (mig, shadow):
        time.sleep(0.5)
        assert lab.migration_of("host-a", VM)["phase"] == "prepare"  # the agent waits for QEMU's monitor
        t_kill = time.time()
        os.kill(shadow.pop(), signal.SIGKILL)
        rec = lab.finish_migrate(mig, timeout=60)
    assert "precopy" not in dict(rec["phase_times"]), rec["phase_times"]
    # the destination agent's own words, prefixed with where they come from
    assert "preparing the shadow VM on host-b failed" in rec["error"] and "exited before its monitor came up" in rec["error"], rec["error"]
    assert lab.agent("host-b").vms() == []
    _assert_kept_on_source(lab, rec, seq)
    _figures(record_property, f"FIGURES kill destination QEMU in prepare: failed "
             f"{(dict(rec['phase_times'])['failed'] - t_kill) * 1000:.0f} ms after the kill; error: {rec['error']}")


# ---- switchover ---------------------------------------------------------------------------------
def _disk_lab(make_lab) -> tuple[MigrationLab, int, int, int]:
    """A slow-link lab whose VM writes memory and its datastore disk: (lab, memory writer's
    sequence, disk writer's last ack, the disk lease's generation)."""
    lab = make_lab(link_rate=SLOW_LINK)
    lab.cli_ok("disk", "create", f"{DATASTORE}/{DISK}", DISK_SIZE)
    # A gentle memory writer: pre-copy must converge within seconds of the datastore's freeze,
    # well inside the 15 s lease TTL that host-a cannot renew meanwhile.
    lab.create_vm(VM, "host-a", workload="echo,mem,disk", mem_wss="16M", mem_rate="1M",
                  disks=(f"{DATASTORE}/{DISK}",))
    seq = lab.wait_mem_status("host-a", VM, 0, count=1).statuses[-1].seq
    acked = wait_ack_above(lab, "host-a", VM, 0, 16)
    assert acked.last > 16, "the disk writer acknowledged nothing"
    lease, gen = lease_of(lab, DISK)
    assert lease is not None and lease.host == "host-a", lease
    return lab, seq, acked.last, gen


def _datastore_service(lab: MigrationLab) -> int:
    """Pid of the lab's `datastore serve` (the control API; nbdkit, its child, keeps serving data)."""
    serve = [pid for pid, argv, _ in _datastore_processes(lab) if "datastore" in argv and "serve" in argv]
    assert len(serve) == 1, f"expected one `datastore serve`: {_datastore_processes(lab)}"
    return serve[0]


@contextmanager
def _held_in_switchover(lab: MigrationLab) -> Iterator[tuple[object, list[int], float]]:
    """Migrate VM to host-b and freeze the datastore's control service during pre-copy, so the
    lease hand-over blocks in switchover (the datastore client waits 10 s). Yields (migrate
    process, the frozen pid list (clear it to thaw), when switchover began)."""
    mig = lab.start_migrate(VM, "host-b")
    try:
        lab.wait_precopy("host-a", VM, min_bytes=1 << 20)
        with sigstopped([_datastore_service(lab)]) as frozen:
            rec = lab.wait_phase("host-a", VM, "switchover", timeout=8)
            assert len(lab.qemu_pids(VM)["host-b"]) == 1, f"no shadow QEMU on host-b: {lab.qemu_pids(VM)}"
            yield mig, frozen, dict(rec["phase_times"])["switchover"]
    finally:
        if mig.poll() is None:
            mig.kill()


def _thaw(frozen: list[int]) -> None:
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    frozen.clear()


def _assert_disk_back_on_source(lab: MigrationLab, rec: dict, seq: int, gen: int) -> tuple[int, float]:
    """Kept on the source (_assert_kept_on_source), and the lease went to host-b and came back (a
    new generation each way), and the guest's disk writes go on on host-a without errors.
    Returns (generation now, s from failure to a new ack)."""
    _assert_kept_on_source(lab, rec, seq)
    phases = [p for p, _ in rec["phase_times"]]
    assert "switchover" in phases and "commit" not in phases, phases
    assert "disk-leases" not in rec["error"], f"the lease hook's rollback failed: {rec['error']}"
    lease, gen_after = lease_of(lab, DISK)
    assert lease is not None and lease.host == "host-a" and lease.generation == gen_after, lease
    assert gen_after == gen + 2, f"generation {gen} -> {gen_after}: expected a hand-over to host-b and back"
    at_fail = disk_log(lab, "host-a", VM)
    after = wait_ack_above(lab, "host-a", VM, at_fail.end, at_fail.last)
    assert after.last > at_fail.last, f"no new ack on host-a after the rollback: {lab.agent_log('host-a')[-800:]}"
    assert not after.errors, f"the guest saw disk errors: {after.errors[:3]}"
    assert lab.agent("host-a").vm(VM).state.value == "running"
    return gen_after, time.time() - dict(rec["phase_times"])["failed"]


def test_destination_qemu_killed_in_switchover(make_lab, record_property):
    """The shadow's QEMU dies while the source is paused before switchover, handing over the
    disk lease: once the hand-over finishes the stream fails; the source takes the lease back,
    resumes, and its guest keeps writing memory and disk."""
    lab, seq, _, gen = _disk_lab(make_lab)
    with _held_in_switchover(lab) as (mig, frozen, t_switch):
        (shadow,) = lab.qemu_pids(VM)["host-b"]
        t_kill = time.time()
        os.kill(shadow, signal.SIGKILL)
        assert lab.wait_qemu_hosts(VM, ["host-a"], timeout=5) == ["host-a"], lab.qemu_pids(VM)
        time.sleep(1.0)
        assert lab.migration_of("host-a", VM)["phase"] == "switchover"  # still handing the lease over
        held = time.time() - t_switch
        _thaw(frozen)
        rec = lab.finish_migrate(mig, timeout=60)
    assert "at switchover" in rec["error"] and "shadow VM on host-b is gone" in rec["error"], rec["error"]
    gen_after, first_ack = _assert_disk_back_on_source(lab, rec, seq, gen)
    _figures(record_property, f"FIGURES kill destination QEMU in switchover (held {held:.1f} s): failed "
             f"{dict(rec['phase_times'])['failed'] - t_kill:.1f} s after the kill; lease generation {gen} -> {gen_after}; "
             f"new disk ack on host-a {first_ack:.1f} s after the failure; error: {rec['error']}")


STALL_BOUND = 25.0  # s: the engine's stall timeout (10 s) plus its shadow check, with room


def test_link_cut_in_switchover(make_lab, record_property):
    """host-b's link is cut while the source is paused before switchover: the lease moves to
    host-b, but the stream's end cannot reach it. The source must give up within its stall
    timeout, take the lease back and resume; once the link is back, host-b's agent destroys its
    uncommitted shadow."""
    lab, seq, _, gen = _disk_lab(make_lab)
    try:
        with _held_in_switchover(lab) as (mig, frozen, _t_switch):
            t_cut = time.time()
            lab.set_mgmt_link("host-b", up=False)
            _thaw(frozen)
            deadline = time.monotonic() + STALL_BOUND
            while (now := lab.migration_of("host-a", VM))["phase"] not in ("failed", "cancelled", "done"):
                if time.monotonic() > deadline:
                    at = lab.mem_log("host-a", VM).end
                    time.sleep(2)
                    raise AssertionError(
                        f"{STALL_BOUND:.0f} s after the cut the migration is still in {now['phase']} (since "
                        f"{time.time() - dict(now['phase_times'])[now['phase']]:.1f} s); VM on host-a "
                        f"{lab.agent('host-a').vm(VM).state.value}, {len(lab.mem_log('host-a', VM, at).statuses)} "
                        f"memory-writer lines in 2 s; lease {lease_of(lab, DISK)[0]}")
                time.sleep(0.2)
            rec = lab.finish_migrate(mig, timeout=30)
            t_failed = dict(rec["phase_times"])["failed"]
            assert len(lab.qemu_pids(VM)["host-b"]) == 1  # unreachable: the shadow is still there
    finally:
        lab.set_mgmt_link("host-b", up=True)
    t_back = time.time()
    assert lab.wait_qemu_hosts(VM, ["host-a"], timeout=20) == ["host-a"], lab.qemu_pids(VM)
    t_clean = time.time()
    assert "host-b" in rec["error"] and "destination cleanup" in rec["error"], rec["error"]
    gen_after, first_ack = _assert_disk_back_on_source(lab, rec, seq, gen)
    _figures(record_property, f"FIGURES cut host-b's link in switchover: failed {t_failed - t_cut:.1f} s after the cut; "
             f"shadow destroyed {t_clean - t_back:.1f} s after the link came back; lease generation {gen} -> {gen_after}; "
             f"new disk ack on host-a {first_ack:.1f} s after the failure; error: {rec['error']}")


def test_source_agent_killed_in_switchover_then_restarted(make_lab, record_property):
    """The driving agent dies while it hands the disk lease over (the datastore frozen), and its
    request is served after it died: the lease is host-b's, the source QEMU paused before
    switchover. The restarted agent cancels the migration, takes the lease back (the shadow never
    got the whole VM), gives QEMU new NBD connections and resumes it: the guest goes on writing
    memory and disk on host-a without an error, and host-b's guard destroys the shadow."""
    lab, seq, _, gen = _disk_lab(make_lab)
    with _held_in_switchover(lab) as (_mig, frozen, _t_switch):
        lab.kill_agent("host-a")
        _thaw(frozen)
        deadline = time.monotonic() + 10
        while (lease := lease_of(lab, DISK)[0]) is None or lease.host != "host-b":
            # The service may also drop the request of a client gone: then the lease never left.
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        handed_over = lease is not None and lease.host == "host-b"
        at_restart = disk_log(lab, "host-a", VM)
        t_restart = time.time()
        lab.start_agent("host-a")
        assert lab.wait_qemu_hosts(VM, ["host-a"], timeout=60) == ["host-a"], lab.qemu_pids(VM)
        deadline = time.monotonic() + 30
        while lab.vm_record("host-b", VM) is not None:
            assert time.monotonic() < deadline, "host-b kept the shadow's record"
            time.sleep(0.2)
        settled = time.time() - t_restart
    assert lab.listed(VM) == [("host-a", "running")]
    lease, gen_after = lease_of(lab, DISK)
    assert lease is not None and lease.host == "host-a" and lease.generation == gen_after, \
        f"{lease} (handed over: {handed_over}); host-a's agent: {lab.agent_log('host-a')[-1500:]}"
    assert gen_after == gen + (2 if handed_over else 1), (handed_over, gen, gen_after)
    after = wait_ack_above(lab, "host-a", VM, at_restart.end, at_restart.last)
    assert after.last > at_restart.last, f"no new disk ack on host-a: {lab.agent_log('host-a')[-800:]}"
    assert not after.errors, f"the guest saw disk errors: {after.errors[:3]}"
    offset = lab.mem_log("host-a", VM).end
    mem = lab.wait_mem_status("host-a", VM, offset, count=2)
    assert len(mem.statuses) >= 2 and not mem.corrupt and all(s.errors == 0 for s in mem.statuses)
    assert seq < mem.statuses[0].seq < mem.statuses[-1].seq
    assert "cancelling it" in lab.agent_log("host-a")
    _figures(record_property, f"FIGURES kill source agent in switchover (hand-over {'served' if handed_over else 'dropped'} "
             f"after its death), restart it: lease generation {gen} -> {gen_after} on host-a, one copy on host-a, "
             f"shadow gone {settled:.1f} s after the restart")
