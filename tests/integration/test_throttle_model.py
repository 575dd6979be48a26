"""VcpuThrottle's pure parts, and its cgroup v2 path against a model of the v2 rules.

This machine mounts the cpu controller on cgroup v1, so the v2 path (threaded subtree, cpu.max)
runs here against `V2Model`, which enforces the kernel rules it depends on: threads of one
process move between threaded cgroups only, a process moves as a whole through cgroup.procs,
a threaded child needs its parent to be a domain, rmdir refuses populated groups.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvmotion.core.errors import InvalidInput, SetupError
from kvmotion.host import throttle as thr
from kvmotion.host.throttle import Bandwidth, CgroupFs, CgroupVersion, CpuHierarchy, VcpuThrottle

MOUNTINFO_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
MOUNTINFO_COMBINED = "32 31 0:29 /machine /sys/fs/cgroup/cpu,cpuacct rw shared:7 - cgroup cgroup rw,cpu,cpuacct\n"
MOUNTINFO_V2 = "25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_bandwidth_keeps_the_quota_at_the_kernel_minimum() -> None:
    assert thr.bandwidth_for(0.0) == Bandwidth(period_us=100_000, quota_us=None)
    assert thr.bandwidth_for(0.5) == Bandwidth(period_us=2000, quota_us=1000)
    assert thr.bandwidth_for(0.95) == Bandwidth(period_us=20_000, quota_us=1000)
    assert thr.bandwidth_for(0.95).nominal_stall_ms == 19.0
    assert thr.bandwidth_for(0.999) == thr.bandwidth_for(0.99) == Bandwidth(period_us=100_000, quota_us=1000)
    assert thr.bandwidth_for(0.01).period_us == 1010
    for f in (0.1, 0.33, 0.6, 0.8, 0.9, 0.95):
        assert thr.bandwidth_for(f).share == pytest.approx(1 - f, abs=0.001)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(InvalidInput):
            thr.bandwidth_for(bad)


def test_mountinfo_prefers_a_v1_cpu_hierarchy(tmp_path: Path) -> None:
    h = thr.parse_mountinfo(MOUNTINFO_V1, fs_root=tmp_path)
    assert h == CpuHierarchy(CgroupVersion.V1, tmp_path / "sys/fs/cgroup/cpu", "/")
    h = thr.parse_mountinfo(MOUNTINFO_COMBINED, fs_root=tmp_path)
    assert h is not None and h.mount == tmp_path / "sys/fs/cgroup/cpu,cpuacct" and h.root == "/machine"
    assert h.path_of("/machine/vm1") == tmp_path / "sys/fs/cgroup/cpu,cpuacct/vm1"
    with pytest.raises(SetupError):
        h.path_of("/elsewhere")


def test_mountinfo_v2_needs_cpu_in_its_controllers(tmp_path: Path) -> None:
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("memory pids\n")
    assert thr.parse_mountinfo(MOUNTINFO_V2, fs_root=tmp_path) is None
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert thr.parse_mountinfo(MOUNTINFO_V2, fs_root=tmp_path) == CpuHierarchy(CgroupVersion.V2, tmp_path / "sys/fs/cgroup")


def test_proc_cgroup_lines() -> None:
    text = "9:name=systemd:/\n2:cpuacct,cpu:/machine/vm\n1:cpuset:/\n0::/system.slice/kvmotion.service\n"
    assert thr.cgroup_of(text, CgroupVersion.V1) == "/machine/vm"
    assert thr.cgroup_of(text, CgroupVersion.V2) == "/system.slice/kvmotion.service"
    with pytest.raises(SetupError):
        thr.cgroup_of("0::/x\n", CgroupVersion.V1)


class V2Model(CgroupFs):
    """Just enough of cgroup v2 for VcpuThrottle, with its rules."""

    def __init__(self, mount: Path, threads: dict[int, int], home: str) -> None:
        super().__init__()
        self.mount = mount
        self.tgid_of = threads  # tid -> pid
        self.where = {tid: mount / home.lstrip("/") for tid in threads}
        self.dirs: dict[Path, dict[str, str]] = {mount: {"cgroup.subtree_control": "", "cgroup.type": "domain"}}
        home_dir = mount
        for part in Path(home.lstrip("/")).parts:
            home_dir = home_dir / part
            self.dirs[home_dir] = {"cgroup.subtree_control": "", "cgroup.type": "domain"}
        self.log: list[tuple[str, str]] = []

    def _err(self, code: int) -> OSError:
        return OSError(code, errno.errorcode[code])

    def read(self, path: Path) -> str:
        d, name = path.parent, path.name
        if d not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "missing", str(path))
        if name == "cgroup.threads":
            return "".join(f"{t}\n" for t, w in self.where.items() if w == d)
        if name == "cgroup.procs":
            return "".join(f"{p}\n" for p in sorted({self.tgid_of[t] for t, w in self.where.items() if w == d}))
        return self.dirs[d].get(name, "")

    def write(self, path: Path, value: str) -> None:
        d, name = path.parent, path.name
        if d not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "missing", str(path))
        self.log.append((str(path.relative_to(self.mount)), value))
        files = self.dirs[d]
        if name == "cgroup.procs":
            if files["cgroup.type"] == "threaded":
                raise self._err(errno.EOPNOTSUPP)  # processes go to domains only
            pid = int(value)
            for t, p in self.tgid_of.items():
                if p == pid:
                    self.where[t] = d
        elif name == "cgroup.threads":
            tid = int(value)
            if tid not in self.where:
                raise self._err(errno.ESRCH)
            # A thread can only move within its process's threaded subtree.
            if self._thread_root(d) != self._thread_root(self.where[tid]):
                raise self._err(errno.EOPNOTSUPP)
            self.where[tid] = d
        elif name == "cgroup.type":
            if value != "threaded":
                raise self._err(errno.EINVAL)
            files["cgroup.type"] = "threaded"
            self.dirs[d.parent]["cgroup.type"] = "domain threaded"
        elif name == "cgroup.subtree_control":
            ctrl = value.lstrip("+")
            populated = any(w == d for w in self.where.values())
            if populated and d != self.mount and files["cgroup.type"] == "domain":
                raise self._err(errno.EBUSY)  # no internal processes in a plain domain
            files[name] = " ".join(sorted(set(files[name].split()) | {ctrl}))
        elif name in ("cpu.max", "cpu.weight"):
            if "cpu" not in self.dirs[d.parent]["cgroup.subtree_control"].split():
                raise FileNotFoundError(errno.ENOENT, "no cpu controller", str(path))
            if name == "cpu.weight" and not 1 <= int(value) <= 10000:
                raise self._err(errno.ERANGE)
            files[name] = value
        else:
            files[name] = value

    def _thread_root(self, d: Path) -> Path:
        """The domain at the top of d's threaded subtree (d itself when d is a domain)."""
        while self.dirs[d]["cgroup.type"] == "threaded":
            d = d.parent
        return d

    def mkdir(self, path: Path) -> None:
        if path.parent not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "missing", str(path))
        self.dirs.setdefault(path, {"cgroup.subtree_control": "", "cgroup.type": "domain"})

    def rmdir(self, path: Path) -> None:
        if path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "missing", str(path))
        if any(w == path for w in self.where.values()) or any(p.parent == path for p in self.dirs):
            raise self._err(errno.EBUSY)
        del self.dirs[path]

    def proc_cgroup(self, tid: int) -> str:
        return f"0::/{self.where[tid].relative_to(self.mount)}\n".replace("::/.", "::/")

    def tgid(self, tid: int) -> int:
        if tid not in self.tgid_of:
            raise FileNotFoundError(errno.ENOENT, "no such thread")
        return self.tgid_of[tid]


def test_v2_threaded_subtree_and_back() -> None:
    mount = Path("/model/cgroup")
    # QEMU (pid 500: main thread, two vCPU threads, an I/O thread) lives in the agent's service group.
    model = V2Model(mount, {500: 500, 501: 500, 502: 500, 503: 500}, "/system.slice/kvmotion.service")
    home = mount / "system.slice/kvmotion.service"
    h = CpuHierarchy(CgroupVersion.V2, mount)
    t = VcpuThrottle("web1", [501, 502], hierarchy=h, fs=model)
    group = mount / "system.slice/kvmotion-vcpu-web1-500"
    assert t.group == group
    assert model.where == {500: group, 501: group / "vcpu0", 502: group / "vcpu1", 503: group}
    assert "cpu" in model.dirs[mount / "system.slice"]["cgroup.subtree_control"].split()
    # first in line under the quota, as v1's cpu.shares 8192 (default 1024) gives
    assert model.dirs[group / "vcpu0"]["cpu.weight"] == model.dirs[group / "vcpu1"]["cpu.weight"] == "800"
    t.set_throttle(0.95)
    assert model.dirs[group / "vcpu0"]["cpu.max"] == model.dirs[group / "vcpu1"]["cpu.max"] == "1000 20000"
    t.set_throttle(0.0)
    assert model.dirs[group / "vcpu0"]["cpu.max"] == "max 100000"
    t.release()
    assert all(w == home for w in model.where.values())
    assert group not in model.dirs and group / "vcpu0" not in model.dirs
    assert t.fraction == 0.0
    t.release()


def test_release_lifts_the_quota_before_moving_threads() -> None:
    # A thread moved out of a throttled group can wait ~1 s before it runs again (Linux 6.18).
    mount = Path("/model/cgroup")
    model = V2Model(mount, {600: 600, 601: 600, 602: 600}, "/vms")
    t = VcpuThrottle("app", [601, 602], hierarchy=CpuHierarchy(CgroupVersion.V2, mount), fs=model)
    t.set_throttle(0.95)
    start = len(model.log)
    t.release()
    after = model.log[start:]
    moves = [i for i, (path, _) in enumerate(after) if path.endswith(("cgroup.threads", "cgroup.procs"))]
    lifts = [i for i, (path, value) in enumerate(after) if path.endswith("cpu.max") and value.startswith("max ")]
    assert len(lifts) == 2 and moves and max(lifts) < min(moves), after


def test_v2_failure_midway_undoes_everything() -> None:
    mount = Path("/model/cgroup")
    model = V2Model(mount, {700: 700, 701: 700}, "/vms")

    class Refusing(V2Model):
        def write(self, path: Path, value: str) -> None:
            if path.name == "cgroup.threads" and path.parent.name == "vcpu0":
                raise OSError(errno.EACCES, "denied")
            super().write(path, value)

    model.__class__ = Refusing
    with pytest.raises(SetupError, match="permission denied"):
        VcpuThrottle("db", [701], hierarchy=CpuHierarchy(CgroupVersion.V2, mount), fs=model)
    assert all(w == mount / "vms" for w in model.where.values())
    assert not [d for d in model.dirs if "kvmotion" in str(d)]
