"""cpu cgroups: limits in cores, the tightest limit above a group, lab host group paths, and the
vCPU throttle's bandwidth clamped under a limited host (pure parts; the kernel's side is in
tests/integration/test_throttle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmotion.core import cgroups
from kvmotion.core.cgroups import CgroupVersion, CpuHierarchy, CpuLimit
from kvmotion.core.errors import InvalidInput
from kvmotion.host.throttle import Bandwidth, bandwidth_for, clamp_bandwidth

V1 = CpuHierarchy(CgroupVersion.V1, Path("/sys/fs/cgroup/cpu"))
V2 = CpuHierarchy(CgroupVersion.V2, Path("/sys/fs/cgroup"))


def test_limit_for_cores() -> None:
    assert cgroups.limit_for(1) == CpuLimit(quota_us=100_000, period_us=100_000)
    assert cgroups.limit_for(0.5) == CpuLimit(quota_us=50_000, period_us=100_000)
    assert cgroups.limit_for(2.25).cores == 2.25
    assert cgroups.limit_for(0.01).quota_us == cgroups.MIN_QUOTA_US
    for bad in (0, -0.5, 0.001, float("nan"), float("inf")):
        with pytest.raises(InvalidInput):
            cgroups.limit_for(bad)


def test_parse_limits() -> None:
    assert cgroups.parse_v1_limit("50000\n", "100000\n") == CpuLimit(50_000, 100_000)
    assert cgroups.parse_v1_limit("-1\n", "100000\n") is None
    assert cgroups.parse_v1_limit("", "100000") is None
    assert cgroups.parse_v2_limit("25000 100000\n") == CpuLimit(25_000, 100_000)
    assert cgroups.parse_v2_limit("max 100000\n") is None
    assert cgroups.parse_v2_limit("") is None


def test_effective_limit_is_the_tightest_up_to_the_mount() -> None:
    files = {
        "/sys/fs/cgroup/cpu/kvmotion-lab/lab1/host-a/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu/kvmotion-lab/lab1/host-a/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/kvmotion-lab/lab1/cpu.cfs_quota_us": "150000",
        "/sys/fs/cgroup/cpu/kvmotion-lab/lab1/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/kvmotion-lab/cpu.cfs_quota_us": "40000",
        "/sys/fs/cgroup/cpu/kvmotion-lab/cpu.cfs_period_us": "50000",
    }

    def read(p: Path) -> str:
        try:
            return files[str(p)]
        except KeyError:
            raise FileNotFoundError(str(p)) from None

    group = Path("/sys/fs/cgroup/cpu/kvmotion-lab/lab1/host-a")
    assert cgroups.effective_limit(V1, group, read) == CpuLimit(40_000, 50_000)  # 0.8 cores beats 1.5
    assert cgroups.effective_limit(V1, V1.mount, read) is None
    files["/sys/fs/cgroup/cpu/kvmotion-lab/lab1/host-a/cpu.cfs_quota_us"] = "30000"
    assert cgroups.effective_limit(V1, group, read) == CpuLimit(30_000, 100_000)
    v2 = {"/sys/fs/cgroup/a/cpu.max": "max 100000", "/sys/fs/cgroup/a/b/cpu.max": "50000 100000"}
    assert cgroups.effective_limit(V2, Path("/sys/fs/cgroup/a/b/c"), lambda p: v2.get(str(p), "")) == CpuLimit(50_000, 100_000)


def test_tightest_compares_exactly() -> None:
    assert cgroups.tightest([None, CpuLimit(1, 3), CpuLimit(33_333, 100_000), None]) == CpuLimit(33_333, 100_000)
    assert cgroups.tightest([None, None]) is None


def test_host_group_paths() -> None:
    g = cgroups.host_group(V1, "lab1", "host-a")
    assert g.path == g.procs == Path("/sys/fs/cgroup/cpu/kvmotion-lab/lab1/host-a")
    g2 = cgroups.host_group(V2, "lab1", "host-b")
    assert g2.path == Path("/sys/fs/cgroup/kvmotion-lab/lab1/host-b")
    assert g2.procs == g2.path / "procs"  # v2: a throttle group made beside the process's stays inside host-b
    assert cgroups.lab_group(V1, "lab1") == g.path.parent


def test_throttle_bandwidth_clamped_to_the_host_limit() -> None:
    half = CpuLimit(50_000, 100_000)
    # Without a limit, or one the bandwidth is already under: unchanged.
    assert clamp_bandwidth(bandwidth_for(0.2), None) == bandwidth_for(0.2)
    assert clamp_bandwidth(bandwidth_for(0.9), half) == bandwidth_for(0.9)
    # Unthrottled (no quota) inherits the host's limit in the kernel: nothing to clamp.
    assert clamp_bandwidth(bandwidth_for(0.0), half) == Bandwidth(period_us=100_000, quota_us=None)
    # 20 % off a whole CPU is more than half a CPU: the quota stays 1 ms, the period grows to the limit's ratio.
    assert clamp_bandwidth(bandwidth_for(0.2), half) == Bandwidth(period_us=2000, quota_us=1000)
    third = CpuLimit(33_333, 100_000)
    bw = clamp_bandwidth(bandwidth_for(0.1), third)
    assert bw.quota_us == 1000 and bw.quota_us * third.period_us <= third.quota_us * bw.period_us  # never above it
    assert bw.period_us == 3001
    for f in (0.01, 0.3, 0.5, 0.7, 0.95):
        for limit in (half, third, CpuLimit(1_000, 1_000_000), CpuLimit(200_000, 100_000)):
            out = clamp_bandwidth(bandwidth_for(f), limit)
            assert out.quota_us is not None and out.share <= min(bandwidth_for(f).share, limit.cores) + 1e-12


def test_heartbeat_carries_the_host_capacity() -> None:
    from kvmotion.api.center import HostLoad
    from kvmotion.host import resources
    from kvmotion.host.heartbeat import build_heartbeat

    beat = build_heartbeat([], (), resources.MemInfo(total=1 << 30, available=1 << 29), 2, [], cpu_capacity=0.5)
    assert beat.load.cpus == 2 and beat.load.cpu_capacity == 0.5
    assert HostLoad.model_validate_json(beat.load.model_dump_json()) == beat.load
    old = HostLoad.model_validate_json('{"cpus": 2, "memory_total": 1, "memory_available": 1}')  # an older agent
    assert old.cpu_capacity is None
    with pytest.raises(InvalidInput, match="cpu_capacity"):
        HostLoad(cpus=2, cpu_capacity=0, memory_total=1, memory_available=1)
    assert 0 < resources.cpu_capacity() <= resources.cpu_count()
