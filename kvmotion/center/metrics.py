"""The center's Prometheus metrics, read from its store (and its hosts' last heartbeats) at each scrape.

    kvmotion_center_tasks{kind,state}                  open tasks: the queue (queued) and the work in hand (running)
    kvmotion_center_tasks_ended_total{kind,result}     tasks that ended: done, failed, cancelled
    kvmotion_center_migration_duration_seconds         histogram of the migrations done through the center
    kvmotion_center_migration_downtime_seconds         histogram of their downtime (QEMU's figure)
    kvmotion_center_hosts{state}, kvmotion_center_host_state{host,state}
    kvmotion_center_host_heartbeat_age_seconds{host}   seconds since the host's last heartbeat
    kvmotion_center_host_{cpus,memory_total_bytes,memory_available_bytes,cpu_demand_cpus,cpu_ready_cpus}{host}
    kvmotion_center_host_migrations{host,role}         migrations a host reports running, by its role
    kvmotion_center_vms{state}                         VMs by the state the center observed
    kvmotion_center_vm_{cpu_demand_cpus,cpu_ready_cpus,memory_bytes}{host,vm}

Loads are those of the hosts' last heartbeats, left out for a host that is not responding (stale).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmotion.api.center import HostState, MigrationRole, ObservedState, TaskKind, TaskState
from kvmotion.api.metrics import DOWNTIME_BUCKETS, DURATION_BUCKETS, histogram
from kvmotion.center.service import Center
from kvmotion.center.store import HostRow, VmRow

OPEN_STATES = (TaskState.QUEUED, TaskState.RUNNING)
ENDED_STATES = tuple(s for s in TaskState if s.terminal)


def task_families(counts: Mapping[tuple[TaskKind, TaskState], int],
                  times: Sequence[tuple[float | None, float | None]]) -> Iterator[Metric]:
    tasks = GaugeMetricFamily("kvmotion_center_tasks", "Open tasks by kind and state (queued: waiting to start)",
                              labels=["kind", "state"])
    ended = CounterMetricFamily("kvmotion_center_tasks_ended", "Tasks that ended, by kind and result",
                                labels=["kind", "result"])
    for kind in TaskKind:
        for state in OPEN_STATES:
            tasks.add_metric([kind.value, state.value], counts.get((kind, state), 0))
        for state in ENDED_STATES:
            ended.add_metric([kind.value, state.value], counts.get((kind, state), 0))
    yield tasks
    yield ended
    yield histogram("kvmotion_center_migration_duration_seconds", "Migrations done through the center: total time",
                    [], [((), [t / 1000 for t, _ in times if t is not None])], DURATION_BUCKETS)
    yield histogram("kvmotion_center_migration_downtime_seconds", "Migrations done through the center: downtime",
                    [], [((), [d / 1000 for _, d in times if d is not None])], DOWNTIME_BUCKETS)


def host_families(now: float, hosts: Sequence[HostRow]) -> Iterator[Metric]:
    by_state = GaugeMetricFamily("kvmotion_center_hosts", "Hosts by state", labels=["state"])
    for each in HostState:
        by_state.add_metric([each.value], sum(1 for h in hosts if h.state is each))
    yield by_state
    state = GaugeMetricFamily("kvmotion_center_host_state", "1 for each host's current state", labels=["host", "state"])
    age = GaugeMetricFamily("kvmotion_center_host_heartbeat_age_seconds", "Seconds since the host's last heartbeat",
                            labels=["host"])
    migrations = GaugeMetricFamily("kvmotion_center_host_migrations",
                                   "Migrations the host reports running, by its role", labels=["host", "role"])
    cpus = GaugeMetricFamily("kvmotion_center_host_cpus", "The host's CPUs", labels=["host"])
    mem_total = GaugeMetricFamily("kvmotion_center_host_memory_total_bytes", "The host's memory", labels=["host"])
    mem_available = GaugeMetricFamily("kvmotion_center_host_memory_available_bytes", "The host's available memory",
                                      labels=["host"])
    demand = GaugeMetricFamily("kvmotion_center_host_cpu_demand_cpus",
                               "CPUs' worth the host's VMs ran over its last heartbeat interval", labels=["host"])
    ready = GaugeMetricFamily("kvmotion_center_host_cpu_ready_cpus",
                              "CPUs' worth the host's vCPUs waited for a CPU (ready) over its last interval",
                              labels=["host"])
    vm_demand = GaugeMetricFamily("kvmotion_center_vm_cpu_demand_cpus", "CPUs' worth a VM's vCPUs ran",
                                  labels=["host", "vm"])
    vm_ready = GaugeMetricFamily("kvmotion_center_vm_cpu_ready_cpus", "CPUs' worth a VM's vCPUs waited for a CPU",
                                 labels=["host", "vm"])
    vm_memory = GaugeMetricFamily("kvmotion_center_vm_memory_bytes", "Resident memory of a VM's QEMU",
                                  labels=["host", "vm"])
    for host in hosts:
        state.add_metric([host.name, host.state.value], 1)
        if host.last_heartbeat is not None:
            age.add_metric([host.name], max(0.0, now - host.last_heartbeat))
        if host.state is HostState.NOT_RESPONDING:
            continue  # its figures are those of before it fell silent
        for role in MigrationRole:
            migrations.add_metric([host.name, role.value], sum(1 for m in host.migrations if m.role is role))
        if host.load is not None:
            cpus.add_metric([host.name], host.load.cpus)
            mem_total.add_metric([host.name], host.load.memory_total)
            mem_available.add_metric([host.name], host.load.memory_available)
        if host.cpu_demand is not None:
            demand.add_metric([host.name], host.cpu_demand)
        if host.load is None:
            continue
        readies = [vm.cpu_ready for vm in host.load.vms]
        if all(r is not None for r in readies):
            ready.add_metric([host.name], sum(r for r in readies if r is not None))
        for vm in host.load.vms:
            if vm.cpu_demand is not None:
                vm_demand.add_metric([host.name, vm.name], vm.cpu_demand)
            if vm.cpu_ready is not None:
                vm_ready.add_metric([host.name, vm.name], vm.cpu_ready)
            vm_memory.add_metric([host.name, vm.name], vm.memory)
    yield from (state, age, migrations, cpus, mem_total, mem_available, demand, ready, vm_demand, vm_ready, vm_memory)


def vm_families(vms: Sequence[VmRow]) -> Iterator[Metric]:
    family = GaugeMetricFamily("kvmotion_center_vms", "VMs by the state the center observed", labels=["state"])
    for state in ObservedState:
        family.add_metric([state.value], sum(1 for vm in vms if vm.observed_state is state))
    yield family


class CenterCollector:
    """Reads the store at each scrape (in the caller's thread: the store's reads block)."""

    def __init__(self, center: Center) -> None:
        self.center = center

    def collect(self) -> Iterator[Metric]:
        store = self.center.store
        yield from task_families(store.task_counts(), store.migration_times())
        yield from host_families(self.center.clock(), store.hosts())
        yield from vm_families(store.vms())
