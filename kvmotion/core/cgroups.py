"""The cgroup cpu controller: where it is mounted, which group a process is in, the CPU limit a group
and its ancestors set, and groups with a CPU limit of their own (a lab host's capacity).

cgroup v1 (the cpu controller on a hierarchy of its own, as on this project's machines): a limit is
cpu.cfs_quota_us per cpu.cfs_period_us (-1: none). cgroup v2: cpu.max holds "QUOTA PERIOD" ("max":
none), and a group with children that use the controller holds no processes of its own, so a lab
host's processes live in a leaf under the limited group.

Parsing and arithmetic are pure; the reads and writes of cgroupfs are thin functions at the end.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvmotion.core.errors import InvalidInput, SetupError

LAB_ROOT = "kvmotion-lab"  # lab host groups: <mount>/kvmotion-lab/<lab>/<host>
LIMIT_PERIOD_US = 100_000  # the kernel's default CFS period
MIN_QUOTA_US = 1000  # the kernel's minimum quota
V2_LEAF = "procs"  # cgroup v2: where a limited host group's processes go


class CgroupVersion(str, Enum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class CpuHierarchy:
    """Where the cpu controller is mounted. `root` is the hierarchy path shown at `mount`."""

    version: CgroupVersion
    mount: Path
    root: str = "/"

    def path_of(self, cgroup_path: str) -> Path:
        """Directory of a cgroup path as /proc/<pid>/cgroup spells it."""
        rel = cgroup_path
        if self.root != "/":
            if not (rel == self.root or rel.startswith(self.root.rstrip("/") + "/")):
                raise SetupError(f"cgroup {cgroup_path} is outside the cpu hierarchy mounted at {self.mount}")
            rel = rel[len(self.root.rstrip("/")):]
        return self.mount / rel.lstrip("/")


def parse_mountinfo(text: str, fs_root: Path = Path("/")) -> CpuHierarchy | None:
    """The cpu controller's mount: a v1 `cgroup` mount with the cpu option wins (then cpu is not in v2)."""
    v2: CpuHierarchy | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mountpoint = fields[3], fields[4].replace("\\040", " ")
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup" and "cpu" in options:
            return CpuHierarchy(CgroupVersion.V1, fs_root / mountpoint.lstrip("/"), root)
        if fstype == "cgroup2" and v2 is None:
            controllers = fs_root / mountpoint.lstrip("/") / "cgroup.controllers"
            try:
                if "cpu" in controllers.read_text().split():
                    v2 = CpuHierarchy(CgroupVersion.V2, fs_root / mountpoint.lstrip("/"), root)
            except OSError:
                continue
    return v2


def find_hierarchy() -> CpuHierarchy | None:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def detect_hierarchy(purpose: str = "vCPU throttling") -> CpuHierarchy:
    found = find_hierarchy()
    if found is None:
        raise SetupError(
            "no cgroup cpu controller is mounted (neither a v1 'cpu' hierarchy nor cpu in cgroup v2): "
            f"{purpose} needs CONFIG_CFS_BANDWIDTH and a mounted cpu controller"
        )
    return found


def cgroup_of(proc_cgroup: str, version: CgroupVersion) -> str:
    """The cpu cgroup path in a /proc/<tid>/cgroup text."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if version is CgroupVersion.V2 and hid == "0" and controllers == "":
            return path
        if version is CgroupVersion.V1 and "cpu" in controllers.split(","):
            return path
    raise SetupError(f"no {version.value} cpu cgroup in /proc/<tid>/cgroup")


# ---- CPU limits ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuLimit:
    """A group's CFS bandwidth limit: `quota_us` of CPU time per `period_us` (cores = the ratio)."""

    quota_us: int
    period_us: int

    @property
    def cores(self) -> float:
        return self.quota_us / self.period_us

    def below(self, other: CpuLimit) -> bool:
        """Strictly less CPU than `other` (exact: integers cross-multiplied)."""
        return self.quota_us * other.period_us < other.quota_us * self.period_us


def limit_for(cores: float, period_us: int = LIMIT_PERIOD_US) -> CpuLimit:
    """The limit giving `cores` CPUs' worth of time (0.5: half a CPU), at the kernel's default period."""
    if not 0 < cores <= 4096:  # NaN fails too
        raise InvalidInput(f"invalid CPU capacity {cores:g}: use a number of cores above 0, e.g. 1 or 0.5")
    quota = round(cores * period_us)
    if quota < MIN_QUOTA_US:
        raise InvalidInput(f"invalid CPU capacity {cores:g}: at least {MIN_QUOTA_US / period_us:g} cores (the kernel's 1 ms quota)")
    return CpuLimit(quota_us=quota, period_us=period_us)


def parse_v1_limit(quota_text: str, period_text: str) -> CpuLimit | None:
    """cpu.cfs_quota_us and cpu.cfs_period_us; None when unlimited (-1) or unreadable."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return CpuLimit(quota, period) if quota > 0 and period > 0 else None


def parse_v2_limit(cpu_max: str) -> CpuLimit | None:
    """cpu.max ("QUOTA PERIOD" or "max PERIOD"); None when unlimited or unreadable."""
    parts = cpu_max.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    quota, period = int(parts[0]), int(parts[1])
    return CpuLimit(quota, period) if quota > 0 and period > 0 else None


def tightest(limits: list[CpuLimit | None]) -> CpuLimit | None:
    """The smallest of the limits (None: none is set)."""
    found: CpuLimit | None = None
    for limit in limits:
        if limit is not None and (found is None or limit.below(found)):
            found = limit
    return found


def effective_limit(hierarchy: CpuHierarchy, group: Path, read: Callable[[Path], str]) -> CpuLimit | None:
    """The tightest limit on `group` and each ancestor up to the mount: what its processes can get
    at most, and what cgroup v1 refuses a child's quota/period to exceed. Unreadable levels count
    as unlimited (the mount itself has no limit files)."""
    limits: list[CpuLimit | None] = []
    path = group
    while True:
        try:
            if hierarchy.version is CgroupVersion.V1:
                limits.append(parse_v1_limit(read(path / "cpu.cfs_quota_us"), read(path / "cpu.cfs_period_us")))
            else:
                limits.append(parse_v2_limit(read(path / "cpu.max")))
        except OSError:
            pass
        if path == hierarchy.mount or hierarchy.mount not in path.parents:
            break
        path = path.parent
    return tightest(limits)


def own_cpu_limit() -> CpuLimit | None:
    """The CPU limit this process's cpu cgroup and its ancestors set; None with none, or with no
    cpu controller mounted."""
    try:
        hierarchy = find_hierarchy()
        if hierarchy is None:
            return None
        group = hierarchy.path_of(cgroup_of(Path("/proc/self/cgroup").read_text(), hierarchy.version))
        return effective_limit(hierarchy, group, lambda p: p.read_text())
    except (OSError, SetupError):
        return None


# ---- a lab host's group -------------------------------------------------------------------------
@dataclass(frozen=True)
class HostGroup:
    """A lab host's cpu cgroup: `path` carries the limit, `procs` receives its processes."""

    path: Path
    procs: Path


def lab_group(hierarchy: CpuHierarchy, lab: str) -> Path:
    return hierarchy.mount / LAB_ROOT / lab


def host_group(hierarchy: CpuHierarchy, lab: str, host: str) -> HostGroup:
    """v1: the processes sit in the limited group itself (vCPU throttle groups nest under it);
    v2: in a leaf below it, so the vCPU throttle's groups (made next to a process's group) stay
    under the limit too."""
    path = lab_group(hierarchy, lab) / host
    return HostGroup(path=path, procs=path if hierarchy.version is CgroupVersion.V1 else path / V2_LEAF)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)  # one write() per value: cgroupfs parses each write as a unit
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable_cpu(group: Path) -> None:
    """cgroup v2: the cpu controller on for `group`'s children."""
    control = group / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        _write(control, "+cpu")


def usable_hierarchy(purpose: str) -> CpuHierarchy:
    """The cpu hierarchy, with CFS bandwidth control; SetupError (one line) if there is none."""
    hierarchy = detect_hierarchy(purpose)
    probe = "cpu.cfs_quota_us" if hierarchy.version is CgroupVersion.V1 else "cgroup.subtree_control"
    if not (hierarchy.mount / probe).exists():
        raise SetupError(f"the cpu cgroup at {hierarchy.mount} has no CFS bandwidth control ({probe}): {purpose} needs it")
    return hierarchy


def create_host_group(hierarchy: CpuHierarchy, lab: str, host: str, limit: CpuLimit) -> HostGroup:
    """The lab host's group with `limit` (made anew; SetupError naming what failed)."""
    group = host_group(hierarchy, lab, host)
    try:
        if hierarchy.version is CgroupVersion.V2:
            _enable_cpu(hierarchy.mount)
        for level in (group.path.parent.parent, group.path.parent, group.path):
            level.mkdir(exist_ok=True)
            if hierarchy.version is CgroupVersion.V2 and level != group.path:
                _enable_cpu(level)
        if hierarchy.version is CgroupVersion.V1:
            _write(group.path / "cpu.cfs_period_us", str(limit.period_us))
            _write(group.path / "cpu.cfs_quota_us", str(limit.quota_us))
        else:
            _write(group.path / "cpu.max", f"{limit.quota_us} {limit.period_us}")
            group.procs.mkdir(exist_ok=True)
    except OSError as exc:
        raise SetupError(f"creating the cpu cgroup {group.path}: {exc.strerror or exc}") from exc
    return group


def move_process(group: HostGroup, pid: int) -> None:
    """Process `pid` (all its threads) into the group; its children inherit it."""
    try:
        _write(group.procs / "cgroup.procs", str(pid))
    except OSError as exc:
        raise SetupError(f"moving process {pid} into the cpu cgroup {group.procs}: {exc.strerror or exc}") from exc


def remove_tree(path: Path, retries: int = 50) -> list[str]:
    """rmdir `path` and every group below it, deepest first (groups only hold kernel files, which
    go with them). A group whose last process has just been killed may stay busy a moment: retried.
    Returns what could not be removed."""
    if not path.is_dir():
        return []
    problems: list[str] = []
    groups = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for group in [*groups, path]:
        for attempt in range(retries):
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == retries - 1:
                    problems.append(f"{group}: {exc.strerror}")
                    break
                time.sleep(0.02)
    return problems
