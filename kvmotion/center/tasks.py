"""The center's VM and task operations: what the /v1/vms, /v1/migrations and /v1/tasks routes do.

They only decide and record: a request becomes a queued task in one store transaction (or a
one-line refusal, with nothing written); the dispatcher (kvmotion.center.dispatcher) carries tasks
out. Synchronous, like Center: the HTTP layer runs them in worker threads.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence

from kvmotion.api.center import (
    HostMode,
    MigrateRequest,
    ObservedState,
    Placement,
    PowerState,
    TaskKind,
    TaskProgress,
    TaskStarted,
    TaskState,
    TaskView,
    VmCreate,
    VmCreated,
    VmView,
)
from kvmotion.api.identity import Identity
from kvmotion.api.spec import VmSpec
from kvmotion.center.drs import initial_host
from kvmotion.center.placement import HostSnapshot, place, summary
from kvmotion.center.store import HostRow, MigrationRow, Store, VmRow
from kvmotion.core.errors import Conflict, InsufficientResources, InvalidInput, NotFound

MAX_LIST = 1000
MIGRATION_OPTIONS = {"max_downtime_ms", "bandwidth", "policy"}  # what a migrate request passes to the source agent


def new_task_id() -> str:
    return secrets.token_hex(8)


def vm_view(row: VmRow) -> VmView:
    return VmView(name=row.name, spec=VmSpec.from_json(json.loads(row.spec)) if row.spec else None,
                  desired_host=row.desired_host, desired_power=row.desired_power, observed_host=row.observed_host,
                  observed_state=row.observed_state, updated=row.updated)


def snapshots(hosts: Sequence[HostRow], reserved: Mapping[str, tuple[int, int]]) -> list[HostSnapshot]:
    """Hosts as placement sees them: memory and CPUs promised to VMs on their way there (queued or
    running migrations, Store.reservations) count as used, each vCPU as half a busy core."""
    return [HostSnapshot(name=h.name, state=h.state, load=h.load, facts=h.facts, cpu_demand=h.cpu_demand,
                         reserved_memory=reserved.get(h.name, (0, 0))[0],
                         reserved_cpus=reserved.get(h.name, (0, 0))[1] * 0.5, mode=h.mode,
                         quarantined=h.quarantined) for h in hosts]


ON_ALREADY = (ObservedState.RUNNING, ObservedState.STARTING, ObservedState.PAUSED, ObservedState.MIGRATING)


def refuse_maintenance(host: HostRow, vm: str) -> None:
    """A named host in (or entering) maintenance takes no VM, as vSphere's."""
    if host.mode is not HostMode.NORMAL:
        state = "in maintenance" if host.mode is HostMode.MAINTENANCE else "entering maintenance"
        raise InvalidInput(f"host {host.name} is {state}: it takes no VM ({vm}); "
                           f"`kvmotion host maintenance exit {host.name}` first")


class Tasks:
    """VM and task operations over `store`; `clock`: wall-clock seconds."""

    def __init__(self, store: Store, clock: Callable[[], float],
                 predict: Callable[[str, str, str], tuple[float | None, float | None]] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.predict = predict  # (vm, source, destination) -> predicted seconds, downtime ms: for its task

    # ---- VMs ----
    def vm_list_json(self) -> str:
        return self.store.vm_list_json()

    def vm(self, name: str) -> VmView:
        row = self.store.vm(name)
        if row is None:
            raise NotFound(f"no VM {name} in the cluster")
        return vm_view(row)

    def _named_host(self, name: str, vm: str) -> HostRow:
        """The host a request names for `vm`: joined, and taking VMs (not in maintenance)."""
        named = self.store.host(name)
        if named is None:
            raise InvalidInput(f"unknown host {name}: no such host has joined")
        refuse_maintenance(named, vm)
        return named

    def _place(self, spec: VmSpec, source: str, vm: str) -> tuple[Placement, str, int | None]:
        """Where a VM moves, and that host's free memory as placement saw it."""
        hosts = snapshots(self.store.hosts(), self.store.reservations())
        placement = self.placement(spec, source, hosts)
        if placement.chosen is None:
            raise InsufficientResources(f"cannot migrate VM {vm}: {summary(placement)}")
        room = next((h.load.memory_available for h in hosts if h.name == placement.chosen and h.load), None)
        return placement, placement.chosen, room

    def placement(self, spec: VmSpec, source: str | None, hosts: Sequence[HostSnapshot] | None = None) -> Placement:
        """`hosts`: the snapshots to place on (default: the store's hosts and reservations now)."""
        if hosts is None:
            hosts = snapshots(self.store.hosts(), self.store.reservations())
        return place(spec, hosts, source=source, baseline=self.store.settings().cpu_baseline)

    def create_vm(self, request: VmCreate, who: Identity) -> VmCreated:
        """The VM defined on its host (named, or chosen by placement as DRS's automation level allows:
        drs.initial_host) and a create task queued."""
        spec = request.spec
        placement = None
        if request.host is not None:
            host = self._named_host(request.host, spec.name).name
        else:
            placement = self.placement(spec, None)
            host = initial_host(self.store.drs_config().automation, spec.name, placement)
        now = self.clock()
        row = VmRow(name=spec.name, observed_state=ObservedState.ABSENT, updated=now, spec=spec.dumps(),
                    desired_host=host, desired_power=PowerState.OFF)
        task = TaskView(id=new_task_id(), kind=TaskKind.CREATE, target=spec.name, state=TaskState.QUEUED,
                        created=now, requested_by=str(who), destination=host)
        self.store.create_vm(row, task, str(who))
        return VmCreated(vm=vm_view(row), task=self._task(task.id), placement=placement)

    def power(self, name: str, on: bool, who: Identity) -> TaskView:
        row = self.store.vm(name)
        if row is None:
            raise NotFound(f"no VM {name} in the cluster")
        if row.desired_host is None and row.observed_host is None:
            raise Conflict(f"VM {name} has no host to {'start' if on else 'stop'} it on")
        if on and row.observed_state not in ON_ALREADY:  # powered on where the dispatcher starts it
            home = self.store.host(row.observed_host or row.desired_host or "")
            if home is not None:
                refuse_maintenance(home, name)
        task = TaskView(id=new_task_id(), kind=TaskKind.START if on else TaskKind.STOP, target=name,
                        state=TaskState.QUEUED, created=self.clock(), requested_by=str(who))
        return self.store.add_task(task, str(who))

    # ---- migrations ----
    def migrate(self, request: MigrateRequest, who: Identity) -> TaskStarted:
        """A migrate task, queued for admission; refusals of the request are 422, one line each."""
        row = self.store.vm(request.vm)
        if row is None:
            raise InvalidInput(f"unknown VM {request.vm}: no such VM in the cluster")
        source = row.observed_host or row.desired_host
        if source is None:
            raise InvalidInput(f"VM {request.vm} is on no host: nothing to migrate")
        busy = self.store.open_task(request.vm)
        if busy is not None:
            doing = "already migrating" if busy.kind is TaskKind.MIGRATE else f"busy ({busy.kind.value})"
            raise InvalidInput(f"VM {request.vm} is {doing}: task {busy.id}")
        placement, spec, room = None, None, None
        if request.destination is not None:
            self._named_host(request.destination, request.vm)
            if request.destination == source:
                raise InvalidInput(f"VM {request.vm} is already on {source}: name another host")
            destination = request.destination
        else:
            if row.spec is None:
                raise InvalidInput(f"VM {request.vm} was not created through the center: name a destination")
            spec = VmSpec.from_json(json.loads(row.spec))
            placement, destination, room = self._place(spec, source, request.vm)
        options = request.model_dump_json(include=MIGRATION_OPTIONS)
        for again in (False, True):
            seconds, downtime = self.predict(request.vm, source, destination) if self.predict else (None, None)
            try:
                queued = self.queue_move(request.vm, source, destination, str(who), options=options, predicted_s=seconds,
                                         predicted_downtime_ms=downtime, room=room)
                break
            except InsufficientResources:
                if spec is None or again:
                    raise
                # Another move placed at the same moment took the room: placed again, once.
                placement, destination, room = self._place(spec, source, request.vm)
            except Conflict as exc:  # a migration requested in between
                raise InvalidInput(str(exc)) from None
        return TaskStarted(task=queued, placement=placement)

    def queue_move(self, vm: str, source: str, destination: str, who: str, *, options: str | None = None, why: str = "",
                   predicted_s: float | None = None, predicted_downtime_ms: float | None = None,
                   rehome: bool = False, room: int | None = None) -> TaskView:
        """A migrate task (a rehome task for a powered-off VM) from source to destination, queued;
        Conflict if the VM has an open task; InsufficientResources if `room` (the destination's free
        memory as placement saw it) no longer holds the VM beside the moves queued there."""
        kind = TaskKind.REHOME if rehome else TaskKind.MIGRATE
        if options is None:  # the defaults a user's request has
            options = MigrateRequest(vm=vm).model_dump_json(include=MIGRATION_OPTIONS)
        task = TaskView(id=new_task_id(), kind=kind, target=vm, state=TaskState.QUEUED, created=self.clock(),
                        requested_by=who, why=why, predicted_s=predicted_s, predicted_downtime_ms=predicted_downtime_ms,
                        progress=TaskProgress(phase="queued", message="waiting for admission" if not rehome else ""))
        migration = MigrationRow(id=task.id, task_id=task.id, vm=vm, source=source, destination=destination,
                                 options=options)
        return self.store.add_task(task, who, migration, room)

    # ---- tasks ----
    def _task(self, task_id: str) -> TaskView:
        task = self.store.task(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def task(self, task_id: str) -> TaskView:
        return self._task(task_id)

    def tasks(self, state: TaskState | None, limit: int) -> list[TaskView]:
        return self.store.tasks(state=state, limit=min(limit, MAX_LIST))

    def cancel(self, task_id: str, who: Identity) -> TaskView:
        return self.store.request_cancel(task_id, str(who), self.clock())
