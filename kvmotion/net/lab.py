"""A lab: a small data centre made of network namespaces on one machine.

    root ns ──kvl-NAME──┐
    host-a  mgmt0 ──────┤                      (mgmt/vMotion subnet, tbf-shaped with --link)
    host-a  vm-net─vmup0┤  "physical switch"   (VM subnet; guests' TAPs join vm-net)
    host-b  ...         ├── bridge sw0 in ns kvl-NAME-sw (MAC learning, STP off)
    datastore mgmt0 ────┤
    center  mgmt0 ──────┤                      (the control plane, unshaped)
    client  eth0 ───────┘                      (VM subnet: plays the users)

The plan (names, addresses) is pure and persisted as JSON under run_dir()/labs/NAME/lab.json so
another process can tear the lab down or find its hosts.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shutil
import string
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core import cgroups, paths
from kvmotion.core.errors import Conflict, InvalidInput, NotFound, SetupError
from kvmotion.net import links, netns

LAB_VERSION = 2  # 2: a center namespace
NS_PREFIX = "kvl-"
MAX_HOSTS = 26  # host-a .. host-z
MAX_LABS = 128  # two /24s per lab inside 10.77.0.0/16
PORTGROUP = "vm-net"
SWITCH_BRIDGE = "sw0"
_NAME_RE = re.compile(r"^[a-z0-9]{1,10}$")  # no '-': keeps "kvl-NAME-" an unambiguous prefix


def check_lab_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid lab name {name!r}: use 1-10 lowercase letters and digits")
    return name


@dataclass(frozen=True)
class LabHost:
    """A hypervisor host: a namespace with a mgmt uplink and a VM-traffic uplink in its vm-net bridge."""

    name: str  # "host-a"
    ns: str
    mgmt_ip: str  # without prefix
    mgmt_if: str  # in ns
    vm_bridge: str  # the port group's bridge in ns: TAPs join it
    vm_uplink: str  # in ns, enslaved to vm_bridge
    switch_mgmt_port: str  # in the switch ns
    switch_vm_port: str


@dataclass(frozen=True)
class LabEndpoint:
    """A single-homed namespace (datastore and center on mgmt, client on the VM subnet)."""

    name: str
    ns: str
    ip: str
    ifname: str  # in ns
    switch_port: str


@dataclass(frozen=True)
class LabTopology:
    name: str
    index: int  # picks the subnets; unique among the labs that are up
    mgmt_subnet: str  # "10.77.0.0/24"
    vm_subnet: str
    switch_ns: str
    switch_bridge: str
    root_if: str  # our veth end in the root namespace
    root_ip: str
    root_switch_port: str
    hosts: tuple[LabHost, ...]
    datastore: LabEndpoint
    center: LabEndpoint
    client: LabEndpoint
    portgroup: str = PORTGROUP
    link_rate: int | None = None  # bytes/s of the shaped mgmt uplinks; None = unshaped
    host_cpu: float | None = None  # cores each host may use (a cpu cgroup limit); None = unlimited
    version: int = LAB_VERSION

    @property
    def mgmt_prefix(self) -> int:
        return ipaddress.ip_network(self.mgmt_subnet).prefixlen

    @property
    def vm_prefix(self) -> int:
        return ipaddress.ip_network(self.vm_subnet).prefixlen

    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_ns, *(h.ns for h in self.hosts), self.datastore.ns, self.center.ns, self.client.ns)

    def host(self, name: str) -> LabHost:
        """A host by name ('host-a') or letter ('a')."""
        for h in self.hosts:
            if name in (h.name, h.name.removeprefix("host-")):
                return h
        raise NotFound(f"lab {self.name} has no host {name!r}: it has {', '.join(h.name for h in self.hosts)}")

    def vm_ip(self, k: int) -> str:
        """The k-th address handed to guests on the VM subnet (after the client's)."""
        net = ipaddress.ip_network(self.vm_subnet)
        if not 0 <= k < net.num_addresses - 20:
            raise InvalidInput(f"no VM address number {k} in {self.vm_subnet}")
        return str(net.network_address + 10 + k)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> LabTopology:
        raw = json.loads(text)
        if raw.get("version") != LAB_VERSION:
            raise SetupError(f"lab description version {raw.get('version')} is not {LAB_VERSION}: run `kvmotion lab down`")
        raw["hosts"] = tuple(LabHost(**h) for h in raw["hosts"])
        raw["datastore"] = LabEndpoint(**raw["datastore"])
        raw["center"] = LabEndpoint(**raw["center"])
        raw["client"] = LabEndpoint(**raw["client"])
        return LabTopology(**raw)


def plan_lab(name: str, index: int, hosts: int = 3, link_rate: int | None = None,
             host_cpu: float | None = None) -> LabTopology:
    """Every name and address of a lab (pure): lab `index` gets 10.77.(2i).0/24 for mgmt and
    10.77.(2i+1).0/24 for VMs."""
    check_lab_name(name)
    if host_cpu is not None:
        cgroups.limit_for(host_cpu)  # InvalidInput unless a usable number of cores
    if not 1 <= hosts <= MAX_HOSTS:
        raise InvalidInput(f"invalid host count {hosts}: use 1-{MAX_HOSTS}")
    if not 0 <= index < MAX_LABS:
        raise InvalidInput(f"invalid lab index {index}: use 0-{MAX_LABS - 1}")
    mgmt = ipaddress.ip_network(f"10.77.{2 * index}.0/24")
    vm = ipaddress.ip_network(f"10.77.{2 * index + 1}.0/24")
    base = f"{NS_PREFIX}{name}-"
    host_list = []
    for i, letter in enumerate(string.ascii_lowercase[:hosts]):
        host_list.append(
            LabHost(
                name=f"host-{letter}",
                ns=f"{base}host-{letter}",
                mgmt_ip=str(mgmt.network_address + 11 + i),
                mgmt_if="mgmt0",
                vm_bridge=PORTGROUP,
                vm_uplink="vmup0",
                switch_mgmt_port=f"{letter}-mgmt",
                switch_vm_port=f"{letter}-vm",
            )
        )
    return LabTopology(
        name=name,
        index=index,
        mgmt_subnet=str(mgmt),
        vm_subnet=str(vm),
        switch_ns=f"{base}sw",
        switch_bridge=SWITCH_BRIDGE,
        root_if=f"{NS_PREFIX}{name}",
        root_ip=str(mgmt.network_address + 1),
        root_switch_port="root",
        hosts=tuple(host_list),
        datastore=LabEndpoint(
            name="datastore", ns=f"{base}ds", ip=str(mgmt.network_address + 2), ifname="mgmt0", switch_port="ds-mgmt"
        ),
        center=LabEndpoint(
            name="center", ns=f"{base}ctr", ip=str(mgmt.network_address + 3), ifname="mgmt0", switch_port="ctr-mgmt"
        ),
        client=LabEndpoint(
            name="client", ns=f"{base}client", ip=str(vm.network_address + 2), ifname="eth0", switch_port="client"
        ),
        link_rate=link_rate,
        host_cpu=host_cpu,
    )


# --- persistence --------------------------------------------------------------------------------


def labs_dir() -> Path:
    return paths.run_dir() / "labs"


def lab_dir(name: str) -> Path:
    return labs_dir() / check_lab_name(name)


def lab_file(name: str) -> Path:
    return lab_dir(name) / "lab.json"


def load_lab(name: str) -> LabTopology:
    path = lab_file(name)
    try:
        return LabTopology.from_json(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"lab {name} is not up: start it with `kvmotion lab up --name {name}`") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise SetupError(f"lab description {path} is unreadable ({exc}): run `kvmotion lab down --name {name}`") from exc


def list_labs() -> list[LabTopology]:
    found = []
    if labs_dir().is_dir():
        for path in sorted(labs_dir().glob("*/lab.json")):
            try:
                found.append(load_lab(path.parent.name))
            except (SetupError, InvalidInput):
                continue
    return found


@contextmanager
def _labs_lock() -> Iterator[None]:
    """Serialises `lab up` allocations between processes."""
    labs_dir().mkdir(parents=True, exist_ok=True)
    with open(labs_dir() / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _free_index() -> int:
    """The lowest index no lab description claims and whose subnets no root-namespace address
    overlaps (labs described under another KVMOTION_RUN, or anything else on the machine)."""
    used = {lab.index for lab in list_labs()}
    addrs = [ipaddress.ip_interface(a).network for a in netns.ipv4_addresses()]
    for i in range(MAX_LABS):
        if i in used:
            continue
        plan = (ipaddress.ip_network(f"10.77.{2 * i}.0/24"), ipaddress.ip_network(f"10.77.{2 * i + 1}.0/24"))
        if not any(net.overlaps(a) for net in plan for a in addrs):
            return i
    raise Conflict(f"{MAX_LABS} labs are up already: take one down with `kvmotion lab down --name NAME`")


# --- building and tearing down ------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SetupError("labs need root (network namespaces, bridges): run kvmotion as root")


def _quiet_namespace() -> None:
    """Inside a lab namespace: no IPv6 autoconf, so only our own traffic shows on the switch, and
    ARP answered only on the interface that owns the address (hosts are multi-homed on one L2)."""
    knobs = [(f"ipv6/conf/{c}/disable_ipv6", "1") for c in ("all", "default")]
    knobs += [(f"ipv4/conf/{c}/{k}", v) for c in ("all", "default") for k, v in (("arp_ignore", "1"), ("arp_announce", "2"))]
    for knob, value in knobs:
        try:
            Path(f"/proc/sys/net/{knob}").write_text(value)
        except OSError:
            pass


def host_cpu_group(topo: LabTopology, host: str) -> cgroups.HostGroup | None:
    """Where `host`'s processes go when the lab limits its CPU (None: it does not)."""
    if topo.host_cpu is None:
        return None
    return cgroups.host_group(cgroups.usable_hierarchy("--host-cpu"), topo.name, topo.host(host).name)


def _lab_cgroup(name: str) -> Path | None:
    """The lab's cpu cgroup folder if one exists (from `lab up --host-cpu`)."""
    hierarchy = cgroups.find_hierarchy()
    if hierarchy is None:
        return None
    path = cgroups.lab_group(hierarchy, name)
    return path if path.is_dir() else None


def _create_cgroups(topo: LabTopology) -> None:
    if topo.host_cpu is None:
        return
    hierarchy = cgroups.usable_hierarchy("--host-cpu")
    limit = cgroups.limit_for(topo.host_cpu)
    for h in topo.hosts:
        cgroups.create_host_group(hierarchy, topo.name, h.name, limit)


def _remove_cgroups(name: str) -> list[str]:
    """The lab's cpu cgroups (its processes killed first), and the shared parent if no lab uses it."""
    path = _lab_cgroup(name)
    if path is None:
        return []
    problems = cgroups.remove_tree(path)
    try:
        path.parent.rmdir()  # kvmotion-lab/: under the labs lock, so no `lab up` is filling it now
    except OSError:
        pass  # another lab's groups are in it
    return problems


def _leftover_namespaces(name: str) -> list[str]:
    prefix = f"{NS_PREFIX}{name}-"
    return [ns for ns in netns.list_ns() if ns.startswith(prefix)]


def lab_up(name: str, hosts: int = 3, link_rate: int | None = None, host_cpu: float | None = None) -> LabTopology:
    """Build a lab and persist its description; Conflict if one of that name exists. `host_cpu`:
    each host's processes (its agent, and the QEMUs it starts) share that many cores."""
    check_lab_name(name)
    _require_root()
    if host_cpu is not None:
        cgroups.limit_for(host_cpu)
        cgroups.usable_hierarchy("--host-cpu")  # refused before anything is made
    with _labs_lock():
        if (lab_file(name).exists() or _leftover_namespaces(name) or netns.link_exists_in(None, f"{NS_PREFIX}{name}")
                or _lab_cgroup(name)):
            raise Conflict(f"lab {name} is already up (or half built): run `kvmotion lab down --name {name}` first")
        topo = plan_lab(name, _free_index(), hosts, link_rate, host_cpu)
        lab_dir(name).mkdir(parents=True, exist_ok=True)
        # Written before building so that `lab down` can clean up a build that died half way.
        lab_file(name).write_text(topo.to_json())
    try:
        with _labs_lock():  # kvmotion-lab/ is shared with other labs' `lab down`
            _create_cgroups(topo)
        _build(topo)
    except BaseException:
        try:
            lab_down(name)
        except Exception:  # noqa: BLE001 - the build error is the one to report
            pass
        raise
    return topo


def _build(topo: LabTopology) -> None:
    for ns in topo.namespaces():
        netns.create_ns(ns)
        netns.run_in_ns(ns, _quiet_namespace)
    sw = topo.switch_ns
    netns.run_in_ns(sw, links.ensure_bridge, topo.switch_bridge)

    def uplink(ns: str | None, ifname: str, port: str) -> None:
        netns.create_veth(ifname, ns, port, sw)
        netns.run_in_ns(sw, links.enslave, port, topo.switch_bridge)

    uplink(None, topo.root_if, topo.root_switch_port)
    links.quiet_ipv6(topo.root_if)
    netns.add_address(None, topo.root_if, f"{topo.root_ip}/{topo.mgmt_prefix}")

    for h in topo.hosts:
        uplink(h.ns, h.mgmt_if, h.switch_mgmt_port)
        netns.add_address(h.ns, h.mgmt_if, f"{h.mgmt_ip}/{topo.mgmt_prefix}")
        netns.run_in_ns(h.ns, links.ensure_bridge, h.vm_bridge)
        uplink(h.ns, h.vm_uplink, h.switch_vm_port)
        netns.run_in_ns(h.ns, links.enslave, h.vm_uplink, h.vm_bridge)
        if topo.link_rate:
            netns.shape(h.ns, h.mgmt_if, topo.link_rate)
            netns.shape(sw, h.switch_mgmt_port, topo.link_rate)

    ds = topo.datastore
    uplink(ds.ns, ds.ifname, ds.switch_port)
    netns.add_address(ds.ns, ds.ifname, f"{ds.ip}/{topo.mgmt_prefix}")
    if topo.link_rate:
        netns.shape(ds.ns, ds.ifname, topo.link_rate)
        netns.shape(sw, ds.switch_port, topo.link_rate)

    ctr = topo.center
    uplink(ctr.ns, ctr.ifname, ctr.switch_port)
    netns.add_address(ctr.ns, ctr.ifname, f"{ctr.ip}/{topo.mgmt_prefix}")

    cl = topo.client
    uplink(cl.ns, cl.ifname, cl.switch_port)
    netns.add_address(cl.ns, cl.ifname, f"{cl.ip}/{topo.vm_prefix}")


@dataclass(frozen=True)
class LabDownReport:
    name: str
    killed_pids: tuple[int, ...]
    namespaces_removed: tuple[str, ...]


def lab_down(name: str) -> LabDownReport:
    """Kill every process in the lab's namespaces, delete its links and namespaces and its state.
    Works on a half-built lab and on one whose description is gone (by namespace prefix)."""
    check_lab_name(name)
    _require_root()
    namespaces = set(_leftover_namespaces(name))
    try:
        namespaces.update(load_lab(name).namespaces())
    except (NotFound, SetupError):
        pass
    killed: list[int] = []
    for ns in sorted(namespaces):
        killed += netns.kill_ns_processes(ns)
    netns.delete_link_in(None, f"{NS_PREFIX}{name}")
    removed = []
    for ns in sorted(namespaces):
        if netns.ns_exists(ns):
            netns.delete_ns(ns)
            removed.append(ns)
    with _labs_lock():
        cgroup_problems = _remove_cgroups(name)
    shutil.rmtree(lab_dir(name), ignore_errors=True)
    if _leftover_namespaces(name):
        raise SetupError(f"lab {name}: namespaces {', '.join(_leftover_namespaces(name))} could not be removed")
    if cgroup_problems:
        raise SetupError(f"lab {name}: cpu cgroups could not be removed: {'; '.join(cgroup_problems)}")
    return LabDownReport(name=name, killed_pids=tuple(sorted(killed)), namespaces_removed=tuple(removed))


@dataclass(frozen=True)
class LabHealth:
    name: str
    missing_namespaces: tuple[str, ...]
    root_link: bool

    @property
    def ok(self) -> bool:
        return not self.missing_namespaces and self.root_link


def lab_health(topo: LabTopology) -> LabHealth:
    present = set(netns.list_ns())
    return LabHealth(
        name=topo.name,
        missing_namespaces=tuple(ns for ns in topo.namespaces() if ns not in present),
        root_link=netns.link_exists_in(None, topo.root_if),
    )


def spawn_in_ns(ns: str, argv: Sequence[str], log_path: Path | str, env: dict[str, str] | None = None,
                hide: Sequence[Path] = ()) -> subprocess.Popen:
    """Start `argv` inside namespace `ns`, stdout+stderr appended to `log_path`, in its own session
    (so a Ctrl-C aimed at the caller does not reach it), the folders in `hide` covered from it
    (another machine's files); `lab down` kills it with the namespace."""
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return netns.popen_in_ns(
            ns,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            hide=hide,
        )
