"""Runs the demo (I/O): builds a lab cluster, boots a VM from a datastore disk, starts the client
probe, migrates the VM around the hosts, checks each migration, writes the report and picture,
and tears the lab down whatever happens (the caller turns Ctrl-C and SIGTERM into KeyboardInterrupt).
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvmotion.api.agent import AgentClient
from kvmotion.api.datastore import client_for as client_for_datastore
from kvmotion.api.hosts import all_vms, client_for
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase, record_from_json
from kvmotion.api.registry import Registry
from kvmotion.api.spec import MIN_MEMORY, DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.core.errors import InvalidInput, KvmotionError, SetupError
from kvmotion.core.interrupts import uninterruptible
from kvmotion.core.units import format_size
from kvmotion.demo import report as rpt
from kvmotion.demo.chart import MigrationMark, render_svg
from kvmotion.demo.guestlog import GuestLog
from kvmotion.guest.cmdline import max_working_set
from kvmotion.guest.records import RecordCheck, verify_image
from kvmotion.guest.serial import MemCorrupt, MemStatus
from kvmotion.lab.cluster import DATASTORE, LabCluster, cluster_env, start_cluster
from kvmotion.net import lab as labmod
from kvmotion.net import netns
from kvmotion.net.probe import ProbeReport

HOSTS = 3
VM = "web1"
VM_MAC = "52:54:00:de:30:01"
DISK = "demo1.img"
DISK_SIZE = 256 << 20
MAX_WSS = 64 << 20  # the memory writer's working set: a quarter of RAM, at most this
BOOT_TIMEOUT_S = 90.0
BASELINE_S = 1.0  # probe time before the first migration, and the least time between migrations
PROBE_START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class DemoOptions:
    memory: int
    dirty_rate: int  # bytes/s the guest's memory writer dirties (0: as fast as it can)
    link_rate: int | None  # bytes/s of the lab's shaped links; None: unshaped
    migrations: int
    encrypted: bool
    report: Path

    def validate(self) -> None:
        """Refuse bad input before building anything."""
        if self.memory < MIN_MEMORY:
            raise InvalidInput(f"invalid --memory {format_size(self.memory)}: the VM needs at least {MIN_MEMORY >> 20}M")
        if self.migrations < 1:
            raise InvalidInput(f"invalid --migrations {self.migrations}: use 1 or more")
        if self.report.suffix.lower() != ".json":
            raise InvalidInput(f"invalid --report {self.report}: use FILE.json (the picture goes beside it as FILE.svg)")
        try:  # a real write: os.access says yes to root even where files cannot be created (/proc)
            self.report.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.report.parent, prefix=".kvmotion-demo-"):
                pass
        except OSError as exc:
            raise InvalidInput(
                f"cannot write the report into {self.report.parent} ({exc.strerror}): choose another --report"
            ) from None

    @property
    def picture(self) -> Path:
        return self.report.with_suffix(".svg")

    @property
    def logs(self) -> Path:
        """Where the lab's logs are kept when something failed."""
        return self.report.with_name(self.report.stem + "-logs")

    @property
    def mem_wss(self) -> int:
        return min(MAX_WSS, self.memory // 4, max_working_set(self.memory)) // 4096 * 4096


class DemoView(Protocol):
    """How the run shows itself (the CLI renders it with rich)."""

    def step(self, text: str) -> None: ...

    def follow(self, client: AgentClient, rec: MigrationRecord) -> MigrationRecord: ...

    def migrated(self, index: int, rec: MigrationRecord) -> None: ...


def route(migrations: int, hosts: int = HOSTS) -> list[tuple[str, str]]:
    """host-a → host-b → host-c → host-a …, `migrations` hops."""
    names = [f"host-{chr(ord('a') + i)}" for i in range(hosts)]
    return [(names[i % hosts], names[(i + 1) % hosts]) for i in range(migrations)]


def new_lab_name() -> str:
    return "demo" + secrets.token_hex(3)


class _Probe:
    """The client probe, running in the lab's client namespace until told to stop."""

    def __init__(self, cluster: LabCluster, target: str, out: Path) -> None:
        self.out = out
        self.log = cluster.folder / "logs" / "probe.log"
        argv = [sys.executable, "-m", "kvmotion.net.probe", "--target", target, "--out", str(out)]
        self.proc = labmod.spawn_in_ns(cluster.topology.client.ns, argv, self.log, cluster.env)

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_running(self) -> None:
        deadline = time.monotonic() + PROBE_START_TIMEOUT_S
        while "probe: running" not in self._log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self._log_text().strip().splitlines()[-1:]
                raise SetupError(f"the client probe did not start: {tail[0] if tail else 'no output'} (log: {self.log})")
            time.sleep(0.05)

    def stop(self) -> ProbeReport:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if not self.out.exists():
            tail = self._log_text().strip().splitlines()[-1:]
            raise SetupError(f"the client probe wrote no report: {tail[0] if tail else 'no output'} (log: {self.log})")
        return ProbeReport.from_json(self.out.read_text())


def _tagged_qemu(ns: str, vm: str) -> int:
    """QEMU processes in `ns` that carry the VM's process tag (-name …,process=kvmotion:VM)."""
    tag = f"process=kvmotion:{vm}".encode()
    n = 0
    for pid in netns.pids_in_ns(ns):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(arg.endswith(tag) for arg in cmdline.split(b"\0")):
            n += 1
    return n


def _copies(topo: labmod.LabTopology) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(hosts whose agent lists the VM with a process, hosts with a tagged QEMU process) — a host
    appears once per copy."""
    vms, _ = all_vms()
    running = tuple(sorted(v.host for v in vms if v.name == VM and v.pid is not None))
    qemu = tuple(sorted(h.name for h in topo.hosts for _ in range(_tagged_qemu(h.ns, VM))))
    return running, qemu


def _settle(log: GuestLog, ended: float, wss: int, rate: int) -> None:
    """Let the guest run on after a migration until its memory writer has verified every page
    since (two more passes than it had done), or a bounded time."""
    pass_s = wss / rate if rate else 0.5
    before = rpt.mem_pass_after(log.lines(), ended)
    need = None if before is None else before + 2

    def settled(lines: list[rpt.ConsoleLine]) -> bool:
        return any(
            ln.at >= ended and isinstance(ln.event, MemStatus) and (need is None or ln.event.passes >= need)
            for ln in lines
        )

    time.sleep(BASELINE_S)
    log.wait_for(settled, timeout=min(15.0, max(2.0, 2 * pass_s + 1.5)))


def _migrate(src: str, dst: str, view: DemoView) -> MigrationRecord:
    client = client_for(Inventory().host(src))
    body = {"vm": VM, "destination": dst, "options": dataclasses.asdict(MigrationOptions())}
    rec = record_from_json(client.request("POST", "/v1/migrations", json=body, timeout=60))  # type: ignore[arg-type]
    return view.follow(client, rec)


def run_demo(opts: DemoOptions, view: DemoView) -> rpt.DemoReport:
    """The whole demo; the lab is gone when this returns or raises."""
    opts.validate()
    name = new_lab_name()
    began = time.monotonic()
    built = False
    keep_logs = True  # until the run proves clean
    try:
        view.step(
            f"lab [bold]{name}[/]: {HOSTS} hosts, a datastore, a client; links "
            f"{'unshaped' if not opts.link_rate else f'{opts.link_rate * 8 / 1e9:g} Gbit/s'}"
        )
        topo = labmod.lab_up(name, HOSTS, opts.link_rate)  # cleans up after itself if it fails
        built = True
        view.step(f"starting the center, datastore ds1 and {HOSTS} host agents joined by token ({'TLS' if opts.encrypted else 'plain'})")
        cluster = start_cluster(topo, encrypted=opts.encrypted)
        with cluster_env(cluster):  # the lab's admin, logged in to its center
            result = _run(cluster, opts, view, began)
        keep_logs = not result.all_ok
        return result
    finally:
        if built:
            with uninterruptible():
                if keep_logs:
                    kept = _keep_logs(labmod.lab_dir(name), opts.logs)
                    if kept:
                        view.step(f"logs of the agents, datastore, probe and guest kept in {opts.logs}")
                view.step(f"tearing lab {name} down")
                labmod.lab_down(name)


def _keep_logs(folder: Path, dest: Path) -> bool:
    """Copy what explains a failure out of the lab folder before it goes: service logs, the VM's
    serial and QEMU logs per host, the agents' migration records."""
    patterns = ("logs/*.log", "machines/*/run/vms/*/*.log", "machines/*/state/migrations/*.json")
    shutil.rmtree(dest, ignore_errors=True)  # one run's logs, not a mix with an earlier run's
    copied = False
    for pattern in patterns:
        for src in folder.glob(pattern):
            target = dest / src.relative_to(folder)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                copied = True
            except OSError:
                continue
    return copied


def _run(cluster: LabCluster, opts: DemoOptions, view: DemoView, began: float) -> rpt.DemoReport:
    topo = cluster.topology
    inv = Inventory()
    first = topo.hosts[0].name
    accel = client_for(inv.host(first)).host().accel
    with client_for_datastore(Registry().get(DATASTORE)) as ds:  # as the lab's admin user
        ds.create_disk(DISK, DISK_SIZE)
    ip = topo.vm_ip(0)
    params = WorkloadParams(mem_wss=opts.mem_wss, mem_rate=opts.dirty_rate)
    spec = VmSpec(
        name=VM,
        memory=opts.memory,
        disks=(DiskSpec(source=DISK, datastore=DATASTORE),),
        nics=(NicSpec(mac=VM_MAC, portgroup=topo.portgroup, ip=f"{ip}/{topo.vm_prefix}"),),
        workloads=(Workload.ECHO, Workload.MEMWRITER, Workload.DISKWRITER),
        params=params,
    )
    log = GuestLog({h.name: cluster.serial_log(h.name, VM) for h in topo.hosts}).start()
    probe: _Probe | None = None
    try:
        view.step(
            f"VM {VM} on {first} ({accel.upper()}): {format_size(opts.memory)}, disk {DATASTORE}/{DISK}, "
            f"echo on {ip}:{params.echo_port}, memory writer {opts.dirty_rate / 1e6:g} MB/s over "
            f"{format_size(opts.mem_wss)}, disk writer"
        )
        client = client_for(inv.host(first))
        client.create(spec)
        client.start(VM, wait_ready=True, timeout=BOOT_TIMEOUT_S)
        ready_at = time.time()

        view.step(f"client probe from {topo.client.ip}: one TCP stream + a UDP probe every 1 ms")
        probe = _Probe(cluster, f"{ip}:{params.echo_port}", cluster.folder / "probe.json")
        probe.wait_running()
        time.sleep(BASELINE_S)

        driven: list[tuple[MigrationRecord, rpt.Observation | None]] = []
        where = first
        for i, (src, dst) in enumerate(route(opts.migrations), start=1):
            view.step(f"migration {i}/{opts.migrations}: {src} → {dst}")
            rec = _migrate(src, dst, view)
            if rec.phase is not Phase.DONE:
                driven.append((rec, None))
                view.migrated(i, rec)
                break
            where = dst
            running, qemu = _copies(topo)
            _settle(log, rec.ended_at or time.time(), opts.mem_wss, opts.dirty_rate)
            port = netns.fdb_port(topo.switch_ns, topo.switch_bridge, VM_MAC)
            obs = rpt.Observation(port, topo.host(dst).switch_vm_port, running, qemu)
            driven.append((rec, obs))
            view.migrated(i, rec)

        view.step("stopping the client and the VM (cleanly: disks flushed), verifying the disk")
        ended_at = time.time()
        probe_report = probe.stop()
        probe = None
        try:
            client_for(inv.host(where)).stop(VM)
        except KvmotionError as exc:  # the report still says what the disk holds
            view.step(f"[yellow]could not stop {VM} cleanly on {where}[/]: {exc}")
        log.stop()
        lines = log.lines()
        disk: RecordCheck | None = None
        acked = rpt.highest_ack(lines)
        if acked >= 0:
            disk = verify_image(cluster.datastore_root / DISK, acked)
    finally:
        log.stop()
        if probe is not None:
            try:
                probe.stop()
            except KvmotionError:
                pass

    starts = [rec.started_at for rec, _ in driven]
    runs = [
        rpt.MigrationRun(rec, obs, a, b)
        for (rec, obs), (a, b) in zip(driven, rpt.windows(starts, ready_at, ended_at), strict=True)
    ]
    results = tuple(rpt.migration_result(i, r, probe_report, lines, disk) for i, r in enumerate(runs, start=1))
    _write_picture(opts, results, probe_report, accel, cluster.encrypted)
    report = rpt.DemoReport(
        lab=topo.name,
        accel=accel,
        encrypted=cluster.encrypted,
        memory=opts.memory,
        dirty_rate=opts.dirty_rate,
        link_rate=opts.link_rate,
        vm=VM,
        migrations=results,
        migrations_asked=opts.migrations,
        probe=probe_report,
        disk=disk,
        console_lines=len(lines),
        mem_errors=max((ln.event.errors for ln in lines if isinstance(ln.event, MemStatus)), default=0),
        mem_corrupt_lines=sum(1 for ln in lines if isinstance(ln.event, MemCorrupt)),
        duration_s=time.monotonic() - began,
        picture=str(opts.picture),
    )
    _write(opts.report, report.to_json())
    return report


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise SetupError(f"cannot write {path}: {exc.strerror}") from None


def _write_picture(opts: DemoOptions, results, probe: ProbeReport, accel: str, encrypted: bool) -> None:
    t0 = probe.started_wall
    marks = [
        MigrationMark(
            label=f"{m.index}  {m.source.removeprefix('host-')}→{m.destination.removeprefix('host-')}",
            phases=tuple((p.phase, p.start - t0, p.end - t0) for p in m.phases),
            gap_start=m.client_gap_at_s,
            gap_ms=m.client_gap_ms,
        )
        for m in results
    ]
    link = f"{opts.link_rate * 8 / 1e9:g} Gbit/s link" if opts.link_rate else "unshaped link"
    subtitle = (
        f"{format_size(opts.memory)} guest writing {opts.dirty_rate / 1e6:g} MB/s, {link}, {accel.upper()}, "
        f"{'encrypted' if encrypted else 'plain'}; a UDP probe every 1 ms"
    )
    svg = render_svg(probe.samples, marks, "kvmotion demo: what the client saw during live migrations", subtitle)
    _write(opts.picture, svg)
