"""Runs the demo (I/O): builds a lab cluster, boots a VM from a datastore disk through the center,
starts the client probe, migrates the VM around the hosts through the center (act 1), lets the
center relieve, evacuate and refill hosts (act 2, kvmotion.demo.act2), checks each of the VM's
migrations, writes the report and picture, and tears the lab down whatever happens (the caller
turns Ctrl-C and SIGTERM into KeyboardInterrupt).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvmotion.api.center import CenterClient, MigrateRequest, TaskState, TaskView, VmCreate
from kvmotion.api.datastore import client_for as client_for_datastore
from kvmotion.api.hosts import all_vms, client_for
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase, record_from_json
from kvmotion.api.registry import Registry
from kvmotion.api.spec import MIN_MEMORY, DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.api.userconfig import load_credentials
from kvmotion.core import cgroups
from kvmotion.core.errors import InvalidInput, KvmotionError, SetupError
from kvmotion.core.interrupts import uninterruptible
from kvmotion.core.units import format_size, parse_rate
from kvmotion.demo import act2
from kvmotion.demo import report as rpt
from kvmotion.demo.chart import HostLane, MigrationMark, render_svg
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
# Cores each lab host may use by default (a cpu cgroup limit per host). Half a CPU: two busy guests
# beside web1 contend on one host, and three hosts' worth (1.5) still fits a 2-core machine, so
# DRS's relief shows in the guests' work rates even beside other load.
HOST_CPU = 0.5
IDLE, MAX = "idle", "max"  # --dirty-rate words: no memory writer; as fast as the guest can


def parse_dirty_rate(text: str) -> int | None:
    """--dirty-rate: `idle` (None: no memory writer), `max` (0: flat out) or a rate in bytes/s; a bare
    0 is refused, as a reader takes it for idle while the writer would run flat out."""
    word = text.strip().lower()
    if word == IDLE:
        return None
    if word == MAX:
        return 0
    rate = parse_rate(text)
    if rate == 0:
        raise InvalidInput(f"invalid --dirty-rate {text!r}: say idle (no memory writer) or max (as fast as the guest can)")
    return rate


def dirty_rate_text(rate: int | None) -> str:
    return "no memory writer (idle)" if rate is None else "memory writer flat out" if rate == 0 \
        else f"memory writer {rate / 1e6:g} MB/s"


@dataclass(frozen=True)
class DemoOptions:
    memory: int
    dirty_rate: int | None  # bytes/s the guest's memory writer dirties (0: as fast as it can; None: no writer)
    link_rate: int | None  # bytes/s of the lab's shaped links; None: unshaped
    migrations: int
    encrypted: bool
    report: Path
    act2: bool = True  # DRS, maintenance and host health on the same lab after the migrations
    host_cpu: float | None = HOST_CPU  # cores each lab host may use; None: unlimited

    def validate(self) -> None:
        """Refuse bad input before building anything."""
        if self.memory < MIN_MEMORY:
            raise InvalidInput(f"invalid --memory {format_size(self.memory)}: the VM needs at least {MIN_MEMORY >> 20}M")
        if self.migrations < 1:
            raise InvalidInput(f"invalid --migrations {self.migrations}: use 1 or more")
        if self.host_cpu is not None:
            cgroups.limit_for(self.host_cpu)  # InvalidInput unless a usable number of cores
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

    def detail(self, text: str) -> None: ...

    def follow(self, center: CenterClient, task: TaskView) -> TaskView: ...

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


def _settle(log: GuestLog, ended: float, wss: int, rate: int | None) -> None:
    """Let the guest run on after a migration until its memory writer has verified every page
    since (two more passes than it had done), or a bounded time; without a writer, a moment."""
    if rate is None:
        time.sleep(BASELINE_S)
        return
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


def source_record(task: TaskView) -> MigrationRecord:
    """The source agent's record of a migrate task's migration (GET /v1/migrations/ID there); a
    failed record made of the task when no migration was started or its agent cannot say."""
    r = task.result
    if r is not None and r.migration and task.source:
        try:
            agent = client_for(Inventory().host(task.source))
            return record_from_json(agent.request("GET", f"/v1/migrations/{r.migration}"))
        except KvmotionError:
            pass  # the task says what the center knows
    return MigrationRecord(
        id=(r.migration if r and r.migration else task.id), vm=task.target, source=task.source or "?",
        destination=task.destination or "?", options=MigrationOptions(),
        phase=Phase.DONE if task.state is TaskState.DONE else Phase.FAILED,
        started_at=task.started or task.created, ended_at=task.ended,
        error=task.error or (None if task.state is TaskState.DONE else f"task {task.state.value}"),
    )


@dataclass
class _Moved:
    """One of the demo VM's migrations: its record, the lab right after it, which step, which task."""

    record: MigrationRecord
    observation: rpt.Observation | None
    step: str
    task: str | None


class Story:
    """The lab as the demo drives it: the center (as its admin), the demo VM's guest log, and the
    checks after each of its migrations, whoever started them (act 2 hands the center's tasks here)."""

    def __init__(self, cluster: LabCluster, center: CenterClient, opts: DemoOptions, view: DemoView, log: GuestLog) -> None:
        self.cluster = cluster
        self.topo = cluster.topology
        self.center = center
        self.opts = opts
        self.view = view
        self.log = log
        self.moved: list[_Moved] = []

    def where(self, vm: str = VM) -> str | None:
        """The VM's host as the center knows it."""
        v = self.center.vm(vm)
        return v.observed_host or v.desired_host

    def check_move(self, task: TaskView, step: str) -> MigrationRecord:
        """After a migrate task of the demo VM ended: its record, and the lab looked at at once
        (copies of the VM, the switch's FDB) after the guest has run on a little."""
        rec = source_record(task)
        obs = None
        if rec.phase is Phase.DONE:
            running, qemu = _copies(self.topo)
            _settle(self.log, rec.ended_at or time.time(), self.opts.mem_wss, self.opts.dirty_rate)
            port = netns.fdb_port(self.topo.switch_ns, self.topo.switch_bridge, VM_MAC)
            obs = rpt.Observation(port, self.topo.host(rec.destination).switch_vm_port, running, qemu)
        self.moved.append(_Moved(rec, obs, step, task.id))
        self.view.migrated(len(self.moved), rec)
        return rec

    def boot(self, spec: VmSpec, host: str) -> None:
        """Create and start a VM through the center on `host`."""
        created = self.center.create_vm(VmCreate(spec=spec, host=host))
        _done(self.view.follow(self.center, created.task))

    def start(self, names: Sequence[str]) -> None:
        """Start VMs through the center (together), until each guest says it is ready."""
        tasks = [self.center.start_vm(n) for n in names]
        hosts = {}
        for t in tasks:
            t = _done(self.view.follow(self.center, t))
            hosts[t.target] = t.result.host if t.result and t.result.host else self.where(t.target)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        for name, host in hosts.items():
            client = client_for(Inventory().host(host or ""))
            while not client.vm(name).ready:
                if time.monotonic() > deadline:
                    raise SetupError(f"VM {name} on {host} did not say ready within {BOOT_TIMEOUT_S:.0f} s")
                time.sleep(0.1)


def _done(task: TaskView) -> TaskView:
    if task.state is not TaskState.DONE:
        raise SetupError(f"task {task.id} ({task.kind.value} {task.target}) {task.state.value}: {task.error or 'no reason given'}")
    return task


def run_demo(opts: DemoOptions, view: DemoView) -> rpt.DemoReport:
    """The whole demo; the lab is gone when this returns or raises."""
    opts.validate()
    name = new_lab_name()
    began = time.monotonic()
    built = False
    keep_logs = True  # until the run proves clean
    try:
        cpu = "unlimited CPU" if opts.host_cpu is None else f"{opts.host_cpu:g} CPU each"
        view.step(
            f"lab [bold]{name}[/]: {HOSTS} hosts ({cpu}), a datastore, a client; links "
            f"{'unshaped' if not opts.link_rate else f'{opts.link_rate * 8 / 1e9:g} Gbit/s'}"
        )
        topo = labmod.lab_up(name, HOSTS, opts.link_rate, opts.host_cpu)  # cleans up after itself if it fails
        built = True
        view.step(f"starting the center, datastore ds1 and {HOSTS} host agents joined by token ({'TLS' if opts.encrypted else 'plain'})")
        cluster = start_cluster(topo, encrypted=opts.encrypted)
        with cluster_env(cluster), load_credentials().client() as center:  # the lab's admin, logged in to its center
            result = _run(cluster, center, opts, view, began)
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


def _web1_spec(topo: labmod.LabTopology, opts: DemoOptions) -> VmSpec:
    workloads = (Workload.ECHO, Workload.DISKWRITER) if opts.dirty_rate is None \
        else (Workload.ECHO, Workload.MEMWRITER, Workload.DISKWRITER)
    return VmSpec(
        name=VM,
        memory=opts.memory,
        disks=(DiskSpec(source=DISK, datastore=DATASTORE),),
        nics=(NicSpec(mac=VM_MAC, portgroup=topo.portgroup, ip=f"{topo.vm_ip(0)}/{topo.vm_prefix}"),),
        workloads=workloads,
        params=WorkloadParams(mem_wss=opts.mem_wss, mem_rate=opts.dirty_rate or 0),
    )


def _act1(story: Story) -> bool:
    """web1 around the hosts through the center, each migration checked; False if one did not complete."""
    opts, center, view = story.opts, story.center, story.view
    for i, (src, dst) in enumerate(route(opts.migrations), start=1):
        view.step(f"migration {i}/{opts.migrations}: {src} → {dst} (through the center)")
        started = center.migrate(MigrateRequest(vm=VM, destination=dst))
        task = view.follow(center, started.task)
        if story.check_move(task, rpt.ACT1).phase is not Phase.DONE:
            return False
    return True


def _run(cluster: LabCluster, center: CenterClient, opts: DemoOptions, view: DemoView, began: float) -> rpt.DemoReport:
    topo = cluster.topology
    first = topo.hosts[0].name
    accel = client_for(Inventory().host(first)).host().accel
    with client_for_datastore(Registry().get(DATASTORE)) as ds:  # as the lab's admin user
        ds.create_disk(DISK, DISK_SIZE)
    spec = _web1_spec(topo, opts)
    ip, port = topo.vm_ip(0), spec.params.echo_port
    log = GuestLog({h.name: cluster.serial_log(h.name, VM) for h in topo.hosts}).start()
    story = Story(cluster, center, opts, view, log)
    probe: _Probe | None = None
    steps: tuple[rpt.Step, ...] | None = None
    act2_s = None
    try:
        memory_writer = dirty_rate_text(opts.dirty_rate)
        if opts.dirty_rate is not None:
            memory_writer += f" over {format_size(opts.mem_wss)}"
        view.step(
            f"VM {VM} on {first} ({accel.upper()}), created through the center: {format_size(opts.memory)}, "
            f"disk {DATASTORE}/{DISK}, echo on {ip}:{port}, {memory_writer}, disk writer"
        )
        story.boot(spec, first)
        story.start([VM])
        ready_at = time.time()

        view.step(f"client probe from {topo.client.ip}: one TCP stream + a UDP probe every 1 ms")
        probe = _Probe(cluster, f"{ip}:{port}", cluster.folder / "probe.json")
        probe.wait_running()
        time.sleep(BASELINE_S)

        completed = _act1(story)
        if opts.act2 and completed:
            act2_began = time.monotonic()
            steps = tuple(act2.run(story))
            act2_s = time.monotonic() - act2_began
        elif opts.act2:
            view.step("[yellow]act 2 skipped[/]: act 1 did not complete")

        view.step("stopping the client and the VM through the center (cleanly: disks flushed), verifying the disk")
        ended_at = time.time()
        probe_report = probe.stop()
        probe = None
        try:
            _done(view.follow(center, center.stop_vm(VM)))
        except KvmotionError as exc:  # the report still says what the disk holds
            view.step(f"[yellow]could not stop {VM} cleanly[/]: {exc}")
        log.stop()
        lines = log.lines()
        disk: RecordCheck | None = None
        acked = rpt.highest_ack(lines)
        if acked >= 0:
            disk = verify_image(cluster.datastore_root / DISK, acked)
        tasks = center.tasks(limit=1000)
    finally:
        log.stop()
        if probe is not None:
            try:
                probe.stop()
            except KvmotionError:
                pass

    starts = [m.record.started_at for m in story.moved]
    runs = [
        (m, rpt.MigrationRun(m.record, m.observation, a, b))
        for m, (a, b) in zip(story.moved, rpt.windows(starts, ready_at, ended_at), strict=True)
    ]
    results = tuple(
        rpt.migration_result(i, r, probe_report, lines, disk, memory_checked=opts.dirty_rate is not None,
                             step=m.step, task=m.task)
        for i, (m, r) in enumerate(runs, start=1)
    )
    if steps is not None:
        steps = tuple(dataclasses.replace(s, migrations=tuple(r for r in results if r.task in {m.task for m in s.moves}))
                      for s in steps)
    stays = rpt.timeline(tasks, ended_at)
    hosts = tuple(h.name for h in topo.hosts)
    _write_picture(opts, results, probe_report, accel, cluster.encrypted, stays, hosts)
    report = rpt.DemoReport(
        lab=topo.name,
        accel=accel,
        encrypted=cluster.encrypted,
        memory=opts.memory,
        dirty_rate=opts.dirty_rate,
        link_rate=opts.link_rate,
        vm=VM,
        migrations=tuple(r for r in results if r.step == rpt.ACT1),
        migrations_asked=opts.migrations,
        probe=probe_report,
        disk=disk,
        console_lines=len(lines),
        mem_errors=max((ln.event.errors for ln in lines if isinstance(ln.event, MemStatus)), default=0),
        mem_corrupt_lines=sum(1 for ln in lines if isinstance(ln.event, MemCorrupt)),
        duration_s=time.monotonic() - began,
        picture=str(opts.picture),
        host_cpu=opts.host_cpu,
        act2=steps,
        act2_s=act2_s,
        hosts=hosts,
        timeline=stays,
    )
    _write(opts.report, report.to_json())
    return report


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise SetupError(f"cannot write {path}: {exc.strerror}") from None


def _write_picture(opts: DemoOptions, results, probe: ProbeReport, accel: str, encrypted: bool,
                   stays: Sequence[rpt.Stay], hosts: Sequence[str]) -> None:
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
    cpu = "" if opts.host_cpu is None else f", {opts.host_cpu:g} CPU per host"
    subtitle = (
        f"{format_size(opts.memory)} guest, {dirty_rate_text(opts.dirty_rate)}, {link}{cpu}, {accel.upper()}, "
        f"{'encrypted' if encrypted else 'plain'}; a UDP probe every 1 ms"
    )
    svg = render_svg(probe.samples, marks, "kvmotion demo: what the client saw during live migrations", subtitle,
                     lanes=chart_lanes(stays, hosts, t0))
    _write(opts.picture, svg)


def chart_lanes(stays: Sequence[rpt.Stay], hosts: Sequence[str], t0: float) -> list[HostLane]:
    """The timeline as the picture's host lanes (seconds since the probe's start)."""
    return [HostLane(h, tuple((st.vm, st.start - t0, st.end - t0) for st in stays if st.host == h)) for h in hosts]
