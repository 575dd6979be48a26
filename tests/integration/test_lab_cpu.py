"""Lab hosts with a real CPU capacity (`lab up --host-cpu`): three CPU-busy VMs on one host wait on
its run queue (the center sees their cpu_ready), and moving two of them away raises the work each
guest gets done (its own count, per guest-second). Also: `lab down` removes the hosts' cpu cgroups,
of a lab whose agents never started too.

Guests are 256 MiB and boot one at a time. Run with -s to see the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmotion.core import cgroups
from kvmotion.core.errors import Conflict
from kvmotion.guest.serial import CpuStatus, parse_line
from kvmotion.net import lab as labmod
from tests.integration.lab_fixture import MigrationLab, lab_factory, unique_lab_name

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

# Half a CPU per host: three busy vCPUs on one host then get a sixth of a CPU each, while two hosts'
# worth (plus the third's) still fits in this 2-core machine, so a move shows even beside other load.
HOST_CPU = 0.5
SETTLE_LINES = 2  # status lines skipped after a change (boot, a move) before counting
WINDOW_LINES = 6  # status lines counted per VM per phase
MIN_GAIN = 1.5  # work rate after / before, mean over the VMs (about 3 expected at 0.5 CPU per host)
MIN_READY = 0.1  # CPUs' worth each VM on the contended host waited on its run queue


def _cpu_statuses(path: Path, offset: int) -> tuple[list[CpuStatus], int]:
    """The CPU worker's status lines in a serial log from `offset` on, and where to read next."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    whole = data[: data.rfind(b"\n") + 1]
    events = [parse_line(ln) for ln in whole.decode(errors="replace").splitlines()]
    return [e for e in events if isinstance(e, CpuStatus)], offset + len(whole)


def _log_end(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _rates(lab: MigrationLab, where: dict[str, str], timeout: float = 60) -> dict[str, float]:
    """Each VM's work rate (units per guest-second) over WINDOW_LINES status lines, after skipping
    SETTLE_LINES; all VMs measured over the same stretch of time."""
    logs = {vm: lab.serial_log(host, vm) for vm, host in where.items()}
    offsets = {vm: _log_end(p) for vm, p in logs.items()}
    seen: dict[str, list[CpuStatus]] = {vm: [] for vm in where}
    deadline = time.monotonic() + timeout
    while any(len(s) < SETTLE_LINES + WINDOW_LINES for s in seen.values()):
        assert time.monotonic() < deadline, f"CPU status lines within {timeout} s: {({vm: len(s) for vm, s in seen.items()})}"
        time.sleep(0.5)
        for vm, path in logs.items():
            found, offsets[vm] = _cpu_statuses(path, offsets[vm])
            seen[vm] += found
    rates = {}
    for vm, statuses in seen.items():
        window = statuses[SETTLE_LINES : SETTLE_LINES + WINDOW_LINES]
        rates[vm] = sum(s.units for s in window) * 1000 / sum(s.ms for s in window)
    return rates


def _host(lab: MigrationLab, name: str) -> dict:
    return next(h for h in lab.cli_json("host", "ls") if h["name"] == name)  # type: ignore[union-attr]


def _vm_loads(lab: MigrationLab, host: str) -> dict[str, dict]:
    view = _host(lab, host)
    return {v["name"]: v for v in (view["load"] or {}).get("vms", [])}


def _cpu_cgroup(pid: int) -> str:
    h = cgroups.detect_hierarchy()
    return str(h.path_of(cgroups.cgroup_of(Path(f"/proc/{pid}/cgroup").read_text(), h.version)))


@pytest.mark.slow  # the demo's act 2 shows the same gain through DRS
def test_moving_vms_off_a_contended_host_raises_their_work_rate() -> None:
    factory = lab_factory()
    make = next(factory)
    lab_name = None
    try:
        lab = make(hosts=3, host_cpu=HOST_CPU)
        lab_name = lab.topo.name
        assert lab.topo.host_cpu == HOST_CPU
        shown = lab.cli_ok("lab", "show", "--name", lab_name).stdout
        assert f"host CPU capacity {HOST_CPU:g} cores each" in shown, shown

        # Each agent runs in its host's group, whose limit the center learns from its heartbeats.
        hierarchy = cgroups.detect_hierarchy()
        for h in lab.topo.hosts:
            group = cgroups.host_group(hierarchy, lab_name, h.name)
            assert [_cpu_cgroup(p) for p in lab.agent_pids(h.name)] == [str(group.procs)]
        deadline = time.monotonic() + 30
        while (cap := (_host(lab, "host-a")["load"] or {}).get("cpu_capacity")) != HOST_CPU:
            assert time.monotonic() < deadline, f"the center shows host-a's capacity as {cap}, not {HOST_CPU}"
            time.sleep(1)

        vms = ("busy1", "busy2", "busy3")
        for k, vm in enumerate(vms):  # one at a time: each boots beside the busy ones before it
            lab.create_vm(vm, "host-a", k=k, workload="cpu")
        group_a = str(cgroups.host_group(hierarchy, lab_name, "host-a").procs)
        for vm in vms:
            assert [_cpu_cgroup(p) for p in lab.qemu_pids(vm)["host-a"]] == [group_a], f"{vm}'s QEMU is outside host-a's group"

        before = _rates(lab, dict.fromkeys(vms, "host-a"))
        # The center's view: each VM on host-a waits for a CPU (vSphere's "ready").
        deadline = time.monotonic() + 20
        while True:
            loads = _vm_loads(lab, "host-a")
            ready = {vm: loads.get(vm, {}).get("cpu_ready") for vm in vms}
            if all(r is not None and r >= MIN_READY for r in ready.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        demand_before = {vm: loads.get(vm, {}).get("cpu_demand") for vm in vms}
        print(f"\nhost-a at {HOST_CPU:g} CPU, 3 busy VMs: work rate (units/guest-s) "
              f"{ {vm: round(r) for vm, r in before.items()} }; cpu_ready {ready}; cpu_demand {demand_before}")
        assert all(r is not None and r >= MIN_READY for r in ready.values()), f"cpu_ready at the center: {ready}"

        for vm, dest in (("busy2", "host-b"), ("busy3", "host-c")):
            rec = lab.migrate(vm, dest)
            assert rec["_returncode"] == 0 and rec["phase"] == "done", f"migrating {vm}: {rec.get('error')} {rec['_stderr']}"
            assert lab.wait_qemu_hosts(vm, [dest]) == [dest]

        after = _rates(lab, {"busy1": "host-a", "busy2": "host-b", "busy3": "host-c"})
        loads_after = _vm_loads(lab, "host-a")
        gain = sum(after.values()) / sum(before.values())
        print(f"after the moves: work rate {({vm: round(r) for vm, r in after.items()})}; "
              f"busy1's cpu_ready now {loads_after.get('busy1', {}).get('cpu_ready')}; "
              f"mean gain x{gain:.2f} (needs x{MIN_GAIN})")
        assert gain >= MIN_GAIN, f"work rate rose only x{gain:.2f}: before {before}, after {after}"
        assert all(after[vm] > before[vm] for vm in vms), f"a VM got no more work done: before {before}, after {after}"
    finally:
        factory.close()  # lab down (even on failure), logs kept in /tmp
    assert lab_name is not None
    hierarchy = cgroups.detect_hierarchy()
    assert not cgroups.lab_group(hierarchy, lab_name).exists(), "lab down left the lab's cpu cgroups"


def test_lab_down_removes_the_cgroups_of_a_lab_without_agents() -> None:
    """A lab built but never started (as when `lab up` fails after the network), and groups left
    by a lab whose description is gone: `lab down` removes both; `lab up` refuses over leftovers."""
    hierarchy = cgroups.detect_hierarchy()
    name = unique_lab_name()
    try:
        topo = labmod.lab_up(name, 2, None, HOST_CPU)
        for h in topo.hosts:
            group = cgroups.host_group(hierarchy, name, h.name)
            limit = cgroups.effective_limit(hierarchy, group.path, lambda p: p.read_text())
            assert limit == cgroups.limit_for(HOST_CPU)
        labmod.lab_down(name)
        assert not cgroups.lab_group(hierarchy, name).exists()

        # Groups without a lab description (a `lab up` killed half way, its folder removed by hand).
        cgroups.create_host_group(hierarchy, name, "host-a", cgroups.limit_for(1.0))
        with pytest.raises(Conflict, match="half built"):
            labmod.lab_up(name, 2, None, HOST_CPU)
        report = labmod.lab_down(name)
        assert report.namespaces_removed == ()
        assert not cgroups.lab_group(hierarchy, name).exists()
    finally:
        labmod.lab_down(name)
