"""A joined agent's heartbeats: every interval (2 s by default, the center's setting) it reports what
it observes (its VMs, their CPU and memory load, the host's memory, its active migrations) and keeps
the center's picture of the cluster (peers, datastores, settings) in its state root's cache, from
which it works while the center is down.

Runs under the agent's lifespan TaskGroup until `stop` is set: each beat is bounded (`tick_timeout`),
a failed beat is logged (once per kind of failure, not every 2 s) and the next one tries again,
cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmotion.api.agent import VmStatus
from kvmotion.api.center import (
    PROTOCOL_VERSION,
    ActiveMigration,
    AsyncCenterClient,
    ClusterSettings,
    Heartbeat,
    HeartbeatAnswer,
    HostLoad,
    ReportedState,
    VmLoad,
    VmReport,
    trusting,
)
from kvmotion.api.joined import ClusterCache, StateRoot
from kvmotion.api.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY
from kvmotion.api.spec import spec_hash
from kvmotion.core.errors import KvmotionError
from kvmotion.host import resources
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

    def loads(self, observed: Sequence[Observed]) -> tuple[VmLoad, ...]:
        loads = []
        current: dict[str, VcpuSample] = {}
        for o in observed:
            if o.sample is None:
                continue
            rate = cpu_load(self.previous.get(o.status.name), o.sample)
            current[o.status.name] = o.sample
            loads.append(VmLoad(name=o.status.name, cpu_run_ns=o.sample.run_ns, cpu_ready_ns=o.sample.wait_ns,
                                memory=o.memory, cpu_demand=None if rate is None else rate.demand,
                                cpu_ready=None if rate is None else rate.ready))
        self.previous = current  # VMs that stopped are forgotten
        return tuple(loads)


def build_heartbeat(vms: Sequence[VmStatus], loads: tuple[VmLoad, ...], memory: resources.MemInfo, cpus: int,
                    migrations: Sequence[ActiveMigration], cpu_capacity: float | None = None) -> Heartbeat:
    return Heartbeat(
        version=PROTOCOL_VERSION,
        vms=tuple(VmReport(name=vm.name, state=ReportedState(vm.state.value), spec_hash=spec_hash(vm.spec)) for vm in vms),
        load=HostLoad(cpus=cpus, cpu_capacity=cpu_capacity, memory_total=memory.total, memory_available=memory.available,
                      vms=loads),
        migrations=tuple(migrations),
    )


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
                 tick_timeout: float = 10.0, refresh_every: float = REFRESH_EVERY) -> None:
        self.root = root
        self.name = root.config().name
        self.vms = vms
        self.migrations = migrations
        self.clock = clock
        self.tick_timeout = tick_timeout
        self.refresh_every = refresh_every
        self.sampler = LoadSampler()
        self.last_refresh: float | None = None  # monotonic
        self.failing: str | None = None  # the last failure logged (the next success says so)
        self.interval = self._cached_settings().heartbeat_interval

    def _cached_settings(self) -> ClusterSettings:
        try:
            return self.root.cache().settings
        except KvmotionError:
            return ClusterSettings()

    async def beat(self, client: AsyncCenterClient) -> HeartbeatAnswer:
        """One heartbeat, and the cache refreshed when due (or when the settings changed)."""
        vms = self.vms()
        observed = await asyncio.to_thread(self.sampler.observe, vms)
        memory = await asyncio.to_thread(resources.meminfo)
        beat = build_heartbeat(vms, self.sampler.loads(observed), memory, resources.cpu_count(), self.migrations(),
                               resources.cpu_capacity())
        answer = await client.heartbeat(self.name, beat)
        self.interval = answer.interval
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
