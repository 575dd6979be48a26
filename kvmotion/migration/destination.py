"""The destination agent's side of a migration: the paused shadow VM, its commit or its end, run as
migration/protocol.py's shadow_step decides (one ShadowState per incoming migration)."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kvmotion.api.agent import AsyncAgentClient
from kvmotion.api.config import load_config
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import PROTOCOL, Compression, IncomingAnswer, IncomingRequest, Phase
from kvmotion.api.tls import agent_client
from kvmotion.core.errors import Conflict, Forbidden, KvmotionError, MigrationError, NotFound, Unreachable, VmFailed
from kvmotion.host.vms import VmManager
from kvmotion.migration import protocol as p
from kvmotion.migration import stream as st
from kvmotion.migration.records import IncomingSources
from kvmotion.qemu.sockets import limit_receive_buffer

log = logging.getLogger("kvmotion.migration")

ORPHAN_TIMEOUT = 30.0  # s a shadow waits for a source agent it cannot reach (> the source's COMMIT_RETRY)
STALE_SHADOW_WAIT = 20.0  # s a restarted destination waits for the source to cancel before destroying a shadow
GUARD_INTERVAL = 1.0  # s between the destination's questions to the source about an uncommitted shadow
PEER_TIMEOUT = 5.0  # s for one question to the source's agent
INCOMING_SETTLE = 10.0  # s the destination may take to load the end of the stream the source has sent
RESUME_TIMEOUT = 10.0  # s for the committed VM's RESUME event
STALE_POLL = 0.2  # s between a restarted destination's questions about a stale shadow's migration
QMP_TIMEOUT = 30.0  # s a QMP command may take: a QEMU silent that long is stuck


def encryption_policy() -> bool:
    """Whether migration streams are encrypted: the cluster's setting, never a caller's wish."""
    return load_config().encrypted


def peer_client(host: str) -> AsyncAgentClient:
    """A client of `host`'s agent at the address the cluster inventory gives (NotFound: no such host)."""
    return agent_client(Inventory().host(host).url)


class DestinationSide:
    """The migrations this host receives. `spawn` runs a background coroutine in the service's task
    group; `active` counts every migration of the host against `limit`."""

    def __init__(self, manager: VmManager, listen_ip: str, spawn: Callable[[str, Callable[[], Awaitable[None]]], None],
                 active: Callable[[], int], limit: int) -> None:
        self.manager = manager
        self.host = manager.config.name
        self.listen_ip = listen_ip
        self.spawn = spawn
        self.active = active
        self.limit = limit
        self.shadows: dict[str, p.ShadowState] = {}
        self.incoming_sources = IncomingSources(manager.config.state_dir / "incoming")
        # How incoming migrations ended since this agent started ("committed", "destroyed"): for metrics.
        self.ended: collections.Counter[str] = collections.Counter()

    def running(self) -> int:
        return sum(1 for s in self.shadows.values() if s.phase.active)

    def _step(self, mid: str, event: p.ShadowEvent, default: p.ShadowPhase = p.ShadowPhase.GONE) -> p.ShadowStep:
        step = p.shadow_step(self.shadows.get(mid, p.ShadowState(default)), event)
        self.shadows[mid] = step.state
        return step

    # ---- prepare ------------------------------------------------------------------------------------
    async def prepare(self, request: IncomingRequest) -> IncomingAnswer:
        """The paused shadow VM for migration `mid` from host `source` (the caller: the API checked
        that), listening for the stream. Only `source` may commit or abort it, and with the
        cluster's encryption policy only `source`'s QEMUs may send the stream."""
        mid, source, spec = request.migration_id, request.source, request.spec
        if self.active() >= self.limit:
            raise Conflict(f"{self.host} already runs {self.active()} migrations (limit {self.limit})")
        settings = st.own_capabilities().accept(request.offer)
        encrypted = encryption_policy()
        self.incoming_sources.remember(mid, source)
        try:
            await self.manager.create(spec, incoming_migration=mid)
        except BaseException:
            self.incoming_sources.forget(mid)
            raise
        self.shadows[mid] = p.ShadowState()
        try:
            await self.manager.start(spec.name, incoming=True)
            qmp = self.manager.qmp(spec.name)
            ask = functools.partial(qmp.execute_within, QMP_TIMEOUT)
            await ask("migrate-set-capabilities", capabilities=st.capabilities(request.postcopy, settings))
            await ask("migrate-set-parameters", **st.multifd_params(settings))
            if encrypted:
                await ask("migrate-set-parameters", **await asyncio.wait_for(st.add_stream_tls(
                    qmp, self.host, "server", source, self.manager.confinement.user), QMP_TIMEOUT))
            await ask("migrate-incoming", uri=f"tcp:{self.listen_ip}:0")
            info = await ask("query-migrate")
            addr = info["socket-address"][0]
            size = st.RECEIVE_BUFFER if settings.compression is Compression.NONE else st.RECEIVE_BUFFER_COMPRESSED
            await st.on_qemu_sockets(self.manager, spec.name, limit_receive_buffer, int(addr["port"]), size)
            for command in self._step(mid, p.ShadowReady()).commands:
                if isinstance(command, p.GuardShadow):
                    self.spawn(f"incoming-{mid}", functools.partial(self._guard, mid, source))
            return IncomingAnswer(protocol=PROTOCOL, uri=f"tcp:{addr['host']}:{addr['port']}", stream=settings)
        except BaseException as exc:
            log.warning("preparing the shadow VM %s for migration %s failed: %s", spec.name, mid, exc)
            await self._run(mid, self._step(mid, p.PrepareBroke(str(exc))))
            raise

    # ---- who may ----------------------------------------------------------------------------------------
    def authorize(self, mid: str, host: str | None, what: str) -> None:
        """Only the host that prepared incoming migration `mid` may `what` it. `host` is the calling
        host; None on an --insecure listener, which knows no identities and checks nobody."""
        if host is None:
            return
        source = self.incoming_sources.get(mid)
        if source == host:
            return
        if source is None:
            try:
                self.incoming_vm(mid)
            except NotFound:
                return  # nothing here for it: answered as for any unknown migration
            raise Forbidden(f"host {host} may not {what} migration {mid}: {self.host} does not know which host started it")
        raise Forbidden(f"host {host} may not {what} migration {mid}: only its source, {source}, may")

    def incoming_vm(self, mid: str) -> str:
        for status in self.manager.list():
            rec = self.manager.store.get(status.name)
            if rec.incoming_migration == mid or rec.committed_migration == mid:
                return status.name
        raise NotFound(f"no incoming migration {mid} on {self.host} (its shadow VM is gone)")

    def _committed_here(self, name: str, mid: str) -> bool:
        return self.manager.store.get(name).committed_migration == mid

    # ---- commit ------------------------------------------------------------------------------------------
    async def commit(self, mid: str) -> float:
        """Resume the shadow as this host's VM; the RESUME event's time."""
        name = self.incoming_vm(mid)
        if self._committed_here(name, mid):
            self.shadows[mid] = p.ShadowState(p.ShadowPhase.RUNNING)  # also after a restart
        step = self._step(mid, p.CommitAsked())
        qmp = self.manager.qmp(name)
        async with qmp.listen("MIGRATION", "RESUME") as events:
            while True:
                next_event: p.ShadowEvent | None = None
                for command in step.commands:
                    if isinstance(command, p.AnswerCommitted):
                        return self.manager.store.get(name).resumed_at or time.time()
                    if isinstance(command, p.Refuse):
                        if command.reason != "given up":
                            raise MigrationError(command.reason)
                        raise MigrationError(f"the shadow VM {name} on {self.host} is being destroyed: "
                                             f"migration {mid} was given up")
                    if isinstance(command, p.WaitLoaded):
                        try:
                            await self._wait_loaded(qmp, name, events)
                            next_event = p.StreamLoaded()
                        except MigrationError as exc:
                            next_event = p.StreamNotLoaded(str(exc))
                    if isinstance(command, p.TakeVm):
                        resumed = await self._take(qmp, name, mid, events)
                        return resumed
                if next_event is None:
                    raise MigrationError(f"migration {mid} cannot be committed on {self.host} now")
                step = self._step(mid, next_event)

    async def _take(self, qmp: Any, name: str, mid: str, events: Any) -> float:
        # The VM is ours from here on: persist that before it runs, so a crash cannot forget it.
        self.manager.commit_incoming(name, mid)
        await qmp.execute_within(QMP_TIMEOUT, "cont")
        resumed = await events.wait_for("RESUME", timeout=RESUME_TIMEOUT)
        self.manager.set_resumed(name, resumed.timestamp)
        self.ended["committed"] += 1
        try:
            # More announce rounds than QEMU's automatic ones at incoming completion (which ran
            # while the VM was still paused): switches re-learn the MAC now that it runs here.
            await qmp.execute_within(QMP_TIMEOUT, "announce-self", initial=20, max=200, rounds=5, step=50)
        except VmFailed as exc:
            log.warning("announce-self for %s: %s", name, exc)
        return float(resumed.timestamp)

    async def _wait_loaded(self, qmp: Any, name: str, events: Any) -> None:
        """Wait until the shadow has loaded the whole stream. The source's QEMU says "completed"
        once it has sent the last byte; the destination may still be loading it (status
        "active"), so asking once races with it."""
        deadline = time.monotonic() + INCOMING_SETTLE
        status = (await qmp.execute_within(INCOMING_SETTLE, "query-migrate")).get("status")
        while status not in ("completed", "failed", "cancelled"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ev = await events.wait_for("MIGRATION", timeout=left)
            except TimeoutError:
                break
            status = ev.data.get("status")
        if status in ("failed", "cancelled"):
            raise MigrationError(f"the shadow VM {name} on {self.host} could not load the migration stream (incoming {status})")
        if status != "completed":
            raise MigrationError(f"the shadow VM {name} on {self.host} has not received the whole VM "
                                 f"(incoming still {status} {INCOMING_SETTLE:.0f} s after the source finished)")

    # ---- abort and the shadow's end ------------------------------------------------------------------
    async def abort(self, mid: str) -> None:
        try:
            name = self.incoming_vm(mid)
        except NotFound:
            self.shadows.pop(mid, None)
            self.incoming_sources.forget(mid)
            return
        if self._committed_here(name, mid):
            self.shadows[mid] = p.ShadowState(p.ShadowPhase.RUNNING)
        # An unknown shadow (this agent restarted) is one to destroy. No await before the step:
        # from here a commit of this migration is refused.
        step = self._step(mid, p.AbortAsked(), default=p.ShadowPhase.WAITING)
        for command in step.commands:
            if isinstance(command, p.Refuse):
                raise Conflict(f"migration {mid} is already committed on {self.host}: the VM runs here")
        await self._run(mid, step, name)

    async def _run(self, mid: str, step: p.ShadowStep, name: str | None = None) -> None:
        """Execute a step's Destroy (the other commands are answered where they arise)."""
        if not any(isinstance(c, p.Destroy) for c in step.commands):
            return
        try:
            name = name or self.incoming_vm(mid)
        except NotFound:
            name = None
        if name is not None:
            try:
                await self.manager.stop(name, force=True)
            except (Conflict, NotFound):
                pass  # not running; or gone: the manager forgets a shadow as soon as its QEMU has exited
            try:
                await self.manager.delete(name)
            except NotFound:
                pass  # the manager forgets a shadow by itself once its QEMU has exited
        self.shadows.pop(mid, None)
        self.incoming_sources.forget(mid)
        self.ended["destroyed"] += 1

    async def _guard(self, mid: str, source: str) -> None:
        """Destroy an uncommitted shadow whose source gave up without telling us (a cut link loses
        the source's DELETE): ask the source about the migration until the shadow is committed or gone."""
        try:
            client = peer_client(source)
        except KvmotionError as exc:
            log.warning("incoming migration %s: cannot watch source %s: %s", mid, source, exc)
            return
        silent_since: float | None = None
        try:
            while True:
                await asyncio.sleep(GUARD_INTERVAL)
                if mid not in self.shadows or not self.shadows[mid].phase.active:
                    return  # committed, or destroyed already
                try:
                    phase = Phase((await client.request("GET", f"/v1/migrations/{mid}", timeout=PEER_TIMEOUT))["phase"])
                except NotFound:
                    why = f"{source} has no such migration (its agent restarted)"
                except Unreachable:
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since < ORPHAN_TIMEOUT:
                        continue
                    why = f"{source} has not answered for {ORPHAN_TIMEOUT:.0f} s"
                except (KvmotionError, KeyError, TypeError, ValueError):
                    continue
                else:
                    silent_since = None
                    if phase not in (Phase.FAILED, Phase.CANCELLED):
                        continue
                    why = f"{source} reports it {phase.value}"
                step = self._step(mid, p.SourceGaveUp(why))
                if step.commands:
                    log.warning("incoming migration %s: %s: destroying its uncommitted shadow VM", mid, why)
                    await self._run(mid, step)
                return
        finally:
            await client.aclose()

    # ---- after a restart --------------------------------------------------------------------------------
    def recover(self) -> None:
        """The uncommitted shadows are gone (VmManager.recover) or stale (still receiving): keep the
        sources of the VMs committed here, which may still be asked for a retried commit, and of the
        stale shadows, whose source is asked to cancel before they are destroyed."""
        self.incoming_sources.keep_only({m for r in self.manager.store.all()
                                         for m in (r.incoming_migration, r.committed_migration) if m})
        for name, mid in self.manager.stale_shadows:
            step = self._step(mid, p.AgentRestarted(), default=p.ShadowPhase.WAITING)
            if any(isinstance(c, p.AskSourceCancel) for c in step.commands):
                self.spawn(f"stale-{mid}", functools.partial(self._end_stale, name, mid))
        self.manager.stale_shadows.clear()

    async def _end_stale(self, name: str, mid: str) -> None:
        """Ask a stale shadow's source to cancel (it then breaks its stream off in an order its QEMU
        survives, and aborts the shadow here), wait for that (STALE_SHADOW_WAIT), then destroy the
        shadow if it is still there."""
        source = self.incoming_sources.get(mid)
        deadline = time.monotonic() + STALE_SHADOW_WAIT
        if source is not None:
            try:
                client = peer_client(source)
                try:
                    await client.request("POST", f"/v1/migrations/{mid}/cancel", timeout=PEER_TIMEOUT)
                    while time.monotonic() < deadline and self._has_shadow(name, mid):
                        rec = await client.request("GET", f"/v1/migrations/{mid}", timeout=PEER_TIMEOUT)
                        if Phase(rec["phase"]).terminal:
                            break
                        await asyncio.sleep(STALE_POLL)
                finally:
                    await client.aclose()
            except KvmotionError as exc:  # gone, too late, unreachable: the shadow goes anyway
                log.warning("migration %s: asking %s to cancel before destroying the stale shadow of %s: %s",
                            mid, source, name, exc)
        step = self._step(mid, p.SourceEnded())
        if step.commands and self._has_shadow(name, mid):
            log.warning("migration %s: destroying the shadow of VM %s left by this agent's restart", mid, name)
        await self._run(mid, step, name if self._has_shadow(name, mid) else None)

    def _has_shadow(self, name: str, mid: str) -> bool:
        try:
            return self.manager.store.get(name).incoming_migration == mid
        except NotFound:
            return False
