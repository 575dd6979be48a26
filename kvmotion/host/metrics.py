"""A host agent's Prometheus metrics of its host and VMs (the migration service adds its own).

    kvmotion_agent_vms{host,state}                                  VMs by state (shadows of incoming migrations too)
    kvmotion_agent_vm_vcpus{host,vm}, kvmotion_agent_vm_memory_configured_bytes{host,vm}
    kvmotion_agent_vm_memory_resident_bytes{host,vm}                what its QEMU holds in RAM
    kvmotion_agent_vm_cpu_run_seconds_total{host,vm}                its vCPU threads on a CPU (rate(): demand, in CPUs)
    kvmotion_agent_vm_cpu_ready_seconds_total{host,vm}              runnable but waiting for a CPU (rate(): ready)
    kvmotion_agent_host_{cpus,memory_total_bytes,memory_available_bytes,memory_committed_bytes}{host}

The vCPU counters are the scheduler's own (kvmotion.host.schedstat), per QEMU process: they start
again from 0 when the VM's QEMU does (a restart, a migration in), which rate() takes as a reset.
`refresh` samples on the event loop what the manager holds and reads /proc in a worker thread;
`collect` turns the last sample into metric families.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmotion.api.agent import VmState, VmStatus
from kvmotion.host import resources
from kvmotion.host.schedstat import NS, read_vcpu_threads, resident_memory
from kvmotion.host.vms import VmManager


@dataclass(frozen=True)
class VmSample:
    name: str
    state: VmState
    vcpus: int
    memory: int  # configured bytes
    running: bool  # its QEMU runs: the figures below are read
    resident: int = 0
    run_ns: int = 0
    ready_ns: int = 0


@dataclass(frozen=True)
class HostSample:
    host: str
    cpus: int
    memory: resources.MemInfo
    committed: int  # memory of the VMs whose QEMU runs
    vms: tuple[VmSample, ...] = ()


def sample_vms(vms: Sequence[VmStatus], read: Callable[[int], dict] = read_vcpu_threads,
               rss: Callable[[int], int] = resident_memory) -> tuple[VmSample, ...]:
    """Blocking reads of /proc: run in a worker thread."""
    out = []
    for vm in vms:
        if vm.pid is None:
            out.append(VmSample(vm.name, vm.state, vm.vcpus, vm.memory, running=False))
            continue
        threads = read(vm.pid)
        out.append(VmSample(vm.name, vm.state, vm.vcpus, vm.memory, running=True, resident=rss(vm.pid),
                            run_ns=sum(t.run_ns for t in threads.values()),
                            ready_ns=sum(t.wait_ns for t in threads.values())))
    return tuple(out)


def host_families(s: HostSample) -> Iterator[Metric]:
    host = [s.host]
    by_state = GaugeMetricFamily("kvmotion_agent_vms", "VMs on this host by state", labels=["host", "state"])
    for state in VmState:
        by_state.add_metric([s.host, state.value], sum(1 for vm in s.vms if vm.state is state))
    yield by_state
    for name, doc, value in (("cpus", "CPUs this agent may use", s.cpus),
                             ("memory_total_bytes", "The host's memory", s.memory.total),
                             ("memory_available_bytes", "The host's available memory", s.memory.available),
                             ("memory_committed_bytes", "Memory of the VMs whose QEMU runs", s.committed)):
        family = GaugeMetricFamily(f"kvmotion_agent_host_{name}", doc, labels=["host"])
        family.add_metric(host, value)
        yield family
    vcpus = GaugeMetricFamily("kvmotion_agent_vm_vcpus", "A VM's vCPUs", labels=["host", "vm"])
    configured = GaugeMetricFamily("kvmotion_agent_vm_memory_configured_bytes", "A VM's memory size",
                                   labels=["host", "vm"])
    resident = GaugeMetricFamily("kvmotion_agent_vm_memory_resident_bytes", "Resident memory of a VM's QEMU",
                                 labels=["host", "vm"])
    run = CounterMetricFamily("kvmotion_agent_vm_cpu_run_seconds", "Time a VM's vCPU threads ran on a CPU",
                              labels=["host", "vm"])
    ready = CounterMetricFamily("kvmotion_agent_vm_cpu_ready_seconds",
                                "Time a VM's vCPU threads were runnable but waited for a CPU", labels=["host", "vm"])
    for vm in s.vms:
        labels = [s.host, vm.name]
        vcpus.add_metric(labels, vm.vcpus)
        configured.add_metric(labels, vm.memory)
        if vm.running:
            resident.add_metric(labels, vm.resident)
            run.add_metric(labels, vm.run_ns / NS)
            ready.add_metric(labels, vm.ready_ns / NS)
    yield from (vcpus, configured, resident, run, ready)


class HostCollector:
    """The host's and its VMs' figures as of the last `refresh` (each scrape refreshes first)."""

    def __init__(self, manager: VmManager) -> None:
        self.manager = manager
        self.last: HostSample | None = None

    async def refresh(self) -> HostSample:
        vms = self.manager.list()  # on the event loop, where the manager's state changes
        committed = self.manager.committed_memory()
        sampled, memory = await asyncio.to_thread(lambda: (sample_vms(vms), resources.meminfo()))
        self.last = HostSample(self.manager.config.name, resources.cpu_count(), memory, committed, sampled)
        return self.last

    def collect(self) -> Iterator[Metric]:
        if self.last is not None:
            yield from host_families(self.last)
