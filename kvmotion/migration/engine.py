"""The migration service of one host agent: checks, then the source side (migration/source.py) and the
destination side (migration/destination.py), both run as the pure protocol (migration/protocol.py)
decides. Every background task (a migration, a destination's guard, a held VM's resolution, a stale
shadow's end) belongs to the service's task group, opened for the agent's lifetime by `running()`.

Commit protocol (never two running copies, never none):
- The shadow VM starts paused (-S, -incoming defer) from the source's spec, before memory moves.
- Pre-copy runs under the convergence policy; QEMU's pause-before-switchover stops the source's
  vCPUs (disks flushed) and waits while hooks hand over what is outside QEMU (disk leases); a VM
  with nothing to hand over switches over without that pause.
- After QEMU completes, the source asks the destination agent to commit: it records the VM as its
  own, then resumes it and announces its MACs. Only after that answer is the source's copy destroyed.
- Any failure before the commit answer rolls back: leases return to the source first, then the
  source resumes, and the shadow is destroyed. A destination agent that restarts destroys every
  uncommitted shadow it finds, so a half-done migration never leaves a second copy behind; a
  source agent that restarts cancels the migration it was driving, and from pre-switchover on takes
  the disk leases back first (host/vms.py), so the source resumes with its disks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kvmotion.api.agent import AsyncAgentClient, VmState
from kvmotion.api.center import ActiveMigration, MigrationRole
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import (
    PROTOCOL,
    Check,
    IncomingAnswer,
    IncomingRequest,
    MigrationOptions,
    MigrationRecord,
    Phase,
)
from kvmotion.core.errors import Conflict, KvmotionError, NotFound, PrecheckFailed, Unreachable
from kvmotion.host import resources
from kvmotion.host.vms import HOST_RESERVE, VmManager
from kvmotion.migration import policy as pol
from kvmotion.migration.checks import HostFacts, errors_of, run_checks
from kvmotion.migration.destination import DestinationSide, encryption_policy, peer_client
from kvmotion.migration.facts import cpu_models, datastores_reached, facts_from_json, facts_to_json
from kvmotion.migration.records import Records, as_record_json
from kvmotion.migration.source import Cancelled, SourceSide
from kvmotion.migration.stream import TLS_ID, add_stream_tls

log = logging.getLogger("kvmotion.migration")

destination_client = peer_client  # a client of a host's agent, by its name in the inventory


class MigrationService:
    def __init__(self, manager: VmManager, listen_ip: str, limit: int = 4) -> None:
        self.manager = manager
        self.host = manager.config.name
        self.listen_ip = listen_ip
        self.limit = limit
        self.records = Records(self.host, manager.config.state_dir / "migrations")
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.source = SourceSide(manager, self.records, self._spawn)
        self.destination = DestinationSide(manager, listen_ip, self._spawn, self.active, limit)
        manager.keeps_stale_shadows = True  # the destination side ends them in order
        # VM -> its outgoing migration's id (None while the checks run): one migration per VM. Taken
        # and tested without an await in between, released when the migration ends however it ends.
        self.migrating: dict[str, str | None] = {}

    # ---- the task group ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The service's lifetime (the agent's): its background tasks run in this task group, and
        are cancelled when it ends (a running migration then rolls back before the agent exits)."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = None
                for task in list(self.tasks.values()):
                    task.cancel()

    def _spawn(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work()` in the task group (made inside the task: a task cancelled before it starts
        leaves no coroutine never awaited)."""
        if self._group is None:
            raise self._not_running()
        self.tasks[key] = self._group.create_task(self._owned(key, work), name=f"migration {key}")

    def _not_running(self) -> Conflict:
        return Conflict(f"the migration service of {self.host} is not running (its agent is starting or stopping)")

    async def _owned(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """One background task: its failure is logged and ends it alone, never its siblings."""
        try:
            await work()
        except Exception:
            log.exception("migration task %s failed", key)
        finally:
            self.tasks.pop(key, None)

    # ---- facts & checks --------------------------------------------------------------------------
    @property
    def cancels(self) -> dict[str, asyncio.Event]:
        return self.source.cancels

    @property
    def cancelled_by(self) -> dict[str, str]:
        return self.source.cancelled_by

    @property
    def incoming_sources(self) -> Any:
        return self.destination.incoming_sources

    def active(self) -> int:
        return self.records.running() + self.destination.running()

    def active_migrations(self) -> list[ActiveMigration]:
        """What the heartbeat reports: the unfinished migrations this host drives, and the shadows
        it holds for others."""
        out = [ActiveMigration(id=r.id, vm=r.vm, role=MigrationRole.SOURCE, peer=r.destination, phase=r.phase.value)
               for r in self.records.live.values() if not r.phase.terminal]
        for mid, shadow in self.destination.shadows.items():
            source = self.incoming_sources.get(mid)
            if not shadow.phase.active or source is None:
                continue
            try:
                vm = self.destination.incoming_vm(mid)
            except NotFound:
                continue  # its shadow VM is already gone
            out.append(ActiveMigration(id=mid, vm=vm, role=MigrationRole.DESTINATION, peer=source, phase="incoming"))
        return out

    async def facts(self) -> HostFacts:
        mem = resources.meminfo()
        free = min(mem.available, mem.total - HOST_RESERVE - self.manager.committed_memory())
        return HostFacts(
            name=self.host,
            accel=self.manager.config.accel.accel.value,
            memory_free=max(free, 0),
            portgroups=frozenset(self.manager.config.portgroups),
            datastores=await asyncio.to_thread(datastores_reached, self.host),
            cpu_unavailable=await cpu_models(self.manager.config.accel.accel.value),
            migrations_active=self.active(),
            migration_limit=self.limit,
            encrypted=encryption_policy(),
        )

    async def check(self, vm: str, dest_name: str) -> tuple[Check, ...]:
        """The prerequisite checks of migrating `vm` to host `dest_name` (named in the inventory)."""
        self.manager.status(vm)  # an unknown VM: NotFound before anything else
        dest = destination_client(dest_name)
        try:
            return await self._checks(vm, dest, vm in self.migrating)
        finally:
            await dest.aclose()

    async def _checks(self, vm: str, dest: AsyncAgentClient, migrating: bool) -> tuple[Check, ...]:
        status = self.manager.status(vm)
        dest_facts = facts_from_json(await dest.request("GET", "/v1/migration/facts"))
        return run_checks(status.spec, status.state is VmState.RUNNING, await self.facts(), dest_facts, migrating)

    def _reserve(self, vm: str) -> None:
        """Take `vm` for one migration, or refuse: synchronous, so no other start runs in between."""
        if vm in self.migrating:
            mid = self.migrating[vm]
            raise Conflict(f"VM {vm} is already being migrated from {self.host}" + (f" (migration {mid})" if mid else "")
                           + f": wait for it to end or cancel it (`kvmotion migrate --cancel {vm}`)")
        self.migrating[vm] = None

    def _release(self, vm: str, mid: str | None) -> None:
        if vm in self.migrating and self.migrating[vm] == mid:
            del self.migrating[vm]

    # ---- source side -----------------------------------------------------------------------------
    async def start(self, vm: str, dest_name: str, options: MigrationOptions) -> MigrationRecord:
        """Check, then start migrating `vm` to host `dest_name`, whose agent's address comes from the
        cluster inventory. A second start for the same VM is refused until this one has ended."""
        pol.preset(options.policy)  # an unknown policy is bad input: refuse before anything moves
        self.manager.status(vm)  # an unknown VM: NotFound
        self._reserve(vm)
        dest: AsyncAgentClient | None = None
        try:
            dest = destination_client(dest_name)
            try:
                checks = await self._checks(vm, dest, False)
            except KvmotionError as exc:
                raise type(exc)(f"migration of {vm} to {dest_name} refused: {exc}") from exc
            bad = errors_of(checks)
            if bad:
                raise PrecheckFailed(f"migration of {vm} to {dest_name} refused: " + "; ".join(c.reason for c in bad))
            mid = uuid.uuid4().hex[:12]
            rec = MigrationRecord(
                id=mid, vm=vm, source=self.host, destination=dest_name, options=options, phase=Phase.CHECK,
                started_at=time.time(), checks=checks, phase_times=((Phase.CHECK.value, time.time()),),
                encrypted=encryption_policy(),
            )
        except BaseException:  # refused, unreachable, or the request itself cancelled: nothing started
            self._release(vm, None)
            if dest is not None:
                await dest.aclose()
            raise
        self.migrating[vm] = mid
        self.records.add(rec)
        self.cancels[mid] = asyncio.Event()
        try:
            self._spawn(mid, lambda: self._drive(mid, dest))
        except Conflict:  # the agent began stopping while the checks ran
            self._release(vm, mid)
            self.records.live.pop(mid, None)
            self.source.forget(mid)
            await dest.aclose()
            raise
        return rec

    async def _drive(self, mid: str, dest: AsyncAgentClient) -> None:
        """The migration, then the VM is free for the next one (whatever the outcome)."""
        try:
            await self._run(mid, dest)
        finally:
            self.source.forget(mid)
            self._release(self.records[mid].vm, mid)

    async def _run(self, mid: str, dest: AsyncAgentClient) -> None:
        await self.source.run(mid, dest)

    def _update(self, mid: str, **changes: Any) -> MigrationRecord:
        return self.records.update(mid, **changes)

    def cancel(self, mid: str, by: str = "the user", stream_healthy: bool = True) -> MigrationRecord:
        return self.source.cancel(mid, by, stream_healthy)

    def cancel_vm(self, vm: str) -> MigrationRecord:
        rec = self.records.running_of(vm)
        if rec is None:
            raise NotFound(f"no migration of VM {vm} is running on {self.host}")
        return self.cancel(rec.id)

    def get(self, mid: str) -> MigrationRecord:
        return self.records.get(mid)

    def history(self) -> list[MigrationRecord]:
        return self.records.history()

    async def recover(self) -> None:
        """After this agent restarted (VmManager.recover has run): the destination's stale shadows,
        then the outgoing migration of each VM this host was driving (its latest record)."""
        self.destination.recover()
        latest: dict[str, MigrationRecord] = {}
        for rec in self.history():  # oldest first
            if rec.source == self.host:
                latest[rec.vm] = rec
        for rec in latest.values():
            await self.source.recover(rec, lambda host: Inventory().host(host).url)

    # ---- destination side ------------------------------------------------------------------------
    async def prepare_incoming(self, request: IncomingRequest) -> IncomingAnswer:
        return await self.destination.prepare(request)

    def authorize_incoming(self, mid: str, host: str | None, what: str) -> None:
        self.destination.authorize(mid, host, what)

    async def commit_incoming(self, mid: str) -> float:
        return await self.destination.commit(mid)

    async def abort_incoming(self, mid: str) -> None:
        await self.destination.abort(mid)


__all__ = ["PROTOCOL", "TLS_ID", "Cancelled", "MigrationService", "Unreachable", "add_stream_tls", "as_record_json",
           "encryption_policy", "facts_to_json"]
