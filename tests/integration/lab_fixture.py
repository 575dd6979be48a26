"""A lab cluster for migration tests: namespaces (kvmotion.net.lab) + the center, joined agents and
the datastore, each on a machine of its own (kvmotion.lab.cluster), driven through the CLI like a
user logged in to the center would, with the probes the tests need
(serial-log counters, QEMU processes per host, agent kill/restart, the switch's FDB).

Every lab has a unique name and is torn down with lab_down (which kills agents and QEMU in its
namespaces) even when the test fails; the agents' logs are copied to /tmp first for post-mortems.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socket import AF_BRIDGE
from typing import TypeVar

from pyroute2.netlink.rtnl import RTMGRP_NEIGH

from kvmotion.guest.serial import MemCorrupt, MemStatus, parse_line
from kvmotion.host.store import VmStore
from kvmotion.lab import cluster as labcluster
from kvmotion.lab.cluster import LabCluster, lab_agent_client, start_cluster
from kvmotion.net import lab as labmod
from kvmotion.net import netns

_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80  # neighbour states of static (non-learned) FDB entries


def unique_lab_name() -> str:
    """'t' + 6 random lowercase letters/digits: a valid lab name that no other run picks."""
    return "t" + "".join(random.choices(string.ascii_lowercase + string.digits, k=6))




@dataclass(frozen=True)
class MemLog:
    """The memory writer's console lines read from one serial log, from a byte offset on."""

    statuses: tuple[MemStatus, ...]
    corrupt: tuple[MemCorrupt, ...]
    end: int  # offset to read from next time


@dataclass(frozen=True)
class FdbSample:
    at: float  # time.time() of the read
    port: str | None
    updated_s_ago: float | None  # the bridge's own age of the entry (USER_HZ granularity)


@dataclass
class FdbWatcher:
    """Records where the physical switch's FDB puts one MAC, from the bridge's own netlink
    notifications (RTM_NEWNEIGH when it learns or moves an entry), in a thread.

    Event-driven, so each sample is stamped when the kernel tells, and the watcher costs no CPU
    while the migration it watches runs (polling a dump every few ms took most of a core on this
    2-core machine, from the very QEMUs being measured). The first sample is a dump."""

    ns: str
    bridge: str
    mac: str
    samples: list[FdbSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> FdbWatcher:
        self._thread = threading.Thread(target=self._run, name="fdb-watch", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the FDB watcher did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _record(self, msgs, br: int, names: dict, ticks: int, dump: bool) -> None:
        mac = self.mac.lower()
        port, age, seen = None, None, False
        for msg in msgs:
            if msg.get("event") not in (None, "RTM_NEWNEIGH", "RTM_DELNEIGH") or msg.get("family") != AF_BRIDGE:
                continue
            if msg.get("NDA_MASTER") != br or str(msg.get("NDA_LLADDR")).lower() != mac:
                continue
            if msg["state"] & (_NUD_PERMANENT | _NUD_NOARP):
                continue  # a bridge port's own address, not a learned one
            seen = True
            if msg.get("event") == "RTM_DELNEIGH":
                port, age = None, None
                continue
            port = names.get(msg["ifindex"], str(msg["ifindex"]))
            cache = msg.get("NDA_CACHEINFO")
            age = cache["ndm_updated"] / ticks if cache else None
        if dump or seen:
            self.samples.append(FdbSample(time.time(), port, age))

    def _run(self) -> None:
        with netns.ns_iproute(self.ns) as ipr:
            names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ticks = os.sysconf("SC_CLK_TCK")
            with netns.ns_iproute(self.ns) as events:
                events.bind(groups=RTMGRP_NEIGH)  # subscribed before the dump: no move falls between
                self._record(ipr.get_neighbours(family=AF_BRIDGE), br, names, ticks, dump=True)
                self._ready.set()
                while not self._stop.is_set():
                    if select.select([events.fileno()], [], [], 0.05)[0]:
                        self._record(events.get(), br, names, ticks, dump=False)

    def first_on(self, port: str, after: float) -> FdbSample | None:
        """The first read at or after `after` that shows the MAC on `port`."""
        for s in self.samples:
            if s.at >= after and s.port == port:
                return s
        return None


@dataclass
class MigrationLab:
    """One lab cluster as the tests see it."""

    cluster: LabCluster
    agent_procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def topo(self) -> labmod.LabTopology:
        return self.cluster.topology

    @property
    def env(self) -> dict[str, str]:
        return self.cluster.env

    # ---- the CLI --------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvmotion.cli.main", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def cli_ok(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = self.cli(*args, timeout=timeout)
        assert r.returncode == 0, f"kvmotion {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}"
        return r

    def cli_json(self, *args: str, timeout: float = 120) -> object:
        return json.loads(self.cli_ok(*args, "--json", timeout=timeout).stdout)

    def migrate(self, vm: str, to: str, *extra: str, timeout: float = 180) -> dict:
        """`kvmotion migrate VM --to HOST --json` (encrypted as the lab's cluster says); the final record."""
        r = self.cli("migrate", vm, "--to", to, *extra, "--json", timeout=timeout)
        assert r.stdout.strip(), f"migrate printed no record ({r.returncode}): {r.stderr.strip()}"
        rec = json.loads(r.stdout)
        rec["_returncode"] = r.returncode
        rec["_stderr"] = r.stderr.strip()
        return rec

    # ---- VMs ------------------------------------------------------------------------------------
    def mac(self, k: int) -> str:
        return f"52:54:00:{self.topo.index:02x}:{k >> 8:02x}:{k & 0xFF:02x}"

    def create_vm(self, name: str, host: str = "host-a", *, k: int = 0, memory: str = "256M",
                  workload: str = "echo", mem_wss: str = "64M", mem_rate: str = "10M",
                  disks: tuple[str, ...] = (), start: bool = True) -> None:
        """Define (and start) a VM with one NIC on the lab's port group at the k-th VM address."""
        nic = f"pg={self.topo.portgroup},mac={self.mac(k)},ip={self.topo.vm_ip(k)}/{self.topo.vm_prefix}"
        args = ["vm", "create", name, "--host", host, "--memory", memory, "--nic", nic,
                "--workload", workload, "--mem-wss", mem_wss, "--mem-rate", mem_rate]
        for d in disks:
            args += ["--disk", d]
        self.cli_ok(*args)
        if start:
            self.cli_ok("vm", "start", name, timeout=90)
            self.wait_ready(host, name)

    def wait_ready(self, host: str, vm: str, timeout: float = 60) -> None:
        """Until the guest's ready line (the center's start task ends when QEMU runs)."""
        client = self.agent(host)
        deadline = time.monotonic() + timeout
        while not client.vm(vm).ready:
            assert time.monotonic() < deadline, f"VM {vm} on {host} was not ready within {timeout} s"
            time.sleep(0.1)

    def vm_list(self) -> list[dict]:
        return self.cli_json("vm", "list")  # type: ignore[return-value]

    def running_hosts(self, vm: str) -> list[str]:
        """Hosts on which `kvmotion vm list` shows VM `vm` running."""
        return sorted(v["host"] for v in self.vm_list() if v["name"] == vm and v["state"] == "running")

    def listed(self, vm: str) -> list[tuple[str, str]]:
        """(host, state) of every copy of `vm` that `kvmotion vm list` shows."""
        return sorted((v["host"], v["state"]) for v in self.vm_list() if v["name"] == vm)

    def qemu_pids(self, vm: str) -> dict[str, list[int]]:
        """Per host: live QEMU processes whose command line carries process=kvmotion:<vm>."""
        tag = f"process=kvmotion:{vm}".encode()
        out: dict[str, list[int]] = {}
        for h in self.topo.hosts:
            pids = []
            for pid in netns.pids_in_ns(h.ns):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if tag in cmd and b"qemu-system" in cmd and state != "Z":
                    pids.append(pid)
            out[h.name] = pids
        return out

    def qemu_hosts(self, vm: str) -> list[str]:
        return sorted(h for h, pids in self.qemu_pids(vm).items() for _ in pids)

    def wait_qemu_hosts(self, vm: str, expected: list[str], timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while (hosts := self.qemu_hosts(vm)) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return hosts

    def vm_record(self, host: str, vm: str):
        """The agent's persisted record of `vm` on `host` (None if it has none)."""
        from kvmotion.core.errors import NotFound

        try:
            return VmStore(self.cluster.host_state(host)).get(vm)
        except NotFound:
            return None

    # ---- the guest's console --------------------------------------------------------------------
    def serial_log(self, host: str, vm: str) -> Path:
        return self.cluster.serial_log(host, vm)

    def mem_log(self, host: str, vm: str, offset: int = 0) -> MemLog:
        try:
            with open(self.serial_log(host, vm), "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return MemLog((), (), offset)
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        events = [parse_line(ln) for ln in whole.decode(errors="replace").splitlines()]
        return MemLog(
            statuses=tuple(e for e in events if isinstance(e, MemStatus)),
            corrupt=tuple(e for e in events if isinstance(e, MemCorrupt)),
            end=offset + len(whole),
        )

    def wait_mem_status(self, host: str, vm: str, offset: int, count: int = 1, timeout: float = 20) -> MemLog:
        """Wait for `count` new MEM status lines in `host`'s serial log of `vm` after `offset`."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.mem_log(host, vm, offset)
            if len(log.statuses) >= count or time.monotonic() > deadline:
                return log
            time.sleep(0.1)

    # ---- agents ---------------------------------------------------------------------------------
    def agent_pids(self, host: str) -> list[int]:
        found = []
        for pid in netns.pids_in_ns(self.topo.host(host).ns):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmd and b"host" in cmd and b"kvmotion.cli.main" in cmd:
                found.append(pid)
        return found

    def kill_agent(self, host: str) -> None:
        """SIGKILL the host's agent (QEMU processes live on: they run in their own sessions)."""
        pids = self.agent_pids(host)
        assert pids, f"no agent running on {host}"
        for pid in pids:
            netns._signal(pid, signal.SIGKILL)  # tolerant of a pid already gone
        deadline = time.monotonic() + 5
        while any(netns._alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def start_agent(self, host: str, timeout: float = 30) -> None:
        """Start `host`'s agent again the way start_cluster does (joined, on its own machine), and
        wait until it answers."""
        self.agent_procs[host] = labcluster.start_agent(self.cluster, host, timeout)

    def agent(self, host: str, timeout: float = 5):
        """A client of `host`'s agent API (for fast polling; the tests act through the CLI)."""
        return lab_agent_client(self.cluster, host, timeout)  # as the lab's admin user (its login)

    def migration_of(self, source: str, vm: str) -> dict | None:
        """The latest migration record of `vm` on its source agent (JSON), or None."""
        recs = [r for r in self.agent(source).request("GET", "/v1/migrations") if r["vm"] == vm]  # type: ignore[union-attr]
        return max(recs, key=lambda r: r["started_at"]) if recs else None

    def wait_precopy(self, source: str, vm: str, min_bytes: int = 4 << 20, timeout: float = 30) -> dict:
        """Wait until `vm`'s migration from `source` is in pre-copy and has sent `min_bytes`."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.migration_of(source, vm)
            if rec is not None:
                assert rec["phase"] in ("check", "prepare", "precopy"), f"migration left pre-copy: {rec['phase']} {rec.get('error')}"
                if rec["phase"] == "precopy" and rec["progress"]["transferred"] >= min_bytes:
                    return rec
            assert time.monotonic() < deadline, f"no migration of {vm} reached pre-copy within {timeout} s"
            time.sleep(0.05)

    def wait_phase(self, source: str, vm: str, phase: str, timeout: float = 30) -> dict:
        """Wait until `vm`'s migration from `source` is in `phase`; fails early if it ended."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.migration_of(source, vm)
            if rec is not None:
                if rec["phase"] == phase:
                    return rec
                assert rec["phase"] not in ("done", "failed", "cancelled"), (
                    f"migration of {vm} ended ({rec['phase']}) before {phase}: {rec.get('error')}")
            assert time.monotonic() < deadline, f"the migration of {vm} did not reach {phase} within {timeout} s: {rec}"
            time.sleep(0.02)

    def start_migrate(self, vm: str, to: str, *extra: str) -> subprocess.Popen:
        """`kvmotion migrate VM --to HOST --json` in the background (to cancel it or break it)."""
        return subprocess.Popen(
            [sys.executable, "-m", "kvmotion.cli.main", "migrate", vm, "--to", to, *extra, "--json"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def finish_migrate(proc: subprocess.Popen, timeout: float = 120) -> dict:
        """The final record printed by a start_migrate() process, with its exit code and stderr."""
        out, err = proc.communicate(timeout=timeout)
        assert out.strip(), f"migrate printed no record ({proc.returncode}): {err.strip()}"
        rec = json.loads(out)
        rec["_returncode"] = proc.returncode
        rec["_stderr"] = err.strip()
        return rec

    def agent_log(self, host: str) -> str:
        p = self.cluster.log(host)
        return p.read_text(errors="replace") if p.exists() else ""

    # ---- the switch -----------------------------------------------------------------------------
    def set_mgmt_link(self, host: str, up: bool) -> None:
        """Cut (or restore) `host`'s mgmt/vMotion uplink at the switch: its agent API and every
        migration stream to or from it go silent, as with a pulled cable."""
        with netns.ns_iproute(self.topo.switch_ns) as ipr:
            idx = ipr.link_lookup(ifname=self.topo.host(host).switch_mgmt_port)[0]
            ipr.link("set", index=idx, state="up" if up else "down")

    def switch_port_of(self, host: str) -> str:
        return self.topo.host(host).switch_vm_port

    def fdb_port(self, mac: str) -> str | None:
        return netns.fdb_port(self.topo.switch_ns, self.topo.switch_bridge, mac)

    def fdb_watch(self, mac: str) -> FdbWatcher:
        return FdbWatcher(self.topo.switch_ns, self.topo.switch_bridge, mac)

    # ---- the client -----------------------------------------------------------------------------
    def start_probe(self, target: str, out: Path, log: Path, *extra: str) -> subprocess.Popen:
        """The client probe (kvmotion.net.probe) in the client namespace, until SIGTERM."""
        argv = [sys.executable, "-m", "kvmotion.net.probe", "--target", target, "--out", str(out), *extra]
        return labmod.spawn_in_ns(self.topo.client.ns, argv, log, self.env)


def _keep_logs(cluster: LabCluster, folder: Path) -> None:
    """Copy the lab's logs into `folder` before lab_down removes the lab's (post-mortems)."""
    logs = cluster.folder / "logs"
    if logs.is_dir():
        dest = folder / cluster.topology.name
        shutil.copytree(logs, dest, dirs_exist_ok=True)
        print(f"lab {cluster.topology.name}: logs kept in {dest}", file=sys.stderr)
        for h in cluster.topology.hosts:
            for vm_dir in (cluster.host_run(h.name) / "vms").glob("*"):
                for name in ("serial.log", "qemu.log"):
                    src = vm_dir / name
                    if src.exists():
                        shutil.copy(src, dest / f"{h.name}-{vm_dir.name}-{name}")


LabFactory = Callable[..., MigrationLab]
T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.3) -> T:
    """`probe()`'s first true value, asked every `every` s; the test fails after `timeout` s, saying `what`."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(every)
    return value


def lab_factory(keep_logs: Callable[[], Path | None] = lambda: None) -> Iterator[LabFactory]:
    """Generator behind the `make_lab` fixture: make_lab(hosts=2, link_rate=None, encrypted=True,
    host_cpu=None) builds a lab and starts its cluster; every lab made is torn down at the end,
    whatever happened. `keep_logs()` says, at the end, where to keep the labs' logs (None: nowhere)."""
    made: list[str] = []
    clusters: list[LabCluster] = []

    def make(hosts: int = 2, link_rate: int | None = None, encrypted: bool = True,
             host_cpu: float | None = None) -> MigrationLab:
        name = unique_lab_name()
        topo = labmod.lab_up(name, hosts, link_rate, host_cpu)  # tears a half-built lab down itself
        made.append(name)
        cluster = start_cluster(topo, encrypted=encrypted)
        clusters.append(cluster)
        return MigrationLab(cluster=cluster)

    try:
        yield make
    finally:
        folder = keep_logs() if clusters else None
        for cluster in clusters if folder is not None else ():
            try:
                _keep_logs(cluster, folder)
            except OSError as exc:
                print(f"lab {cluster.topology.name}: logs not kept: {exc}", file=sys.stderr)
        errors = []
        for name in made:
            try:
                labmod.lab_down(name)
            except Exception as exc:  # noqa: BLE001 - tear every lab down, report the first failure
                errors.append(f"lab {name}: {exc}")
        assert not errors, "; ".join(errors)
