"""A joined agent's heartbeats: every interval (2 s by default, the center's setting) it tells the
center it is alive, and keeps the center's picture of the cluster (peers, datastores, settings) in
its state root's cache, from which it works while the center is down.

A beat is small (`Alive`: a sequence number and the digest of what the agent last reported) unless
a full report is due (`Cadence`): what it observes changed (its VMs, their states and specs, its
migrations), the center asks for one, or `report_interval` (20 s) passed. The full report lists
its VMs, their CPU demand and ready time averaged since the previous full report (from
/proc/PID/task/TID/schedstat), their memory and dirty rate (kvmotion.qemu.dirtyrate), the host's
memory and its active migrations.

Runs under the agent's lifespan TaskGroup until `stop` is set: each beat is bounded (`tick_timeout`),
a failed beat is logged (once per kind of failure, not every 2 s) and the next one tries again,
cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from kvmotion.api.agent import VmStatus
from kvmotion.api.center import (
    PROTOCOL_VERSION,
    ActiveMigration,
    Alive,
    AsyncCenterClient,
    ClusterSettings,
    HealthReport,
    Heartbeat,
    HeartbeatAnswer,
    HostLoad,
    ReportedState,
    VmLoad,
    VmReport,
    report_digest,
    trusting,
)
from kvmotion.api.joined import ClusterCache, StateRoot
from kvmotion.api.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY
from kvmotion.api.spec import spec_hash
from kvmotion.core.errors import KvmotionError
from kvmotion.host import resources
from kvmotion.host.health import HealthSampler
from kvmotion.host.schedstat import VcpuSample, cpu_load, read_vcpu_threads, resident_memory

log = logging.getLogger("kvmotion.agent")

REFRESH_EVERY = 10.0  # seconds between fetches of the peers and datastores


@dataclass(frozen=True)
class Observed:
    """One VM as the heartbeat reports it: its status and, if its QEMU runs, the load sample."""

    status: VmStatus
    sample: VcpuSample | None
    memory: int


class LoadSampler:
    """Keeps each VM's previous vCPU sample, to turn cumulative counters into rates."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 read: Callable[[int], dict] = read_vcpu_threads, rss: Callable[[int], int] = resident_memory) -> None:
        self.clock = clock
        self.read = read
        self.rss = rss
        self.previous: dict[str, VcpuSample] = {}

    def observe(self, vms: Sequence[VmStatus]) -> list[Observed]:
        """Blocking reads of /proc: run in a worker thread."""
        out = []
        for vm in vms:
            sample = None if vm.pid is None else VcpuSample(pid=vm.pid, at=self.clock(), threads=self.read(vm.pid))
            out.append(Observed(vm, sample, 0 if vm.pid is None else self.rss(vm.pid)))
        return out

    def loads(self, observed: Sequence[Observed], dirty: Mapping[str, float] | None = None) -> tuple[VmLoad, ...]:
        """`dirty`: each VM's measured dirty rate, bytes/s."""
        dirty = dirty or {}
        loads = []
        current: dict[str, VcpuSample] = {}
        for o in observed:
            if o.sample is None:
                continue
            rate = cpu_load(self.previous.get(o.status.name), o.sample)
            current[o.status.name] = o.sample
            loads.append(VmLoad(name=o.status.name, memory=o.memory, cpu_demand=None if rate is None else rate.demand,
                                cpu_ready=None if rate is None else rate.ready, dirty_rate=dirty.get(o.status.name)))
        self.previous = current  # VMs that stopped are forgotten
        return tuple(loads)


def vm_reports(vms: Sequence[VmStatus]) -> tuple[VmReport, ...]:
    return tuple(VmReport(name=vm.name, state=ReportedState(vm.state.value), spec_hash=spec_hash(vm.spec)) for vm in vms)


def build_heartbeat(reports: tuple[VmReport, ...], loads: tuple[VmLoad, ...], memory: resources.MemInfo, cpus: int,
                    migrations: Sequence[ActiveMigration], cpu_capacity: float | None = None,
                    health: tuple[HealthReport, ...] = ()) -> Heartbeat:
    return Heartbeat(
        version=PROTOCOL_VERSION,
        digest=report_digest(reports, migrations, health),
        health=health,
        vms=reports,
        load=HostLoad(cpus=cpus, cpu_capacity=cpu_capacity, memory_total=memory.total, memory_available=memory.available,
                      vms=loads),
        migrations=tuple(migrations),
    )


class Cadence:
    """Which beat carries the full report: the first, any after what it reports changed, and one
    every `report_interval` seconds (monotonic clock, passed in)."""

    def __init__(self) -> None:
        self.seq = 0
        self.reported: str | None = None  # the digest of the last full report the center took
        self.reported_at: float | None = None

    def full_due(self, digest: str, now: float, report_interval: float) -> bool:
        return (self.reported != digest or self.reported_at is None
                or now - self.reported_at >= report_interval)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def sent(self, digest: str, now: float) -> None:
        self.reported, self.reported_at = digest, now


async def beat(client: AsyncCenterClient, name: str, cadence: Cadence, reports: tuple[VmReport, ...],
               migrations: Sequence[ActiveMigration], full: Callable[[], Awaitable[Heartbeat]],
               report_interval: float, now: float, health: tuple[HealthReport, ...] = ()) -> tuple[HeartbeatAnswer, bool]:
    """One beat: `Alive`, or the full report (`full` builds it) when due or when the center asks
    for it. The answer, and whether the full report went."""
    digest = report_digest(reports, migrations, health)
    seq = cadence.next_seq()
    if not cadence.full_due(digest, now, report_interval):
        answer = await client.alive(name, Alive(version=PROTOCOL_VERSION, seq=seq, digest=digest))
        if not answer.report:
            return answer, False
    report = await full()
    answer = await client.heartbeat(name, report)
    cadence.sent(report.digest or digest, now)
    return answer, True


def client_for(root: StateRoot) -> AsyncCenterClient:
    """The center, as this host (its certificate), trusting only the cluster CA."""
    config = root.config()
    tls = root.tls_dir
    context = None
    if config.center.startswith("https:"):
        context = trusting((tls / CA_CERT).read_text(), (tls / CLIENT_CERT).read_text(), (tls / CLIENT_KEY).read_text())
    return AsyncCenterClient(config.center, context, timeout=5.0)


class Heartbeats:
    def __init__(self, root: StateRoot, vms: Callable[[], list[VmStatus]],
                 migrations: Callable[[], Sequence[ActiveMigration]], *, clock: Callable[[], float] = time.time,
                 tick_timeout: float = 10.0, refresh_every: float = REFRESH_EVERY,
                 portgroups: Callable[[], Mapping[str, str]] | None = None,
                 dirty_rates: Callable[[], Awaitable[Mapping[str, float]]] | None = None) -> None:
        """`portgroups`: port group -> bridge, for the link health provider; `dirty_rates`: each
        VM's measured dirty rate, asked at each full report."""
        self.root = root
        self.name = root.config().name
        self.vms = vms
        self.migrations = migrations
        self.dirty_rates = dirty_rates
        self.clock = clock
        self.tick_timeout = tick_timeout
        self.refresh_every = refresh_every
        self.sampler = LoadSampler()
        self.health = HealthSampler(portgroups or dict)
        self.cadence = Cadence()
        self.last_refresh: float | None = None  # monotonic
        self.failing: str | None = None  # the last failure logged (the next success says so)
        cached = self._cached_settings()
        self.interval = cached.heartbeat_interval
        self.report_interval = cached.report_interval

    def _cached_settings(self) -> ClusterSettings:
        try:
            return self.root.cache().settings
        except KvmotionError:
            return ClusterSettings()

    async def beat(self, client: AsyncCenterClient) -> HeartbeatAnswer:
        """One heartbeat (`Alive`, or the full report when due), and the cache refreshed when due
        (or when the settings changed)."""
        vms = self.vms()
        reports = vm_reports(vms)
        migrations = tuple(self.migrations())
        # Every beat samples the vCPU counters for the CPU-contention provider (a window of beats).
        observed = await asyncio.to_thread(self.sampler.observe, vms)
        self.health.add(time.monotonic(), [(o.status.name, o.sample.run_ns, o.sample.wait_ns) for o in observed
                                           if o.sample is not None])
        health = await asyncio.to_thread(self.health.reports)

        async def full() -> Heartbeat:  # the load averaged since the previous full report
            memory = await asyncio.to_thread(resources.meminfo)
            dirty = await self.dirty_rates() if self.dirty_rates is not None else {}
            return build_heartbeat(reports, self.sampler.loads(observed, dirty), memory, resources.cpu_count(),
                                   migrations, resources.cpu_capacity(), health)

        answer, _ = await beat(client, self.name, self.cadence, reports, migrations, full,
                               self.report_interval, time.monotonic(), health)
        self.interval = answer.interval
        if answer.settings is not None:
            self.report_interval = answer.settings.report_interval
        now = time.monotonic()
        settings_changed = answer.settings is not None and answer.settings != self._cached_settings()
        if settings_changed or self.last_refresh is None or now - self.last_refresh >= self.refresh_every:
            await self.refresh(client, answer.settings)
            self.last_refresh = now
        return answer

    async def refresh(self, client: AsyncCenterClient, settings: ClusterSettings | None = None) -> ClusterCache:
        hosts = await client.hosts()
        datastores = await client.datastores()
        if settings is None:
            settings = await client.settings()
        cache = ClusterCache(settings=settings, hosts=tuple(hosts), datastores=tuple(datastores), updated=self.clock())
        await asyncio.to_thread(self.root.save_cache, cache)
        return cache

    def _failed(self, why: str) -> None:
        kind = why.split(":", 1)[0]
        if kind != self.failing:
            log.warning("heartbeat to the center failed (working from the cached cluster state): %s", why)
            self.failing = kind

    async def run(self, stop: asyncio.Event) -> None:
        client: AsyncCenterClient | None = None
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client = client or client_for(self.root)  # its TLS files may be fixed meanwhile: tried each beat
                    async with asyncio.timeout(self.tick_timeout):
                        answer = await self.beat(client)
                    if self.failing is not None:
                        log.warning("heartbeats reach the center again (host %s)", answer.state.value)
                        self.failing = None
                except TimeoutError:
                    self._failed(f"no answer within {self.tick_timeout:.0f} s")
                except KvmotionError as exc:
                    self._failed(f"{type(exc).__name__}: {exc}")
                except Exception:  # the next beat tries again; an unexpected failure is logged in full, once
                    if self.failing != "unexpected":
                        log.exception("heartbeat failed")
                    self.failing = "unexpected"
                pause = max(0.0, self.interval - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await stop.wait()
        finally:
            if client is not None:
                await client.aclose()
