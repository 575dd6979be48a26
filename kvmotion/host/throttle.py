"""Fine-grained vCPU throttling: CFS bandwidth control on a VM's vCPU threads.

QEMU's auto-converge sleeps each vCPU pct/(1-pct) x 10 ms per 10 ms slice: at 99 % that is a
~1 s stall, which a guest's clients see as an outage. Here each vCPU thread gets its own
cgroup with a CPU quota of 1 ms (the kernel's minimum) per period = 1 ms / (1 - fraction), so
the thread runs for short bursts and waits period - quota between them: 95 % -> 20 ms period.

The kernel charges a busy thread's runtime at scheduler ticks, so a burst can last until the
next tick and the stall that repays it grows with the tick: up to (1 ms + tick) x f/(1-f).
Measured on this HZ=250 kernel (tests/integration/test_throttle.py, 2 busy threads): CPU share
exactly 1 - f; largest stall 2-8 ms at 50 %, 8-28 ms at 80 %, 10-38 ms at 90 %, 20-76 ms at
95 % (short stalls when other load preempts the thread often, long ones on an idle CPU).

Under a group with a CPU limit of its own (a lab host's --host-cpu, a container) each vCPU group's
bandwidth is clamped to that limit's ratio (clamp_bandwidth): cgroup v1 refuses a larger one.

One cgroup per vCPU (not one for all) because a group's quota is handed to CPUs in 5 ms
slices: with several vCPUs sharing a 1-2 ms quota one of them could take all of it for periods
on end.

cgroup v1 (cpu controller mounted on its own hierarchy, as on this project's machines): the
group is created under each thread's current cpu cgroup, threads go in through `tasks`.
cgroup v2 (fresh Debian 12): threads of one process can only be split inside a *threaded*
subtree, so the whole QEMU process moves into a new domain group next to its current one,
vCPU threads into threaded children with `cpu.max`; release moves it back.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core.cgroups import (
    CgroupVersion,
    CpuHierarchy,
    CpuLimit,
    cgroup_of,
    detect_hierarchy,
    effective_limit,
    parse_mountinfo,
)
from kvmotion.core.errors import InvalidInput, KvmotionError, NotFound, SetupError

__all__ = ["Bandwidth", "CgroupFs", "CgroupVersion", "CpuHierarchy", "VcpuThrottle", "bandwidth_for", "cgroup_of",
           "clamp_bandwidth", "detect_hierarchy", "parse_mountinfo"]

VCPU_SHARES = 8192  # cgroup v1 cpu.shares of a throttled VM's vCPU group (default 1024)
VCPU_WEIGHT = VCPU_SHARES * 100 // 1024  # the same priority as cgroup v2 cpu.weight (default 100)
MIN_QUOTA_US = 1000  # kernel minimum for cfs_quota_us / cpu.max quota
MIN_PERIOD_US = 1000
MAX_PERIOD_US = 1_000_000
MAX_FRACTION = 0.99  # 100 ms periods; beyond that stalls approach QEMU's own
GROUP_PREFIX = "kvmotion-vcpu"


@dataclass(frozen=True)
class Bandwidth:
    """A CFS bandwidth setting; quota None = unlimited."""

    period_us: int
    quota_us: int | None

    @property
    def share(self) -> float:
        return 1.0 if self.quota_us is None else self.quota_us / self.period_us

    @property
    def nominal_stall_ms(self) -> float:
        """period - quota: the wait if the kernel enforced the quota exactly (ticks make it longer)."""
        return 0.0 if self.quota_us is None else (self.period_us - self.quota_us) / 1000


def bandwidth_for(fraction: float) -> Bandwidth:
    """The smallest burst for that fraction: quota = 1 ms, period = quota / (1 - fraction)."""
    if not 0 <= fraction < 1:
        raise InvalidInput(f"invalid throttle {fraction}: use a fraction in [0, 1), e.g. 0.9 for 90 %")
    if fraction == 0:
        return Bandwidth(period_us=100_000, quota_us=None)
    fraction = min(fraction, MAX_FRACTION)
    period = round(MIN_QUOTA_US / (1 - fraction))
    return Bandwidth(period_us=max(MIN_PERIOD_US, min(MAX_PERIOD_US, period)), quota_us=MIN_QUOTA_US)


def clamp_bandwidth(bw: Bandwidth, ceiling: CpuLimit | None) -> Bandwidth:
    """`bw` no larger than `ceiling`, the tightest limit of the groups above (a lab host's capacity,
    a container's): cgroup v1 refuses a child whose quota/period exceeds it (EINVAL), v2 caps it
    silently. The quota stays the smallest burst and the period grows, so the vCPU gets the share
    its host can give at most, never more than `bw` gives."""
    if ceiling is None or bw.quota_us is None or bw.quota_us * ceiling.period_us <= ceiling.quota_us * bw.period_us:
        return bw
    period = -(-bw.quota_us * ceiling.period_us // ceiling.quota_us)  # ceil: ratio <= the ceiling's exactly
    return Bandwidth(period_us=max(MIN_PERIOD_US, min(MAX_PERIOD_US, period)), quota_us=bw.quota_us)


class CgroupFs:
    """The few file operations on cgroupfs, mapped to kvmotion errors (tests swap in a model)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def read(self, path: Path) -> str:
        return path.read_text()

    def write(self, path: Path, value: str) -> None:
        # One write() per value: cgroupfs parses each write as a unit.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        path.mkdir(exist_ok=True)

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def proc_cgroup(self, tid: int) -> str:
        return (self.proc / str(tid) / "cgroup").read_text()

    def tgid(self, tid: int) -> int:
        status = (self.proc / str(tid) / "status").read_text()
        m = re.search(r"^Tgid:\s*(\d+)", status, re.MULTILINE)
        if not m:
            raise SetupError(f"cannot read the process of thread {tid}")
        return int(m.group(1))


def lift_leftover(pid: int, *, hierarchy: CpuHierarchy | None = None, fs: CgroupFs | None = None,
                  proc: Path = Path("/proc")) -> int:
    """Threads of process `pid` still in a throttle group of ours (its agent was killed while
    the VM was throttled): moved back to where the group was made, and the group removed. How many
    threads were moved (0: none was held)."""
    hierarchy = hierarchy or detect_hierarchy()
    fs = fs or CgroupFs(proc)
    groups: set[Path] = set()
    moved = 0
    try:
        tids = [int(t.name) for t in (proc / str(pid) / "task").iterdir()]
    except OSError:
        return 0  # gone
    for tid in tids:
        try:
            path = hierarchy.path_of(cgroup_of(fs.proc_cgroup(tid), hierarchy.version))
        except OSError:
            continue  # the thread exited meanwhile
        parts = path.relative_to(hierarchy.mount).parts
        ours = next((i for i, part in enumerate(parts) if part.startswith(GROUP_PREFIX)), None)
        if ours is None:
            continue
        group = hierarchy.mount.joinpath(*parts[: ours + 1])
        groups.add(group)
        target, value = ((group.parent / "tasks", str(tid)) if hierarchy.version is CgroupVersion.V1
                         else (group.parent / "cgroup.procs", str(pid)))  # v2: the process moves as a whole
        try:
            fs.write(target, value)
            moved += 1
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise _os_error(exc, f"moving thread {tid} of process {pid} out of {group}") from exc
    for group in groups:
        for d in [*sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)), group]:
            failed = _rmdir(fs, d)
            if failed is not None:
                raise _os_error(failed, f"removing cgroup {d}") from failed
    return moved


def _rmdir(fs: CgroupFs, path: Path) -> OSError | None:
    """Remove an emptied cgroup (gone already is fine); the kernel may need a moment to see an
    exiting or moved thread gone. The error if it stays."""
    for attempt in range(20):
        try:
            fs.rmdir(path)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == 19:
                return exc
            time.sleep(0.01)
    return None


def _os_error(exc: OSError, what: str) -> KvmotionError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SetupError(f"{what}: permission denied (vCPU throttling needs root)")
    if exc.errno == errno.ESRCH:
        return NotFound(f"{what}: the thread is gone (did the VM stop?)")
    if exc.errno == errno.EINVAL:
        return SetupError(f"{what}: refused by the kernel (a parent cgroup's CPU limit may be lower)")
    return SetupError(f"{what}: {exc.strerror or exc}")


class VcpuThrottle:
    """Throttle one VM's vCPU threads (thread ids from QMP query-cpus-fast `thread-id`).

    The cgroups exist from construction until `release()`; use as a context manager or call
    release() in a finally. `fraction` is what is in force (0.0 after release).
    """

    def __init__(
        self,
        vm_name: str,
        thread_ids: list[int],
        *,
        hierarchy: CpuHierarchy | None = None,
        fs: CgroupFs | None = None,
    ) -> None:
        if not thread_ids:
            raise InvalidInput(f"VM {vm_name} has no vCPU thread ids to throttle")
        self.vm_name = vm_name
        self.thread_ids = [int(t) for t in thread_ids]
        self.fs = fs or CgroupFs()
        self.hierarchy = hierarchy or detect_hierarchy()
        self.fraction = 0.0
        self.released = False
        self._origin: dict[int, Path] = {}  # tid (v1) or the pid (v2) -> where it came from
        self.ceiling: CpuLimit | None = None  # the tightest CPU limit above the vCPU groups
        self._created: list[Path] = []  # groups we use, parents first; removed in reverse at release
        try:
            self.pid = self._tgid(self.thread_ids[0])
            self.group = self._setup()
        except BaseException:
            try:
                self.release()
            except KvmotionError:
                pass  # the setup error is the one worth showing
            raise

    # ------------------------------------------------------------------ setup

    def _tgid(self, tid: int) -> int:
        try:
            return self.fs.tgid(tid)
        except FileNotFoundError:
            raise NotFound(f"vCPU thread {tid} of VM {self.vm_name} does not exist: is the VM running?") from None

    def _current(self, tid: int) -> Path:
        try:
            text = self.fs.proc_cgroup(tid)
        except FileNotFoundError:
            raise NotFound(f"vCPU thread {tid} of VM {self.vm_name} does not exist: is the VM running?") from None
        path = self.hierarchy.path_of(cgroup_of(text, self.hierarchy.version))
        # Still in a group of ours (an agent killed before release): count from where that was made.
        while any(part.startswith(GROUP_PREFIX) for part in path.relative_to(self.hierarchy.mount).parts):
            path = path.parent
        return path

    def _mkdir(self, path: Path) -> None:
        try:
            self.fs.mkdir(path)  # an existing one is a leftover of ours for this very QEMU process
        except OSError as exc:
            raise _os_error(exc, f"creating cgroup {path}") from exc
        self._created.append(path)

    def _write(self, path: Path, value: str, what: str) -> None:
        try:
            self.fs.write(path, value)
        except OSError as exc:
            raise _os_error(exc, what) from exc

    def _setup(self) -> Path:
        for tid in self.thread_ids:
            if self._tgid(tid) != self.pid:
                raise InvalidInput(f"threads {self.thread_ids} of VM {self.vm_name} are not all in one process")
        name = f"{GROUP_PREFIX}-{self.vm_name}-{self.pid}"
        if self.hierarchy.version is CgroupVersion.V1:
            return self._setup_v1(name)
        return self._setup_v2(name)

    def _setup_v1(self, name: str) -> Path:
        # Under the thread's own cpu cgroup, so limits set above it (a slice, a container) still apply.
        base = self._current(self.thread_ids[0])
        group = base / name
        self.ceiling = effective_limit(self.hierarchy, base, self.fs.read)
        self._mkdir(group)
        # Capped by the quota, but first in line while under it: beside a migration's busy threads
        # (compressing, on a small host) the vCPUs otherwise wait their turn on top of the quota.
        self._write(group / "cpu.shares", str(VCPU_SHARES), f"setting the CPU shares of {group}")
        for i, tid in enumerate(self.thread_ids):
            child = group / f"vcpu{i}"
            self._mkdir(child)
            self._origin[tid] = self._current(tid)
            self._write(child / "tasks", str(tid), f"moving vCPU thread {tid} into {child}")
        return group

    def _setup_v2(self, name: str) -> Path:
        current = self._current(self.pid)
        parent = current.parent if current != self.hierarchy.mount else current
        controls = parent / "cgroup.subtree_control"
        if "cpu" not in self.fs.read(controls).split():
            self._write(controls, "+cpu", f"enabling the cpu controller in {parent}")
        group = parent / name
        self.ceiling = effective_limit(self.hierarchy, parent, self.fs.read)
        self._mkdir(group)
        self._origin[self.pid] = current
        self._write(group / "cgroup.procs", str(self.pid), f"moving QEMU process {self.pid} into {group}")
        for i, _ in enumerate(self.thread_ids):
            child = group / f"vcpu{i}"
            self._mkdir(child)
            self._write(child / "cgroup.type", "threaded", f"making {child} threaded")
        self._write(group / "cgroup.subtree_control", "+cpu", f"enabling the cpu controller in {group}")
        for i, tid in enumerate(self.thread_ids):
            child = group / f"vcpu{i}"
            # As v1's cpu.shares: each vCPU first in line, against QEMU's other threads in `group`.
            self._write(child / "cpu.weight", str(VCPU_WEIGHT), f"setting the CPU weight of {child}")
            self._write(child / "cgroup.threads", str(tid), f"moving vCPU thread {tid} into {group}")
        return group

    # ------------------------------------------------------------------ control

    @property
    def bandwidth(self) -> Bandwidth:
        """What each vCPU group gets: the fraction's bandwidth, within the limit of the groups above."""
        return clamp_bandwidth(bandwidth_for(self.fraction), self.ceiling)

    def set_throttle(self, fraction: float) -> None:
        """Take `fraction` of CPU time from every vCPU (0 = none; capped at 0.99)."""
        if self.released:
            raise InvalidInput(f"the vCPU throttle of VM {self.vm_name} was released")
        self._apply(bandwidth_for(fraction))
        self.fraction = min(fraction, MAX_FRACTION)

    def _apply(self, bw: Bandwidth) -> None:
        bw = clamp_bandwidth(bw, self.ceiling)
        for i in range(len(self.thread_ids)):
            child = self.group / f"vcpu{i}"
            what = f"setting the CPU bandwidth of {child}"
            if self.hierarchy.version is CgroupVersion.V1:
                # Period first: quota -1 or 1 ms is valid against any period.
                self._write(child / "cpu.cfs_period_us", str(bw.period_us), what)
                self._write(child / "cpu.cfs_quota_us", str(bw.quota_us if bw.quota_us else -1), what)
            else:
                quota = str(bw.quota_us) if bw.quota_us else "max"
                self._write(child / "cpu.max", f"{quota} {bw.period_us}", what)

    def release(self) -> None:
        """Lift the throttle, move the threads back, remove the cgroups. Idempotent; best effort on a dead VM."""
        if self.released:
            return
        problems: list[str] = []
        if self.fraction > 0:
            # Unthrottle in place first: a thread moved out of a throttled group waited up to ~1 s
            # before it ran again (seen on Linux 6.18, whose throttling parks tasks per task).
            try:
                self._apply(bandwidth_for(0.0))
            except KvmotionError:
                pass  # a group gone or refused shows again, and is reported, when it is emptied below
        for group in reversed(self._created):
            self._evacuate(group, problems)
        if self.hierarchy.version is CgroupVersion.V2 and self.pid_origin is not None:
            try:
                self.fs.write(self.pid_origin / "cgroup.procs", str(self.pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    problems.append(f"moving QEMU process {self.pid} back: {exc.strerror}")
        for group in reversed(self._created):
            self._remove(group, problems)
        self.released = True
        self.fraction = 0.0
        if problems:
            raise SetupError(f"releasing the vCPU throttle of VM {self.vm_name}: {'; '.join(problems)}")

    @property
    def pid_origin(self) -> Path | None:
        return self._origin.get(getattr(self, "pid", -1))

    def _evacuate(self, group: Path, problems: list[str]) -> None:
        """Move every thread out of `group` to where it came from (v2: into the VM's domain group)."""
        members = "tasks" if self.hierarchy.version is CgroupVersion.V1 else "cgroup.threads"
        try:
            tids = [int(t) for t in self.fs.read(group / members).split()]
        except OSError:
            return  # never created, or already gone
        for tid in tids:
            if self.hierarchy.version is CgroupVersion.V1:
                dest = self._origin.get(tid) or self._origin_default()
                target = dest / "tasks"
            else:
                if group.name.startswith(GROUP_PREFIX):
                    continue  # the VM's domain group: its process moves back as a whole
                target = group.parent / "cgroup.threads"
            try:
                self.fs.write(target, str(tid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # an exited thread leaves on its own
                    problems.append(f"moving thread {tid} out of {group}: {exc.strerror}")

    def _origin_default(self) -> Path:
        return next(iter(self._origin.values()), self.hierarchy.mount)

    def _remove(self, group: Path, problems: list[str]) -> None:
        failed = _rmdir(self.fs, group)
        if failed is not None:
            problems.append(f"removing {group}: {failed.strerror}")

    def __enter__(self) -> VcpuThrottle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"VcpuThrottle({self.vm_name!r}, threads={self.thread_ids}, fraction={self.fraction})"
