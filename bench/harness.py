"""I/O of the migration benchmarks: a two-host lab, the guest, the client probe, and one migration
per method — kvmotion through its agents, or the same QEMU driven over QMP the way libvirt
(`virsh migrate --live`) or QEMU's bare defaults would drive it.

The baselines boot QEMU with kvmotion's own command line (kvmotion.qemu.cmdline.build_argv, the
same kernel, initramfs and kernel command line; their NIC with QEMU's default guest announce, as
libvirt runs it), inside the lab hosts' namespaces, TAP on the
host's port-group bridge, and migrate over the hosts' (shaped) vMotion links — the same path
kvmotion's stream takes. At most two guests run at once (a migration's source and destination).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.benchmodel import Cell, Method, RunResult
from kvmotion.api.agent import AgentClient
from kvmotion.api.spec import NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.core.errors import KvmotionError, SetupError
from kvmotion.core.interrupts import terminate_as_interrupt, uninterruptible
from kvmotion.guest.serial import MemStatus, Ready, parse_line
from kvmotion.lab.cluster import LabCluster, cluster_env, lab_agent_client, start_cluster
from kvmotion.migration.stats import RoundTracker
from kvmotion.net import lab as labmod
from kvmotion.net import links, netns
from kvmotion.net.probe import ProbeReport, largest_gap, reply_times
from kvmotion.qemu.migstatus import MigrationSample, RamStats

VM = "bench1"  # the agents' VM
BASELINE_VM = "bench2"  # the baselines' QEMUs: same length, so the kernel command lines differ in one digit
MAC = "52:54:00:be:0c:01"
ECHO_PORT = 7000
BOOT_TIMEOUT = 90.0
PROBE_LEAD_S = 0.5  # probe time before the migration starts
PROBE_TAIL_S = 1.0  # after the destination resumes: the client gap window ends here
POLL_S = 0.1  # query-migrate interval of the baselines (kvmotion's engine ticks at 100 ms too)
# libvirt's "unlimited": QEMU_DOMAIN_MIG_BANDWIDTH_MAX (INT64_MAX / 1 MiB, in MiB/s) sent in bytes/s
LIBVIRT_UNLIMITED = (2**63 - 1) // (1 << 20) * (1 << 20)


# ------------------------------------------------------------------------------------------ lab


@dataclass(frozen=True)
class BenchLab:
    cluster: LabCluster

    @property
    def topo(self) -> labmod.LabTopology:
        return self.cluster.topology

    @property
    def encrypted(self) -> bool:
        return self.cluster.encrypted

    def agent(self, host: str, timeout: float = 30.0) -> AgentClient:
        return lab_agent_client(self.cluster, host, timeout)  # as the lab's admin user (its login)

    def serial_log(self, host: str) -> Path:
        return self.cluster.serial_log(host, VM)


@contextmanager
def bench_lab(link_rate: int | None, encrypted: bool) -> Iterator[BenchLab]:
    """Two hosts, a client, a datastore, agents; torn down whatever happens (SIGTERM too)."""
    with terminate_as_interrupt():
        name = "bn" + secrets.token_hex(3)
        topo = labmod.lab_up(name, 2, link_rate)
        try:
            cluster = start_cluster(topo, encrypted=encrypted)
            # The bench acts as the lab's admin, logged in to its center.
            with cluster_env(cluster):
                yield BenchLab(cluster)
        finally:
            with uninterruptible():
                labmod.lab_down(name)


def interrupted(bench: str, write: Callable[[], None], kept: str) -> int:
    """Ctrl-C (or SIGTERM) during a bench: what it has so far written out, the exit code 130."""
    write()
    print(f"{bench}: interrupted, the lab torn down; {kept}", file=sys.stderr)
    return 130


def guest_spec(cell: Cell, topo: labmod.LabTopology, guest_announce: bool = False) -> VmSpec:
    """The benchmark's guest. guest_announce=True is QEMU's (and so libvirt's) default NIC; kvmotion
    announces from the host only (NicSpec)."""
    ip = f"{topo.vm_ip(0)}/{topo.vm_prefix}"
    writer = cell.dirty_rate is not None
    return VmSpec(
        name=VM,
        memory=cell.memory,
        nics=(NicSpec(mac=MAC, portgroup=topo.portgroup, ip=ip, guest_announce=guest_announce),),
        workloads=(Workload.ECHO, Workload.MEMWRITER) if writer else (Workload.ECHO,),
        params=WorkloadParams(mem_wss=cell.wss, mem_rate=cell.dirty_rate or 0, mem_stride=cell.stride,
                              echo_port=ECHO_PORT),
    )


# ---------------------------------------------------------------------------------- the guest's log


def _events(path: Path, offset: int = 0):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [e for e in (parse_line(ln) for ln in text.splitlines()) if e is not None]


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_guest(path: Path, cell: Cell, alive=lambda: True, offset: int = 0) -> None:
    """Until the guest printed READY and (with a writer) finished a first pass over its working set,
    so the memory being migrated holds what the cell says. `offset`: where this boot's lines start
    (an agent appends every boot of a VM to the same serial log)."""
    rate = cell.dirty_rate or 500e6
    deadline = time.monotonic() + BOOT_TIMEOUT + (cell.wss / rate if cell.dirty_rate is not None else 0)
    while True:
        evs = _events(path, offset)
        ready = any(isinstance(e, Ready) for e in evs)
        passes = max((e.passes for e in evs if isinstance(e, MemStatus)), default=-1)
        if ready and (cell.dirty_rate is None or passes >= 1):
            return
        if not alive():
            raise SetupError(f"the guest's QEMU exited before it was ready (log {path})")
        if time.monotonic() > deadline:
            raise SetupError(f"the guest was not ready in time (ready={ready}, writer passes={passes}; log {path})")
        time.sleep(0.1)


def writer_rate(path: Path, offset: int = 0) -> float | None:
    """Bytes/s the memory writer wrote between its last two status lines (printed once a second)."""
    st = [e for e in _events(path, offset) if isinstance(e, MemStatus)]
    if len(st) < 2:
        return None
    return (st[-1].seq - st[-2].seq) * 4096.0


# ------------------------------------------------------------------------------------ the probe


class ClientProbe:
    """kvmotion.net.probe in the lab's client namespace against the guest's echo service."""

    def __init__(self, lab: BenchLab, folder: Path, tag: str) -> None:
        self.out = folder / f"probe-{tag}.json"
        self.log = folder / f"probe-{tag}.log"
        self.out.unlink(missing_ok=True)
        target = f"{lab.topo.vm_ip(0)}:{ECHO_PORT}"
        argv = [sys.executable, "-m", "kvmotion.net.probe", "--target", target, "--out", str(self.out)]
        # the probe may come up before the guest's echo accepts: retry a few times
        for _ in range(10):
            self.log.write_text("")
            self.proc = labmod.spawn_in_ns(lab.topo.client.ns, argv, self.log, lab.cluster.env)
            deadline = time.monotonic() + 15
            while "probe: running" not in self.log.read_text(errors="replace"):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
            self.kill()
            time.sleep(0.5)
        raise SetupError(f"the client probe did not start: {self.log.read_text(errors='replace').strip()[-200:]}")

    def stop(self) -> ProbeReport:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
        return ProbeReport.from_json(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def client_gap_ms(report: ProbeReport, start_wall: float, end_wall: float) -> float:
    """Largest reply gap in [start, end] (wall clock), clipped to the probe's run."""
    lo = max(0.0, start_wall - report.started_wall)
    hi = min(end_wall - report.started_wall, report.samples[-1].t_send if report.samples else 0.0)
    return largest_gap(report.samples, lo, hi).duration * 1000


def resume_to_reply_ms(report: ProbeReport, resumed_wall: float | None) -> float | None:
    """From the destination's resume to the first echo reply the client got after it."""
    if resumed_wall is None:
        return None
    rel = resumed_wall - report.started_wall
    later = [t for t in reply_times(report.samples) if t >= rel]
    return (later[0] - rel) * 1000 if later else None


# --------------------------------------------------------------------------------- kvmotion runs


@dataclass(frozen=True)
class KvmotionRun:
    result: RunResult
    record: dict  # the source agent's migration record (JSON)
    probe: ProbeReport


def run_kvmotion(lab: BenchLab, cell: Cell, timeout: float, folder: Path, src: str = "host-a",
                 dst: str = "host-b", policy: str = "balanced", boot: bool = True) -> KvmotionRun:
    """Boot (unless `boot` is False: the VM runs on `src` already), probe, migrate src -> dst through
    the agents' API with the default policy. The VM is left on whichever host runs it."""
    from kvmotion.api.migration import MigrationRequest, OptionsBody
    from kvmotion.host.store import VmStore

    spec = guest_spec(cell, lab.topo)
    a = lab.agent(src)
    if boot:
        offset = log_size(lab.serial_log(src))
        a.create(spec)
        a.start(VM, wait_ready=True, timeout=BOOT_TIMEOUT)
        wait_guest(lab.serial_log(src), cell, offset=offset)
    probe = ClientProbe(lab, folder, f"kvmotion-{cell.key.replace('/', '_')}")
    wrate = writer_rate(lab.serial_log(src), offset if boot else 0) if cell.dirty_rate is not None else None
    try:
        time.sleep(PROBE_LEAD_S)
        # Encrypted or not is the lab cluster's policy; the agent finds `dst` in the lab's inventory.
        body = MigrationRequest(vm=VM, destination=dst, options=OptionsBody(policy=policy))
        rec = a.request("POST", "/v1/migrations", body=body, timeout=60)
        mid = rec["id"]  # type: ignore[index]
        deadline = time.monotonic() + timeout + 60  # the policy's own completion timeout acts first
        cancelled = False
        while rec["phase"] not in ("done", "failed", "cancelled"):  # type: ignore[index]
            time.sleep(0.5)  # the baselines' monitor costs no CPU beyond QEMU's own: keep ours light too
            rec = a.request("GET", f"/v1/migrations/{mid}")
            if time.monotonic() > deadline and not cancelled:
                a.request("POST", f"/v1/migrations/{mid}/cancel")
                cancelled = True
        phases = dict((p, t) for p, t in rec["phase_times"])  # type: ignore[index]
        done = rec["phase"] == "done"  # type: ignore[index]
        resumed = None
        if done:
            resumed = VmStore(lab.cluster.host_state(dst)).get(VM).resumed_at
        end = resumed or rec["ended_at"] or time.time()  # type: ignore[index]
        time.sleep(max(0.0, end + PROBE_TAIL_S - time.time()))
        report = probe.stop()
    finally:
        probe.kill()
    s = rec.get("summary") or {}  # type: ignore[union-attr]
    result = RunResult(
        method=Method.KVMOTION.value,
        cell=cell.key,
        converged=done and bool(s.get("converged")),
        total_ms=s.get("total_ms") if done else None,
        downtime_ms=s.get("downtime_ms") if done else None,
        client_gap_ms=client_gap_ms(report, phases.get("precopy", rec["started_at"]), end + PROBE_TAIL_S),  # type: ignore[index]
        end_to_end_ms=(end - rec["started_at"]) * 1000,  # type: ignore[index]
        bytes=int(s.get("bytes") or rec["progress"]["transferred"]),  # type: ignore[index]
        zero_pages=int(s.get("zero_pages") or 0),
        normal_pages=int(s.get("normal_pages") or 0),
        rounds=int(s.get("rounds") or rec["progress"]["round"]),  # type: ignore[index]
        memory=cell.memory,
        link_rate=cell.link_rate,
        encrypted=lab.encrypted,
        throttle_max=float(s.get("throttle_max") or 0.0),
        pause_ms=s.get("pause_ms"),
        error=rec.get("error"),  # type: ignore[union-attr]
        probe_sent=report.udp.sent,
        probe_received=report.udp.received,
        setup_ms=s.get("setup_ms"),
        resume_to_reply_ms=resume_to_reply_ms(report, resumed),
        phases_ms=tuple((p, round((t - rec["started_at"]) * 1000, 1)) for p, t in rec["phase_times"]),  # type: ignore[index]
        peak_dirty_rate=float(s.get("peak_dirty_rate") or 0.0),
        writer_rate=wrate,
        rounds_log=tuple(rec.get("rounds", ())),  # type: ignore[union-attr]
        # the precopy phase begins just before the engine's `migrate`
        to_resume_ms=(resumed - phases["precopy"]) * 1000 if (resumed and "precopy" in phases) else None,
        compression=s.get("compression") or "none",
    )
    return KvmotionRun(result, rec, report)  # type: ignore[arg-type]


def remove_vm(lab: BenchLab) -> None:
    """Stop and delete the benchmark VM wherever an agent runs it."""
    for h in lab.topo.hosts:
        client = lab.agent(h.name)
        try:
            names = [v.name for v in client.vms()]
            if VM in names:
                try:
                    client.stop(VM, force=True)
                except KvmotionError:
                    pass
                client.delete(VM)
        finally:
            client.close()


# --------------------------------------------------------------------------------- QMP baselines


class BareQemu:
    """One QEMU with kvmotion's command line, started by the bench inside a lab host's namespace."""

    def __init__(self, lab: BenchLab, host: str, spec: VmSpec, folder: Path, incoming: bool) -> None:
        from kvmotion.guest.cmdline import kernel_cmdline
        from kvmotion.guest.image import ensure_image
        from kvmotion.qemu import accel as accel_mod
        from kvmotion.qemu.cmdline import HostContext, VmPaths, build_argv
        from kvmotion.qemu.process import close_own_fds, open_fds

        self.host = lab.topo.host(host)
        self.tap = links.tap_name(spec.name, 0)
        netns.run_in_ns(self.host.ns, links.create_tap, self.tap, self.host.vm_bridge)
        image = ensure_image()
        self.paths = VmPaths(folder / f"qemu-{host}")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.serial_log.unlink(missing_ok=True)
        # The TAP and the run files by descriptor, as the agent passes them (kvmotion.qemu.process.open_fds).
        tap_fd = netns.call_in_ns_thread(self.host.ns, links.open_tap, self.tap)
        try:
            fds = open_fds(self.paths, (tap_fd,))
            try:
                ctx = HostContext(
                    accel=accel_mod.choose(ensure_image).accel, kernel=image.kernel, initramfs=image.initramfs,
                    kernel_cmdline=kernel_cmdline(spec), fds=fds, disk_nodes=(), incoming=incoming, paused=incoming,
                )
                argv = build_argv(spec, self.paths, ctx)
                with open(self.paths.qemu_log, "ab") as log:
                    self.proc = netns.popen_in_ns(self.host.ns, argv, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True,
                                                  pass_fds=fds.passed())
            finally:
                close_own_fds(fds)
        finally:
            os.close(tap_fd)
        self.spec = spec

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def connect(self):
        from kvmotion.qemu.qmp import Qmp

        self.qmp = Qmp(f"{self.spec.name}@{self.host.name}")
        await self.qmp.connect(self.paths.qmp, alive=self.alive)
        return self.qmp

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        try:
            netns.run_in_ns(self.host.ns, links.delete_tap, self.tap)
        except KvmotionError:
            pass


async def tls_creds(qmp, endpoint: str, lab: BenchLab, host: str) -> None:
    # The host's own identity, from its join (the baselines' QEMUs stand in for its agent's).
    creds = lab.cluster.host_state(host) / "tls"

    await qmp.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "bench-tls", "endpoint": endpoint,
                                        "dir": str(creds), "verify-peer": True})


async def _baseline(lab: BenchLab, cell: Cell, method: Method, timeout: float, folder: Path,
                    src_host: str, dst_host: str) -> RunResult:
    # Its own name (so its own TAP and process tag): a QEMU of the agents' VM that is still going
    # away, or a reused pid, can then never be taken for it, nor it for the agents' VM.
    spec = guest_spec(cell, lab.topo, guest_announce=True).replace(name=BASELINE_VM)
    src = BareQemu(lab, src_host, spec, folder, incoming=False)
    dst: BareQemu | None = None
    probe: ClientProbe | None = None
    try:
        sq = await src.connect()
        await asyncio.to_thread(wait_guest, src.paths.serial_log, cell, src.alive)
        probe = ClientProbe(lab, folder, f"{method.value}-{cell.key.replace('/', '_')}")
        wrate = writer_rate(src.paths.serial_log) if cell.dirty_rate is not None else None
        peak_dirty = 0.0
        await asyncio.sleep(PROBE_LEAD_S)
        # ---- what libvirt does: the destination QEMU, paused, waiting for the stream
        t_launch = time.time()
        dst = BareQemu(lab, dst_host, spec, folder, incoming=True)
        dq = await dst.connect()
        for q in (sq, dq):  # events only report; they change nothing in the migration
            await q.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        if lab.encrypted:
            await tls_creds(dq, "server", lab, dst_host)
            await dq.execute("migrate-set-parameters", **{"tls-creds": "bench-tls"})
            await tls_creds(sq, "client", lab, src_host)
            await sq.execute("migrate-set-parameters", **{"tls-creds": "bench-tls", "tls-hostname": dst_host})
        ip = lab.topo.host(dst_host).mgmt_ip
        await dq.execute("migrate-incoming", uri=f"tcp:{ip}:0")
        port = (await dq.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
        if method is Method.LIBVIRT:
            await sq.execute("migrate-set-parameters", **{"max-bandwidth": LIBVIRT_UNLIMITED})
        # QEMU's own defaults otherwise: downtime-limit 300 ms, max-bandwidth 128 MiB/s, no auto-converge
        params = await sq.execute("query-migrate-parameters")
        stop_ts = resume_ts = None
        converged = False
        tracker = RoundTracker()
        last_ram = RamStats()  # a cancelled migration's query-migrate has no ram member: keep the last
        async with sq.listen("MIGRATION", "STOP") as sev, dq.listen("RESUME") as dev:
            t_mig = time.time()
            t0 = time.monotonic()
            await sq.execute("migrate", uri=f"tcp:{ip}:{port}")
            deadline = t0 + timeout
            while True:
                try:
                    ev = await sev.get(POLL_S)
                    if ev.name == "STOP":
                        stop_ts = ev.timestamp
                        continue
                    status = ev.data.get("status")
                except TimeoutError:
                    # the same 100 ms samples kvmotion's engine takes, folded into rounds the same way
                    sample = MigrationSample.from_qmp(await sq.execute("query-migrate"), at=time.monotonic() - t0)  # type: ignore[arg-type]
                    tracker, _ = tracker.observe(sample)
                    status = sample.status.value
                    if sample.ram is not None:
                        peak_dirty = max(peak_dirty, sample.ram.dirty_rate)
                        last_ram = sample.ram
                if status == "completed":
                    # libvirt resumes the destination once the source reports completion
                    await dq.execute("cont")
                    converged = True
                    break
                if status in ("failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    await sq.execute("migrate_cancel")
                    while (await sq.execute("query-migrate"))["status"] not in ("cancelled", "failed", "completed"):  # type: ignore[index]
                        await asyncio.sleep(0.02)
                    break
            info = await sq.execute("query-migrate")
            final = MigrationSample.from_qmp(info, at=time.monotonic() - t0)  # type: ignore[arg-type]
            tracker, _ = tracker.observe(final)
            last_ram = final.ram or last_ram
            if converged:
                resume_ts = (await dev.wait_for("RESUME", timeout=10)).timestamp
                # libvirt's Confirm phase then kills the source QEMU (SIGTERM, later SIGKILL): its
                # exit competes for the CPU with the resumed guest, as kvmotion's teardown does.
                src.proc.terminate()
                while stop_ts is None:  # the STOP event came before we listened for it
                    try:
                        ev = sev.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if ev.name == "STOP":
                        stop_ts = ev.timestamp
        end = resume_ts or time.time()
        await asyncio.sleep(max(0.0, end + PROBE_TAIL_S - time.time()))
        report = await asyncio.to_thread(probe.stop)
        completed = info["status"] == "completed"  # type: ignore[index]
        return RunResult(
            method=method.value,
            cell=cell.key,
            converged=converged and completed,
            total_ms=float(info["total-time"]) if completed else None,  # type: ignore[index]
            downtime_ms=float(info["downtime"]) if completed else None,  # type: ignore[index]
            client_gap_ms=client_gap_ms(report, t_mig, end + PROBE_TAIL_S),
            end_to_end_ms=(end - t_launch) * 1000,
            bytes=last_ram.transferred,
            zero_pages=last_ram.duplicate,
            normal_pages=last_ram.normal,
            rounds=last_ram.dirty_sync_count,
            memory=cell.memory,
            link_rate=cell.link_rate,
            encrypted=lab.encrypted,
            pause_ms=(resume_ts - stop_ts) * 1000 if (resume_ts and stop_ts) else None,
            error=None if completed else (f"not converged within {timeout:.0f} s: cancelled "
                                          f"(downtime-limit {params['downtime-limit']} ms, "  # type: ignore[index]
                                          f"max-bandwidth {params['max-bandwidth']} B/s)"),  # type: ignore[index]
            probe_sent=report.udp.sent,
            probe_received=report.udp.received,
            setup_ms=float(info.get("setup-time", 0)) if completed else None,  # type: ignore[union-attr]
            resume_to_reply_ms=resume_to_reply_ms(report, resume_ts),
            peak_dirty_rate=peak_dirty,
            writer_rate=wrate,
            rounds_log=tuple(r.to_json() for r in tracker.rounds),
            to_resume_ms=(resume_ts - t_mig) * 1000 if resume_ts else None,
        )
    finally:
        if probe is not None:
            probe.kill()
        for q in (src, dst):
            if q is not None:
                if getattr(q, "qmp", None) is not None:
                    await q.qmp.close()
                q.close()


def run_baseline(lab: BenchLab, cell: Cell, method: Method, timeout: float, folder: Path,
                 src: str = "host-a", dst: str = "host-b") -> RunResult:
    return asyncio.run(_baseline(lab, cell, method, timeout, folder, src, dst))
