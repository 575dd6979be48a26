"""vCPU load from schedstat counters: parsing, thread names, demand and ready between samples, and the
heartbeat's sampler over them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvmotion.api.agent import VmState, VmStatus
from kvmotion.api.spec import VmSpec
from kvmotion.host.heartbeat import LoadSampler
from kvmotion.host.schedstat import (
    CpuLoad,
    SchedStat,
    VcpuSample,
    cpu_load,
    parse_schedstat,
    read_vcpu_threads,
    resident_memory,
    vcpu_index,
)


def test_parse_schedstat() -> None:
    assert parse_schedstat("123456789 2000 17\n") == SchedStat(123456789, 2000, 17)
    for bad in ("", "1 2", "1 2 3 4", "a b c", "-1 2 3"):
        assert parse_schedstat(bad) is None


def test_vcpu_threads_by_name() -> None:
    assert vcpu_index("CPU 0/KVM\n") == 0
    assert vcpu_index("CPU 11/TCG") == 11
    for other in ("qemu-system-x86", "IO mon_iothread", "worker", "CPU x/KVM", "CPU 1/KVMX", "vnc_worker"):
        assert vcpu_index(other) is None


def _sample(pid: int, at: float, **threads: tuple[int, int]) -> VcpuSample:
    return VcpuSample(pid=pid, at=at, threads={int(t[1:]): SchedStat(run, wait, 0) for t, (run, wait) in threads.items()})


def test_demand_and_ready_are_deltas_per_interval() -> None:
    before = _sample(10, 100.0, t1=(1_000_000_000, 0), t2=(500_000_000, 100_000_000))
    # 2 s later: t1 ran 1.5 s and waited 0.5 s, t2 ran 0.5 s and waited 1 s.
    after = _sample(10, 102.0, t1=(2_500_000_000, 500_000_000), t2=(1_000_000_000, 1_100_000_000))
    load = cpu_load(before, after)
    assert load == CpuLoad(demand=pytest.approx(1.0), ready=pytest.approx(0.75))
    assert after.run_ns == 3_500_000_000 and after.wait_ns == 1_600_000_000


def test_no_rate_without_a_usable_earlier_sample() -> None:
    now = _sample(10, 102.0, t1=(2, 2))
    assert cpu_load(None, now) is None  # the first sample
    assert cpu_load(_sample(9, 100.0, t1=(1, 1)), now) is None  # another QEMU (the VM restarted)
    assert cpu_load(_sample(10, 102.0, t1=(1, 1)), now) is None  # no time between


def test_threads_that_came_or_were_reused_count_for_nothing() -> None:
    before = _sample(10, 0.0, t1=(1_000_000_000, 0), t3=(9_000_000_000, 9_000_000_000))
    # t2 is new (a hot-plugged vCPU); t3's counters went back (its id now names another thread).
    after = _sample(10, 1.0, t1=(1_500_000_000, 250_000_000), t2=(7_000_000_000, 0), t3=(1, 1))
    assert cpu_load(before, after) == CpuLoad(demand=pytest.approx(0.5), ready=pytest.approx(0.25))


def _fake_proc(root: Path, pid: int, threads: dict[int, tuple[str, str]], statm: str = "1000 300 10 1 0 50 0") -> None:
    for tid, (comm, stat) in threads.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(comm + "\n")
        (task / "schedstat").write_text(stat + "\n")
    (root / str(pid) / "statm").write_text(statm + "\n")


def test_reads_only_vcpu_threads(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 42, {42: ("qemu-system-x86", "9 9 9"), 43: ("CPU 0/TCG", "100 20 3"),
                              44: ("CPU 1/TCG", "garbage"), 45: ("CPU 1/TCG", "50 5 1")})
    assert read_vcpu_threads(42, tmp_path) == {43: SchedStat(100, 20, 3), 45: SchedStat(50, 5, 1)}
    assert read_vcpu_threads(99, tmp_path) == {}  # the process ended
    assert resident_memory(42, tmp_path) == 300 * os.sysconf("SC_PAGE_SIZE")
    assert resident_memory(99, tmp_path) == 0


def test_this_process_threads_are_read(tmp_path: Path) -> None:
    """Real /proc: a thread named like a vCPU that burns CPU shows run time growing."""
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            pass

    t = threading.Thread(target=spin, name="CPU 0/TCG")
    t.start()
    try:
        tid = t.native_id
        Path(f"/proc/self/task/{tid}/comm").write_text("CPU 0/TCG")  # what debug-threads=on makes QEMU do
        first = read_vcpu_threads(os.getpid())
        time.sleep(0.2)
        second = read_vcpu_threads(os.getpid())
    finally:
        done.set()
        t.join()
    assert set(first) == {tid} and second[tid].run_ns > first[tid].run_ns


def _status(name: str, pid: int | None) -> VmStatus:
    spec = VmSpec(name=name, memory=256 << 20)
    return VmStatus(name=name, state=VmState.RUNNING if pid else VmState.STOPPED, host="host-a", memory=spec.memory,
                    vcpus=1, pid=pid, started_at=None, ready=False, spec=spec)


def test_sampler_turns_counters_into_rates() -> None:
    clock = iter([10.0, 12.0])
    counters = iter([{7: SchedStat(0, 0, 0)}, {7: SchedStat(1_000_000_000, 200_000_000, 5)}])
    sampler = LoadSampler(clock=lambda: next(clock), read=lambda pid: next(counters), rss=lambda pid: 4096)
    vms = [_status("web1", 1234), _status("off", None)]
    first = sampler.loads(sampler.observe(vms))
    assert [(v.name, v.cpu_demand, v.memory) for v in first] == [("web1", None, 4096)]  # stopped VMs have no load
    second = sampler.loads(sampler.observe(vms), {"web1": 20e6})
    assert second[0].cpu_demand == pytest.approx(0.5) and second[0].cpu_ready == pytest.approx(0.1)
    assert first[0].dirty_rate is None and second[0].dirty_rate == 20e6  # as the VM manager measured it
