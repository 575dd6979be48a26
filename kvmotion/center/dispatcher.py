"""The dispatcher: the controller that carries tasks out, and the reconcile pass.

Level-triggered: every tick it reads the open tasks from the store and acts on what it finds, so a
tick after a restart of the center decides as one before it would have. A running task with no
worker in this process gets one (after a restart: the migration is looked up on its source agent by
id and followed, or ended as the agent's record says); queued create/start/stop tasks start at
once; queued migrations start as admission (kvmotion.center.admission) allows. Workers are
idempotent: a create finds the VM there already, a start finds it running.

The data path stays agent to agent: a migration's worker calls the source agent's POST
/v1/migrations with the center's own certificate (center:NAME, which agents allow what an admin
may do) and follows its record until it ends. If the center stops, migrations go on; their tasks
stay running in the store until a center follows them again.

Everything runs under the center's TaskGroup until `stop` is set; every wait is bounded (each agent
call by `call_timeout`, each pause by the tick or poll interval); a failed tick is logged and the
next one decides again; cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from pydantic import ValidationError

from kvmotion.api.agent import AsyncAgentClient, VmState
from kvmotion.api.center import (
    EventKind,
    HostFacts,
    HostState,
    ObservedState,
    PowerState,
    TaskKind,
    TaskProgress,
    TaskResult,
    TaskState,
    TaskView,
)
from kvmotion.api.migration import MigrationRecord, MigrationRequest, OptionsBody, Phase, record_from_json
from kvmotion.api.spec import VmSpec
from kvmotion.center.admission import Move, admit, host_budget
from kvmotion.center.store import HostRow, Store, VmRow
from kvmotion.core.errors import Conflict, KvmotionError, NotFound, Unreachable
from kvmotion.core.jsonio import as_json

log = logging.getLogger("kvmotion.center")

# Where in a migration each phase puts the task (pre-copy's share grows with the bytes sent).
_PHASE_FRACTION = {Phase.CHECK: 0.02, Phase.PREPARE: 0.05, Phase.PRECOPY: 0.05, Phase.SWITCHOVER: 0.92,
                   Phase.COMMIT: 0.97, Phase.DONE: 1.0, Phase.ROLLBACK: 0.0, Phase.FAILED: 0.0, Phase.CANCELLED: 0.0}
WAITING_REFRESH = 5.0  # seconds between rewrites of a queued migration's reason to wait
RECOVERY_SKEW = 60.0  # seconds: how much earlier than the task's start an adopted migration may have started


# ---- the agents, as the dispatcher needs them -----------------------------------------------------------------
class Agents(Protocol):
    async def start_migration(self, host: HostRow, request: MigrationRequest) -> MigrationRecord: ...

    async def migration(self, host: HostRow, migration_id: str) -> MigrationRecord: ...

    async def migrations(self, host: HostRow) -> list[MigrationRecord]: ...

    async def cancel_migration(self, host: HostRow, migration_id: str) -> None: ...

    async def facts(self, host: HostRow) -> HostFacts: ...

    async def vm_state(self, host: HostRow, name: str) -> VmState | None: ...  # None: not on that host

    async def create_vm(self, host: HostRow, spec: VmSpec) -> None: ...

    async def start_vm(self, host: HostRow, name: str) -> None: ...

    async def stop_vm(self, host: HostRow, name: str) -> None: ...

    async def delete_vm(self, host: HostRow, name: str) -> None: ...

    async def aclose(self) -> None: ...


class HttpAgents:
    """Agents over their HTTPS API, as center:NAME (`ssl_context` presents the center's certificate;
    None for an --insecure cluster). One client per agent URL."""

    def __init__(self, ssl_context: ssl.SSLContext | None, timeout: float = 30.0) -> None:
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._clients: dict[str, AsyncAgentClient] = {}

    def _client(self, host: HostRow) -> AsyncAgentClient:
        client = self._clients.get(host.agent_url)
        if client is None:
            client = self._clients[host.agent_url] = AsyncAgentClient(host.agent_url, self.ssl_context, self.timeout)
        return client

    async def start_migration(self, host: HostRow, request: MigrationRequest) -> MigrationRecord:
        return record_from_json(await self._client(host).request("POST", "/v1/migrations", body=request))

    async def migration(self, host: HostRow, migration_id: str) -> MigrationRecord:
        return record_from_json(await self._client(host).request("GET", f"/v1/migrations/{migration_id}"))

    async def migrations(self, host: HostRow) -> list[MigrationRecord]:
        return [record_from_json(d) for d in await self._client(host).request("GET", "/v1/migrations")]

    async def cancel_migration(self, host: HostRow, migration_id: str) -> None:
        await self._client(host).request("POST", f"/v1/migrations/{migration_id}/cancel")

    async def facts(self, host: HostRow) -> HostFacts:
        d = await self._client(host).request("GET", "/v1/migration/facts")
        usable = sorted(model for model, missing in d.get("cpu_unavailable", {}).items() if not missing)
        return HostFacts(accel=str(d.get("accel", "")), cpu_models=tuple(usable),
                         portgroups=tuple(sorted(d.get("portgroups", ()))),
                         datastores=tuple(sorted(d.get("datastores", ()))), updated=time.time())

    async def vm_state(self, host: HostRow, name: str) -> VmState | None:
        try:
            d = await self._client(host).request("GET", f"/v1/vms/{name}")
        except NotFound:
            return None
        return VmState(d["state"])

    async def create_vm(self, host: HostRow, spec: VmSpec) -> None:
        await self._client(host).request("POST", "/v1/vms", body=spec)

    async def start_vm(self, host: HostRow, name: str) -> None:
        await self._client(host).request("POST", f"/v1/vms/{name}/start")

    async def stop_vm(self, host: HostRow, name: str) -> None:
        await self._client(host).request("POST", f"/v1/vms/{name}/stop", params={"force": False})

    async def delete_vm(self, host: HostRow, name: str) -> None:
        await self._client(host).request("DELETE", f"/v1/vms/{name}")

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def progress_of(rec: MigrationRecord) -> TaskProgress:
    p = rec.progress
    fraction = _PHASE_FRACTION[rec.phase]
    if rec.phase is Phase.PRECOPY and p.transferred + p.remaining > 0:
        fraction += 0.85 * p.transferred / (p.transferred + p.remaining)
    message = f"{rec.source} -> {rec.destination}: {rec.phase.value}"
    if rec.phase is Phase.PRECOPY:
        message += f", round {p.round}"
    return TaskProgress(phase=rec.phase.value, fraction=round(min(fraction, 1.0), 4), transferred=p.transferred,
                        remaining=p.remaining, message=message)


def _record_json(rec: MigrationRecord) -> str:
    return json.dumps(as_json(rec), sort_keys=True)


class Dispatcher:
    def __init__(self, store: Store, agents: Agents, *, clock: Callable[[], float] = time.time,
                 interval: float = 0.5, poll: float = 1.0, call_timeout: float = 30.0, facts_every: float = 60.0,
                 reconcile_every: float = 10.0, max_workers: int = 256) -> None:
        self.store = store
        self.agents = agents
        self.clock = clock
        self.interval = interval
        self.poll = poll
        self.call_timeout = call_timeout
        self.facts_every = facts_every
        self.reconcile_every = reconcile_every
        self.max_workers = max_workers
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._facts: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, tuple[str, float]] = {}  # queued migration -> the reason last written, when
        self._drift: dict[str, str] = {}  # VM -> the drift last reported
        self._last_reconcile = float("-inf")
        self._stop = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    # ---- the loop ----
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                while not stop.is_set():
                    try:
                        async with asyncio.timeout(self.call_timeout):
                            await self.tick()
                    except TimeoutError:
                        log.warning("dispatcher tick took over %.0f s; trying again", self.call_timeout)
                    except Exception:  # the next tick decides again from the store
                        log.exception("dispatcher tick failed; trying again")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.interval):
                            await stop.wait()
                # Stopping: calls in flight are abandoned, not awaited (the store keeps every task's
                # state; the migrations go on at their agents and the next center follows them).
                for task in [*self._workers.values(), *self._facts.values()]:
                    task.cancel()
        finally:
            self._group = None
            await self.agents.aclose()

    def _spawn(self, registry: dict[str, asyncio.Task[None]], key: str, coro: Coroutine[Any, Any, None]) -> None:
        assert self._group is not None
        task = self._group.create_task(self._guarded(coro, key), name=f"dispatcher {key}")
        registry[key] = task
        task.add_done_callback(lambda _t: registry.pop(key, None))

    async def _guarded(self, coro: Coroutine[Any, Any, None], key: str) -> None:
        """A worker's failure is logged, never the group's end (the next tick sees the task again)."""
        try:
            await coro
        except Exception:
            log.exception("dispatcher worker %s failed", key)

    async def tick(self) -> None:
        """One level-triggered pass over the open tasks (and, now and then, facts and reconcile)."""
        open_tasks = await asyncio.to_thread(self.store.tasks, None, 100_000, True)
        hosts = {h.name: h for h in await asyncio.to_thread(self.store.hosts)}
        settings = await asyncio.to_thread(self.store.settings)
        running_moves: list[Move] = []
        queued_moves: list[Move] = []
        for task in open_tasks:
            if task.state is TaskState.RUNNING:
                if task.kind is TaskKind.MIGRATE and task.source and task.destination:
                    running_moves.append(Move(task.id, task.source, task.destination))
                if task.id not in self._workers and len(self._workers) < self.max_workers:
                    self._spawn(self._workers, task.id, self._work(task, resumed=True))
            elif task.kind is TaskKind.MIGRATE:
                if task.source and task.destination:
                    queued_moves.append(Move(task.id, task.source, task.destination))
            elif len(self._workers) < self.max_workers and task.id not in self._workers:
                await self._start(task)
        budgets = {name: host_budget(h.facts.link_bps if h.facts else None, settings)
                   for name, h in hosts.items() if h.state is HostState.CONNECTED}
        by_id = {t.id: t for t in open_tasks}
        waiting: dict[str, TaskProgress] = {}
        for decision in admit(queued_moves, running_moves, budgets, settings.cluster_migrations):
            if decision.admitted:
                if len(self._workers) < self.max_workers:
                    self._waiting.pop(decision.task, None)
                    await self._start(by_id[decision.task])
            else:
                # A long queue's reasons shift at every start: each task's is rewritten at most every few seconds.
                last = self._waiting.get(decision.task)
                if last is None or (last[0] != decision.reason and self.clock() - last[1] >= WAITING_REFRESH):
                    self._waiting[decision.task] = (decision.reason, self.clock())
                    waiting[decision.task] = TaskProgress(phase="queued", message=f"waiting: {decision.reason}")
        if waiting:
            await asyncio.to_thread(self.store.update_progress, waiting)
        queued_ids = {m.task for m in queued_moves}
        for gone in [t for t in self._waiting if t not in queued_ids]:
            del self._waiting[gone]
        now = self.clock()
        for name, host in hosts.items():
            stale = host.facts is None or now - host.facts.updated > self.facts_every
            if host.state is HostState.CONNECTED and stale and name not in self._facts:
                self._spawn(self._facts, name, self._refresh_facts(host))
        if now - self._last_reconcile >= self.reconcile_every:
            self._last_reconcile = now
            await self.reconcile()

    async def _start(self, task: TaskView) -> None:
        progress = TaskProgress(phase="starting", message="starting")
        if await asyncio.to_thread(self.store.start_task, task.id, self.clock(), progress):
            started = task.model_copy(update={"state": TaskState.RUNNING, "started": self.clock()})
            self._spawn(self._workers, task.id, self._work(started, resumed=False))

    async def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async with asyncio.timeout(self.call_timeout):
            return await coro

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` or until stopped; True when stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return self._stop.is_set()

    async def _end(self, task: TaskView, state: TaskState, *, error: str | None = None,
                   result: TaskResult | None = None, desired_host: str | None = None,
                   desired_power: PowerState | None = None, observed_host: str | None = None,
                   observed_state: ObservedState | None = None) -> None:
        await asyncio.to_thread(self.store.end_task, task.id, state, self.clock(), error=error, result=result,
                                desired_host=desired_host, desired_power=desired_power, observed_host=observed_host,
                                observed_state=observed_state)

    async def _refresh_facts(self, host: HostRow) -> None:
        try:
            facts = await self._call(self.agents.facts(host))
        except (KvmotionError, TimeoutError) as exc:
            log.info("facts of %s not refreshed: %s", host.name, exc or "timed out")
            # The next try after a pause: stale facts stay what placement uses meanwhile.
            await self._pause(min(self.facts_every, 10.0))
            return
        await asyncio.to_thread(self.store.set_host_facts, host.name, facts)

    # ---- workers ----
    async def _work(self, task: TaskView, resumed: bool) -> None:
        if task.kind is TaskKind.MIGRATE:
            await self._migrate(task, resumed)
        elif task.kind is TaskKind.REHOME:
            await self._rehome(task)
        else:
            await self._power(task)

    async def _rehome(self, task: TaskView) -> None:
        """A powered-off VM defined on its new host, then undefined on its old one (its disks are on
        datastores: nothing else moves). Each step is skipped when done already, so a retry is safe."""
        vm = await asyncio.to_thread(self.store.vm, task.target)
        source = await self._host(vm.observed_host or vm.desired_host if vm else None)
        target = await self._host(task.destination)
        if vm is None or vm.spec is None or source is None or target is None:
            await self._end(task, TaskState.FAILED, error=f"VM {task.target}, its spec or a host is gone")
            return
        try:
            state = await self._call(self.agents.vm_state(source, task.target))
            if state not in (None, VmState.STOPPED, VmState.CRASHED):
                raise Conflict(f"VM {task.target} is {state.value} on {source.name}: only a stopped VM is re-homed")
            if await self._call(self.agents.vm_state(target, task.target)) is None:
                await self._call(self.agents.create_vm(target, VmSpec.from_json(json.loads(vm.spec))))
            if state is not None:
                await self._call(self.agents.delete_vm(source, task.target))
            await self._end(task, TaskState.DONE, result=TaskResult(host=target.name), desired_host=target.name,
                            observed_host=target.name, observed_state=ObservedState.STOPPED)
        except TimeoutError:
            await self._end(task, TaskState.FAILED, error=f"a host did not answer within {self.call_timeout:.0f} s")
        except KvmotionError as exc:
            await self._end(task, TaskState.FAILED, error=str(exc))

    async def _host(self, name: str | None) -> HostRow | None:
        return None if name is None else await asyncio.to_thread(self.store.host, name)

    async def _power(self, task: TaskView) -> None:
        """create / start / stop: look at the VM on its host first, act only if it is not so already."""
        vm: VmRow | None = await asyncio.to_thread(self.store.vm, task.target)
        if vm is None:
            await self._end(task, TaskState.FAILED, error=f"VM {task.target} is no longer in the cluster")
            return
        host = await self._host(vm.desired_host or vm.observed_host if task.kind is TaskKind.CREATE
                                else vm.observed_host or vm.desired_host)
        if host is None:
            await self._end(task, TaskState.FAILED, error=f"VM {task.target}'s host has left the cluster")
            return
        if (await asyncio.to_thread(self.store.task, task.id) or task).cancel_requested:
            await self._end(task, TaskState.CANCELLED, error="cancelled before the agent was asked")
            return
        try:
            state = await self._call(self.agents.vm_state(host, task.target))
            if task.kind is TaskKind.CREATE:
                if state is None:
                    if vm.spec is None:
                        raise NotFound(f"VM {task.target} has no spec at the center")
                    await self._call(self.agents.create_vm(host, VmSpec.from_json(json.loads(vm.spec))))
                await self._end(task, TaskState.DONE, result=TaskResult(host=host.name), desired_host=host.name)
            elif task.kind is TaskKind.START:
                if state is None:
                    raise NotFound(f"VM {task.target} is not on {host.name}")
                if state not in (VmState.RUNNING, VmState.STARTING, VmState.MIGRATING):
                    await self._call(self.agents.start_vm(host, task.target))
                await self._end(task, TaskState.DONE, result=TaskResult(host=host.name), desired_power=PowerState.ON)
            else:
                if state is None:
                    raise NotFound(f"VM {task.target} is not on {host.name}")
                if state not in (VmState.STOPPED, VmState.STOPPING):
                    await self._call(self.agents.stop_vm(host, task.target))
                await self._end(task, TaskState.DONE, result=TaskResult(host=host.name), desired_power=PowerState.OFF)
        except TimeoutError:
            await self._end(task, TaskState.FAILED, error=f"host {host.name} did not answer within "
                                                          f"{self.call_timeout:.0f} s")
        except KvmotionError as exc:
            await self._end(task, TaskState.FAILED, error=str(exc))

    async def _migrate(self, task: TaskView, resumed: bool) -> None:
        mig = await asyncio.to_thread(self.store.migration, task.id)
        if mig is None:
            await self._end(task, TaskState.FAILED, error="the task has no migration (damaged store?)")
            return
        source = await self._host(mig.source)
        if source is None:
            await self._end(task, TaskState.FAILED, error=f"source host {mig.source} has left the cluster")
            return
        agent_id = mig.agent_id
        if agent_id is None and resumed:
            agent_id = await self._adopt(task, source)
            if agent_id is None:
                return
        if agent_id is None:
            if (await asyncio.to_thread(self.store.task, task.id) or task).cancel_requested:
                await self._end(task, TaskState.CANCELLED, error="cancelled before the source agent was asked")
                return
            try:
                request = MigrationRequest(vm=mig.vm, destination=mig.destination,
                                           options=OptionsBody.model_validate_json(mig.options))
            except ValidationError as exc:  # the center wrote them itself: a damaged store
                await self._end(task, TaskState.FAILED, error=f"the task's migration options are damaged: "
                                                               f"{exc.errors()[0]['msg']}")
                return
            try:
                rec = await self._call(self.agents.start_migration(source, request))
            except TimeoutError:
                # It may have started after all: the next life of this worker adopts it or ends the task.
                log.warning("source agent %s did not answer the start of task %s in time", source.name, task.id)
                await self._pause(self.poll)
                agent_id = await self._adopt(task, source)
                if agent_id is None:
                    return
                rec = None
            except KvmotionError as exc:
                await self._end(task, TaskState.FAILED, error=str(exc))
                return
            if rec is not None:
                agent_id = rec.id
                await asyncio.to_thread(self.store.update_task, task.id, progress_of(rec), agent_id=rec.id,
                                        record=_record_json(rec))
        if agent_id is not None:
            await self._follow(task, source, agent_id)

    async def _adopt(self, task: TaskView, source: HostRow) -> str | None:
        """After a restart (or an unanswered start): the migration of the task's VM the source agent
        started since the task did, or the task ends failed (nothing was started). None: ended or stopped."""
        started = task.started if task.started is not None else task.created
        while not self._stop.is_set():
            try:
                records = await self._call(self.agents.migrations(source))
            except (KvmotionError, TimeoutError) as exc:
                await asyncio.to_thread(self.store.update_task, task.id, TaskProgress(
                    phase="unknown", message=f"asking source agent {source.name}: {exc or 'timed out'}"))
                if await self._pause(self.poll):
                    return None
                continue
            ours = [r for r in records if r.vm == task.target and r.started_at >= started - RECOVERY_SKEW]
            if not ours:
                await self._end(task, TaskState.FAILED, error=f"source agent {source.name} has no migration of "
                                f"{task.target} started by this task: the center stopped before it was started")
                return None
            rec = max(ours, key=lambda r: r.started_at)
            await asyncio.to_thread(self.store.update_task, task.id, progress_of(rec), agent_id=rec.id,
                                    record=_record_json(rec))
            return rec.id
        return None

    async def _follow(self, task: TaskView, source: HostRow, agent_id: str) -> None:
        """Poll the source agent's record until it ends; end the task as the record says."""
        cancel_sent = False
        last: TaskProgress | None = None
        while True:
            current = await asyncio.to_thread(self.store.task, task.id)
            if current is None or current.state.terminal:
                return
            if current.cancel_requested and not cancel_sent:
                try:
                    await self._call(self.agents.cancel_migration(source, agent_id))
                    cancel_sent = True
                except (KvmotionError, TimeoutError) as exc:
                    log.info("cancel of migration %s not delivered yet: %s", agent_id, exc or "timed out")
            try:
                rec = await self._call(self.agents.migration(source, agent_id))
            except (Unreachable, TimeoutError) as exc:
                progress = TaskProgress(phase=last.phase if last else "unknown", fraction=last.fraction if last else 0,
                                        message=f"source agent {source.name} not answering: {exc or 'timed out'}")
                if progress != last:
                    await asyncio.to_thread(self.store.update_task, task.id, progress)
                    last = progress
                if await self._pause(self.poll):
                    return
                continue
            except KvmotionError as exc:
                await self._end(task, TaskState.FAILED, error=f"source agent {source.name}: {exc}")
                return
            progress = progress_of(rec)
            if rec.phase.terminal:
                await asyncio.to_thread(self.store.update_task, task.id, progress, record=_record_json(rec))
                await self._finish(task, rec)
                return
            if progress != last:
                await asyncio.to_thread(self.store.update_task, task.id, progress, record=_record_json(rec))
                last = progress
            if await self._pause(self.poll):
                return

    async def _finish(self, task: TaskView, rec: MigrationRecord) -> None:
        s = rec.summary
        result = TaskResult(host=rec.destination if rec.phase is Phase.DONE else rec.source, migration=rec.id,
                            downtime_ms=s.downtime_ms if s else None, pause_ms=s.pause_ms if s else None,
                            total_ms=s.total_ms if s else None)
        if rec.phase is Phase.DONE:
            await self._end(task, TaskState.DONE, result=result, desired_host=rec.destination,
                            observed_host=rec.destination, observed_state=ObservedState.RUNNING)
        elif rec.phase is Phase.CANCELLED:
            await self._end(task, TaskState.CANCELLED, result=result, error=rec.error or "cancelled")
        else:
            await self._end(task, TaskState.FAILED, result=result, error=rec.error or "the migration failed")

    # ---- reconcile (report only) ----
    async def reconcile(self) -> list[str]:
        """Desired vs observed for every VM without an open task: each new difference one drift event."""
        vms = await asyncio.to_thread(self.store.vms)
        busy = {t.target for t in await asyncio.to_thread(self.store.tasks, None, 100_000, True)}
        found: dict[str, str] = {}
        for vm in vms:
            if vm.name in busy:
                continue
            drift = drift_of(vm)
            if drift:
                found[vm.name] = drift
        new = [f"{name}: {text}" for name, text in found.items() if self._drift.get(name) != text]
        now = self.clock()
        for name, text in found.items():
            if self._drift.get(name) != text:
                await asyncio.to_thread(self.store.add_event, now, EventKind.DRIFT, f"vm:{name}", text, "center")
        self._drift = found
        return new


def drift_of(vm: VmRow) -> str:
    """How a VM's observed state differs from what the center wants of it ('' if it does not, or if
    nothing is known: a host not responding makes its VMs unknown, not drifted)."""
    if vm.spec is None or vm.observed_state is ObservedState.UNKNOWN:
        return ""
    seen = vm.observed_state
    if seen is ObservedState.ABSENT:
        if vm.desired_power is PowerState.ON:
            return f"VM {vm.name} is desired on {vm.desired_host} and running, but no host reports it"
        return ""
    if vm.desired_host is not None and vm.observed_host != vm.desired_host and seen is not ObservedState.MIGRATING:
        return f"VM {vm.name} is desired on {vm.desired_host} but observed on {vm.observed_host} ({seen.value})"
    if vm.desired_power is PowerState.ON and seen in (ObservedState.STOPPED, ObservedState.CRASHED):
        return f"VM {vm.name} is desired running but observed {seen.value} on {vm.observed_host}"
    if vm.desired_power is PowerState.OFF and seen in (ObservedState.RUNNING, ObservedState.PAUSED):
        return f"VM {vm.name} is desired stopped but observed {seen.value} on {vm.observed_host}"
    return ""
