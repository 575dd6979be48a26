"""The source agent's side of a migration: pre-copy under the convergence policy, switchover, and
the commit protocol of migration/protocol.py, whose commands this runner executes.

Every wait is bounded: a QEMU wedged holding its big lock, a frozen destination or a cut link end
in a rollback (or, once a commit may have happened, in a held VM) instead of a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from kvmotion.api.agent import AsyncAgentClient, VmState
from kvmotion.api.migration import (
    PROTOCOL,
    CommitAnswer,
    Compression,
    IncomingAnswer,
    IncomingRequest,
    MigrationRecord,
    Phase,
    Progress,
    StreamSettings,
    Summary,
)
from kvmotion.api.tls import agent_client
from kvmotion.core.errors import Conflict, KvmotionError, MigrationError, NotFound, Unreachable
from kvmotion.core.jsonio import as_json
from kvmotion.host.throttle import VcpuThrottle
from kvmotion.host.vms import VmManager
from kvmotion.migration import policy as pol
from kvmotion.migration import protocol as p
from kvmotion.migration import stream as st
from kvmotion.migration.hooks import SwitchoverContext, SwitchoverHook, default_hooks
from kvmotion.migration.records import Records
from kvmotion.migration.stats import RoundTracker
from kvmotion.net.netns import egress_link
from kvmotion.qemu.cancel import cancel_migration
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus
from kvmotion.qemu.sockets import established, limit_unsent, shutdown_to, stream_fds

log = logging.getLogger("kvmotion.migration")

TICK = 0.1  # s between query-migrate polls: QEMU's own bandwidth window is 100 ms
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU has no "unlimited", libvirt uses a huge value too
PREPARE_TIMEOUT = 90.0  # s the destination may take to start its shadow VM
COMMIT_RETRY = 20.0  # s the source keeps asking an unreachable destination agent to commit
COMMIT_TIMEOUT = 20.0  # s one commit may take: loading the stream's end (destination's INCOMING_SETTLE) plus resume
STALL_TIMEOUT = 10.0  # s without a byte reaching the destination before the stream counts as stalled
CLEANUP_TIMEOUT = 10.0  # s for the destination to destroy its shadow
ROLLBACK_STEP_TIMEOUT = 15.0  # s one QMP command on the source may take during a rollback
HOOK_TIMEOUT = 2 * ROLLBACK_STEP_TIMEOUT  # s one hook's take-back may take
CANCEL_WAIT = 10.0  # s the source's QEMU may take to end a cancelled stream before it resumes anyway
FINISH_TIMEOUT = 10.0  # s the source's copy may take to stop after the commit
RESOLVE_INTERVAL = 2.0  # s between tries to settle a commit whose outcome is unknown
RESOLVE_FOR = 3600.0  # s the source keeps trying before leaving it to the operator
SHADOW_SETTLE = 1.0  # s to let the destination agent notice its shadow's QEMU died (it polls every 0.2 s)
SHADOW_QUERY_TIMEOUT = 3.0  # s for one question about the shadow's state
COMPLETION_POLL = 0.05  # s between the switchover's queries (stall watch); completion itself comes as an event
QMP_TIMEOUT = 30.0  # s any other QMP command may take: a QEMU silent that long is stuck


class Cancelled(MigrationError):
    """The user cancelled the migration."""


class _StallWatch:
    """A cut link or a frozen destination leaves QEMU waiting on TCP for many minutes: notice when
    the bytes it has sent stop growing for STALL_TIMEOUT."""

    def __init__(self) -> None:
        self.moved = -1
        self.since = time.monotonic()

    def stalled(self, sample: MigrationSample) -> bool:
        moved = sample.ram.transferred if sample.ram is not None else 0
        if moved > self.moved:
            self.moved, self.since = moved, time.monotonic()
            return False
        return time.monotonic() - self.since > STALL_TIMEOUT


def _never_connected(exc: Unreachable) -> bool:
    """True when the request cannot have reached the agent (no connection was made)."""
    return isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))


@dataclass
class _Run:
    """What one migration's runner has found out and set up so far (mutable: the runner's own)."""

    mid: str
    vm: str
    destination: str
    dest: AsyncAgentClient
    ctx: SwitchoverContext
    hooks: list[SwitchoverHook]
    state: p.SourceState = field(default_factory=p.SourceState)
    done_hooks: list[SwitchoverHook] = field(default_factory=list)
    throttle: VcpuThrottle | None = None
    tracker: RoundTracker = field(default_factory=RoundTracker)
    stop_at: float | None = None
    final: MigrationSample | None = None
    postcopy: bool = False
    compression: Compression = Compression.NONE
    resumed_at: float | None = None
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    commit_failure: str = ""  # the commit's error, for the record of a held VM


class SourceSide:
    """The migrations this host drives. `spawn` runs a background coroutine in the service's task group."""

    def __init__(self, manager: VmManager, records: Records, spawn: Callable[[str, Callable[[], Awaitable[None]]], None]) -> None:
        self.manager = manager
        self.host = manager.config.name
        self.records = records
        self.spawn = spawn
        self.cancels: dict[str, asyncio.Event] = {}
        self.cancelled_by: dict[str, str] = {}
        self.healthy_cancels: set[str] = set()  # cancelled by a user, the stream still sound

    # ---- the migration ------------------------------------------------------------------------------
    async def run(self, mid: str, dest: AsyncAgentClient) -> None:
        """Migrate, then commit or roll back (the protocol decides). Cancellation is re-raised after
        the protocol's response to it has run."""
        rec = self.records[mid]
        spec = self.manager.status(rec.vm).spec
        qmp = self.manager.qmp(rec.vm)
        ctx = SwitchoverContext(spec=spec, source=self.host, destination=rec.destination, migration_id=mid,
                                source_qmp=qmp, proto_nodes=self.manager.proto_nodes(rec.vm))
        run = _Run(mid=mid, vm=rec.vm, destination=rec.destination, dest=dest, ctx=ctx, hooks=default_hooks(spec),
                   state=p.source_start().state)
        self.manager.set_state(rec.vm, VmState.MIGRATING)
        try:
            await self._forward(run)
        except asyncio.CancelledError:
            await self._feed(run, p.Shutdown())
            raise
        except Cancelled as exc:
            await self._feed(run, p.CancelAsked(str(exc)))
        except KvmotionError as exc:
            await self._feed(run, p.Failed(str(exc)))
        except Exception as exc:  # a bug must still roll back; it is logged in full
            log.exception("migration %s failed", mid, exc_info=exc)
            await self._feed(run, p.Failed(f"{type(exc).__name__}: {exc}"))
        finally:
            await dest.aclose()

    async def _forward(self, run: _Run) -> None:
        """Prepare, pre-copy, switchover: each outcome goes to the protocol (which then commits)."""
        mid, rec = run.mid, self.records[run.mid]
        qmp = run.ctx.source_qmp
        ask = functools.partial(qmp.execute_within, QMP_TIMEOUT)
        spec = run.ctx.spec
        self.records.enter(mid, Phase.PREPARE)
        run.compression = pol.stream_compression(await self._egress_rate(run.dest), rec.options.allow_postcopy)
        offer = st.offer(run.compression)
        request = IncomingRequest(protocol=PROTOCOL, migration_id=mid, source=self.host, spec=spec,
                                  postcopy=rec.options.allow_postcopy, offer=offer)
        try:
            answer = IncomingAnswer.model_validate(await run.dest.request(
                "POST", "/v1/incoming", body=request, timeout=PREPARE_TIMEOUT))
        except KvmotionError as exc:  # the destination's own words, said about its shadow
            raise MigrationError(f"preparing the shadow VM on {rec.destination} failed: {exc}") from exc
        except ValueError as exc:
            raise MigrationError(f"the agent on {rec.destination} answered the prepare with a bad message: {exc}") from exc
        await self._feed(run, p.ShadowPrepared())
        if not answer.stream.within(offer):
            raise MigrationError(f"the agent on {rec.destination} chose a stream it was not offered: {answer.stream}")
        settings = answer.stream
        run.compression = settings.compression
        # On disk from here on: an agent restarted later must know what it was driving (recover).
        self.records.persist_live(mid)
        uri = answer.uri
        for hook in run.hooks:
            await hook.before_precopy(run.ctx)
        self._check_cancel(mid)
        config = dataclasses.replace(pol.preset(rec.options.policy), max_downtime_ms=rec.options.max_downtime_ms,
                                     allow_postcopy=rec.options.allow_postcopy)
        state = pol.start(config, spec.memory).state
        # Pause before switchover only when a hook has something to hand over (disk leases):
        # otherwise the round trip (event, query, migrate-continue) only lengthens the guest's pause.
        pause = bool(run.hooks)
        postcopy_allowed = rec.options.allow_postcopy
        await ask("migrate-set-capabilities", capabilities=st.capabilities(postcopy_allowed, settings, pause))
        params: dict[str, Any] = {"max-bandwidth": rec.options.bandwidth or UNLIMITED_BANDWIDTH,
                                  "downtime-limit": state.downtime_ms, **st.multifd_params(settings),
                                  # QEMU's own estimate (0) unless set below: a rolled-back attempt may have set it
                                  "avail-switchover-bandwidth": 0}
        if rec.encrypted:
            params.update(await asyncio.wait_for(st.add_stream_tls(qmp, self.host, "client", rec.destination,
                                                                   self.manager.confinement.user), QMP_TIMEOUT))
        else:
            params.update({"tls-creds": ""})
        await ask("migrate-set-parameters", **params)

        async with qmp.listen("STOP", "MIGRATION") as events:
            seen: dict[str, float] = {}  # QMP event timestamps: "stop"
            self.records.enter(mid, Phase.PRECOPY)
            t0 = time.monotonic()
            await ask("migrate", uri=uri)
            stall = _StallWatch()
            sockets: list[int] = []  # the source QEMU's stream sockets, checked at switchover
            compressed = settings.compression is not Compression.NONE
            unsent_limited = compressed and await self._limit_unsent_at_once(run.vm, uri, settings)
            while True:
                self._check_cancel(mid)
                now = time.monotonic() - t0
                sample = MigrationSample.from_qmp(await ask("query-migrate"), at=now)
                frac = run.throttle.fraction if run.throttle else 0.0
                run.tracker, closed = run.tracker.observe(sample, frac)
                if closed is not None and compressed:
                    # QEMU's switchover test divides pending page bytes by its wire rate, which
                    # compression makes several times too slow: it would wait rounds it needs not.
                    await ask("migrate-set-parameters", **{"avail-switchover-bandwidth": int(closed.page_rate)})
                self._progress(mid, sample, run.tracker, state, frac, now)
                if sample.status is MigrationStatus.PRE_SWITCHOVER or (sample.status is MigrationStatus.DEVICE and not pause):
                    break
                if sample.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                    raise await self._stream_error(run, sample, "")
                if sample.status is MigrationStatus.COMPLETED:
                    run.final = sample
                    break
                if pause and len(sockets) < st.stream_connections(postcopy_allowed, settings):
                    sockets = await st.on_stream_sockets(self.manager, run.vm, uri, stream_fds) or []
                if not unsent_limited and sample.ram is not None and 0 < sample.ram.remaining <= st.NEAR_SWITCHOVER:
                    unsent_limited = await self._limit_unsent(run.vm, uri)
                if stall.stalled(sample):
                    raise await self._stalled(run, "")
                decision = pol.tick(config, state, pol.Observation(now, sample, run.tracker.latest_round))
                state = decision.state
                for action in decision.actions:
                    if isinstance(action, pol.SetDowntimeLimit):
                        await ask("migrate-set-parameters", **{"downtime-limit": action.ms})
                    elif isinstance(action, pol.SetThrottle):
                        run.throttle = await self._throttle(run.throttle, run.vm, action.fraction)
                    elif isinstance(action, pol.StartPostcopy):
                        await ask("migrate-start-postcopy")
                        run.postcopy = True
                    elif isinstance(action, pol.Abort):
                        raise MigrationError(f"convergence policy gave up: {action.reason}")
                # Wake at once when QEMU pauses before switchover: every ms here is guest downtime.
                await self._await_migration_event(events, TICK, seen)

            # ---- switchover: source vCPUs are stopped and its disks flushed
            run.stop_at = self._drain_stop(events, seen)
            self.records.enter(mid, Phase.SWITCHOVER, at=run.stop_at)
            await self._feed(run, p.SwitchoverBegan())  # HandOver: the hooks
            if run.final is None:
                if pause:
                    await self._check_stream_whole(run, sockets)
                    await ask("migrate-continue", state="pre-switchover")
                run.final = await self._wait_completion(run, events, seen, t0, uri)
            if run.stop_at is None:
                run.stop_at = self._drain_stop(events, seen)
            if run.final.status is not MigrationStatus.COMPLETED:
                raise await self._stream_error(run, run.final, " at switchover")
        self.records.enter(mid, Phase.COMMIT)
        await self._feed(run, p.StreamCompleted())

    # ---- the protocol's commands ----------------------------------------------------------------------
    async def _feed(self, run: _Run, event: p.SourceEvent) -> None:
        """Step the protocol on `event` and execute its commands; a command's answer is the next event."""
        pending: p.SourceEvent | None = event
        while pending is not None:
            before = run.state.phase
            step = p.source_step(run.state, pending)
            run.state = step.state
            if not before.terminal and before is not p.SourcePhase.HELD and step.state.phase in (
                    p.SourcePhase.ROLLED_BACK, p.SourcePhase.HELD, p.SourcePhase.LEFT):
                self.records.enter(run.mid, Phase.ROLLBACK)
            pending = None
            for command in step.commands:
                answer = await self._execute(run, command)
                if answer is not None:
                    pending = answer  # only the last command of a step answers (Commit, DestroyShadow, AskCommitted)

    async def _execute(self, run: _Run, command: p.SourceCommand) -> p.SourceEvent | None:
        if isinstance(command, p.StartStream):
            return None  # the forward path goes on
        if isinstance(command, p.HandOver):
            for hook in run.hooks:
                # Taken back even if it fails: a hand-over that timed out may still happen (a stalled
                # datastore acting on the request late); taking back is idempotent.
                run.done_hooks.append(hook)
                await hook.before_switchover(run.ctx)
            return None
        if isinstance(command, p.Commit):
            return await self._commit(run)
        if isinstance(command, p.AskCommitted):
            try:
                answer = CommitAnswer.model_validate(await run.dest.request(
                    "POST", f"/v1/incoming/{run.mid}/commit", timeout=COMMIT_TIMEOUT))
            except (KvmotionError, ValueError):
                run.resumed_at = time.time()  # committed, the resume time unknown: now is close
                return p.CommitFailed("no answer", delivered=True)
            run.resumed_at = answer.resumed_at
            return p.CommitAnswered()
        if isinstance(command, p.DestroyShadow):
            return await self._destroy_shadow(run)
        if isinstance(command, p.TakeBack):
            await self._take_back(run)
            return None
        if isinstance(command, p.ResumeHere):
            await self._resume_here(run)
            return None
        if isinstance(command, p.FinishHere):
            await self._finish_here(run)
            return None
        if isinstance(command, p.HoldPaused):
            await self._hold_paused(run, command.reason)
            return None
        if isinstance(command, p.Resolve):
            self.spawn(f"resolve-{run.mid}", lambda: self._resolve(run))
            return None
        if isinstance(command, p.EndRecord):
            self._end_record(run, command)
            return None
        if isinstance(command, p.Note):
            self._note(run, command)
            return None
        raise AssertionError(f"unknown command {command!r}")

    async def _commit(self, run: _Run) -> p.SourceEvent:
        """Ask the destination to commit, again while it cannot be reached (COMMIT_RETRY)."""
        deadline = time.monotonic() + COMMIT_RETRY
        delivered = False  # may a commit request have reached the destination's agent?
        while True:
            try:
                left = deadline - time.monotonic()
                body = await run.dest.request("POST", f"/v1/incoming/{run.mid}/commit",
                                              timeout=max(2.0, min(COMMIT_TIMEOUT, left)))
                run.resumed_at = CommitAnswer.model_validate(body).resumed_at
                return p.CommitAnswered()
            except Unreachable as exc:
                delivered = delivered or not _never_connected(exc)
                if time.monotonic() > deadline:
                    failure: Exception = exc
                    break
                await asyncio.sleep(0.5)
            except (KvmotionError, ValueError) as exc:  # answered: the request reached it
                failure, delivered = exc, True
                break
        run.commit_failure = str(failure)
        return p.CommitFailed(f"could not commit on {run.destination}: {failure}", delivered=delivered)

    async def _destroy_shadow(self, run: _Run) -> p.SourceEvent | None:
        try:
            await run.dest.request("DELETE", f"/v1/incoming/{run.mid}", timeout=CLEANUP_TIMEOUT)
        except KvmotionError as exc:
            if run.state.phase is p.SourcePhase.ROLLED_BACK:  # the rollback's clean-up: a note if it fails
                run.notes.append(f"destination cleanup: {exc}; the agent on {run.destination} destroys the uncommitted "
                                 f"shadow once it learns the migration failed, or when it restarts")
                return None
            if isinstance(exc, Conflict):
                if run.state.phase is p.SourcePhase.SETTLE:
                    log.warning("migration %s: the commit's answer was lost but %s committed: the VM runs there",
                                run.mid, run.destination)
                return p.ShadowCommitted()
            return p.DestroyUnanswered(
                f"the commit got no answer ({run.commit_failure}), nor did destroying the shadow ({exc}); VM {run.vm} stays paused "
                f"on {self.host} so that it never runs twice: it resumes here once {run.destination} confirms the "
                f"shadow is destroyed, or is removed here if {run.destination} runs it")
        return p.ShadowDestroyed()

    async def _take_back(self, run: _Run) -> None:
        """Leases first: the source must hold its disks again before its vCPUs run."""
        for hook in reversed(run.done_hooks):
            try:
                await asyncio.wait_for(hook.on_rollback(run.ctx), HOOK_TIMEOUT)
            except KvmotionError as e:
                run.notes.append(f"{hook.name} rollback: {e}")
            except TimeoutError:
                run.notes.append(f"{hook.name} rollback: not done within {HOOK_TIMEOUT:.0f} s")
        run.done_hooks.clear()

    async def _resume_here(self, run: _Run) -> None:
        """Every step bounded: a source QEMU wedged holding its big lock must not hang the agent; the
        record then says the VM could not be resumed."""
        ask = functools.partial(run.ctx.source_qmp.execute_within, ROLLBACK_STEP_TIMEOUT)
        try:
            status = MigrationSample.from_qmp(await ask("query-migrate")).status
            if not status.is_terminal and status is not MigrationStatus.NONE:
                # A stalled stream is broken off in the order QEMU 10.0 survives (qemu/cancel.py).
                await cancel_migration(ask, self.manager.status(run.vm).pid, CANCEL_WAIT,
                                       moving=run.mid in self.healthy_cancels)
            if (await ask("query-status"))["status"] != "running":
                await ask("cont")
            run.resumed = True
        except KvmotionError as e:
            run.notes.append(f"resuming the source: {e}")
        finally:
            self.manager.set_state(run.vm, VmState.RUNNING if run.resumed else VmState.PAUSED)
        await self._release_throttle(run)

    async def _release_throttle(self, run: _Run) -> None:
        if run.throttle is not None:
            throttle, run.throttle = run.throttle, None
            await asyncio.to_thread(throttle.release)

    async def _finish_here(self, run: _Run) -> None:
        """The VM runs on the destination: read the stream's last figures, then destroy the copy here."""
        if run.final is not None:  # not yet observed: the stream's last figures, read now that the VM runs there
            frac = run.throttle.fraction if run.throttle else 0.0
            run.tracker, _ = run.tracker.observe(await self._final_statistics(run.ctx.source_qmp, run.final), frac)
        await self._release_throttle(run)
        try:
            await self.manager.stop(run.vm, force=False, timeout=FINISH_TIMEOUT)
        except KvmotionError as exc:
            log.warning("stopping the source copy of %s after commit: %s", run.vm, exc)
        try:
            await self.manager.delete(run.vm)
        except KvmotionError as exc:  # the VM runs on the destination all the same: the record says done
            log.error("deleting the source copy of %s after commit: %s", run.vm, exc)
        for hook in run.done_hooks:
            await hook.after_commit(run.ctx)

    async def _hold_paused(self, run: _Run, reason: str | None) -> None:
        """The destination may run the VM: resuming here could make two copies. Keep the source
        paused (its disks' leases stay where they are) until the destination answers."""
        self.manager.set_state(run.vm, VmState.PAUSED)
        await self._release_throttle(run)
        if reason is not None:
            log.error("migration %s: %s", run.mid, reason)
            self.records.end(run.mid, Phase.FAILED, error=reason)

    def _end_record(self, run: _Run, end: p.EndRecord) -> None:
        if end.outcome is None:
            self._end_done(run)
            return
        where = f"VM {run.vm} keeps running on {self.host}" if run.resumed else f"VM {run.vm} could not be resumed on {self.host}"
        error = f"{end.reason}; {where}" + (f" ({'; '.join(run.notes)})" if run.notes else "")
        self.records.end(run.mid, Phase.CANCELLED if end.outcome is p.Outcome.CANCELLED else Phase.FAILED, error=error)

    def _end_done(self, run: _Run) -> None:
        stats = run.tracker.summary()
        rec = self.records[run.mid]
        summary = Summary(
            total_ms=stats.total_time * 1000,
            downtime_ms=stats.downtime * 1000 if stats.downtime is not None else None,
            pause_ms=(run.resumed_at - run.stop_at) * 1000 if run.stop_at and run.resumed_at else None,
            setup_ms=stats.setup_time * 1000,
            rounds=stats.rounds,
            bytes=stats.bytes_transferred,
            zero_pages=stats.zero_pages,
            normal_pages=stats.normal_pages,
            mean_link_rate=stats.mean_link_rate,
            peak_dirty_rate=stats.peak_dirty_rate,
            throttle_max=stats.throttle_max,
            encrypted=rec.encrypted,
            converged=not run.postcopy,
            postcopy=run.postcopy,
            compression=run.compression.value,
        )
        self.records.end(run.mid, Phase.DONE, summary=summary, rounds=tuple(as_json(r) for r in stats.round_log))

    def _note(self, run: _Run, note: p.Note) -> None:
        if note.text == "committed":
            outcome = f"settled: {run.destination} had committed, the VM runs there; the paused copy here is gone"
        elif run.resumed:
            outcome = f"settled: {run.destination} destroyed the shadow, the VM resumed on {self.host}"
        else:
            outcome = (f"settled: {run.destination} destroyed the shadow, but the VM could not be resumed on {self.host}"
                       f" ({'; '.join(run.notes)})")
        log.warning("migration %s: %s", run.mid, outcome)
        rec = self.records.update(run.mid, error=f"{self.records[run.mid].error} — {outcome}")
        self.records.persist(rec)

    async def _resolve(self, run: _Run) -> None:
        """Ask the destination to destroy the shadow until it answers either way (RESOLVE_FOR)."""
        client = agent_client(str(run.dest.url))
        held = dataclasses.replace(run, dest=client)
        try:
            deadline = time.monotonic() + RESOLVE_FOR
            while time.monotonic() < deadline and held.state.phase is p.SourcePhase.HELD:
                await asyncio.sleep(RESOLVE_INTERVAL)
                answer = await self._destroy_shadow(held)
                if answer is not None:
                    await self._feed(held, answer)
            if held.state.phase is p.SourcePhase.HELD:
                await self._feed(held, p.ResolveGaveUp())
                log.error("migration %s: %s never answered: VM %s stays paused on %s for the operator", run.mid,
                          run.destination, run.vm, self.host)
        except KvmotionError as exc:
            log.error("migration %s: settling the commit failed: %s", run.mid, exc)
        finally:
            await client.aclose()

    # ---- cancel -----------------------------------------------------------------------------------------
    def cancel(self, mid: str, by: str, stream_healthy: bool = True) -> MigrationRecord:
        """`stream_healthy`: false when the destination gave up (its end of the stream is failing)."""
        rec = self.records.get(mid)
        if not rec.phase.cancellable or mid not in self.cancels:
            raise Conflict(f"migration {mid} is in phase {rec.phase.value}: too late to cancel")
        if stream_healthy and mid not in self.cancelled_by:
            self.healthy_cancels.add(mid)
        self.cancelled_by.setdefault(mid, by)
        self.cancels[mid].set()
        return rec

    def forget(self, mid: str) -> None:
        """A migration ended (or never started): its cancel state goes; a later cancel is too late."""
        self.cancels.pop(mid, None)
        self.cancelled_by.pop(mid, None)
        self.healthy_cancels.discard(mid)

    def _check_cancel(self, mid: str) -> None:
        if self.cancels[mid].is_set():
            raise Cancelled(f"cancelled by {self.cancelled_by.get(mid, 'the user')}")

    # ---- restart recovery -------------------------------------------------------------------------------
    async def recover(self, rec: MigrationRecord, dest_url: Callable[[str], str]) -> None:
        """Settle an outgoing migration found in the history after this agent restarted
        (protocol.source_recover decides; VmManager.recover has cancelled unfinished streams)."""
        vm = rec.vm
        state: VmState | None = None
        try:
            state = self.manager.status(vm).state
            stream = (await self.manager.qmp(vm).execute_within(ROLLBACK_STEP_TIMEOUT, "query-migrate")).get("status")
        except NotFound:
            state, stream = None, None
        except KvmotionError:  # no QEMU, or a QEMU that does not answer: nothing to settle with it
            stream = None
        found = p.Recovered(record_terminal=rec.phase.terminal, record_done=rec.phase is Phase.DONE,
                            stream_completed=stream == "completed", vm_migrating=state is VmState.MIGRATING)
        if found.stream_completed and found.vm_migrating and not found.record_done:
            try:
                url = dest_url(rec.destination)
            except KvmotionError as exc:
                log.error("migration %s: VM %s stays paused on %s for the operator: %s", rec.id, vm, self.host, exc)
                return
            reason = (f"the agent on {self.host} restarted after the stream had completed; VM {vm} stays paused "
                      f"on {self.host} until {rec.destination} says whether it runs the VM")
            log.warning("migration %s: VM %s completed its stream but was not destroyed: asking %s", rec.id, vm,
                        rec.destination)
        else:
            url = ""
            where = (f"VM {vm} keeps running on {self.host}" if state is VmState.RUNNING
                     else f"VM {vm} is {state.value if state else 'gone'} on {self.host}")
            reason = f"the agent on {self.host} restarted during the migration and gave it up; {where}"
        step = p.source_recover(found, reason)
        if not step.commands:
            return
        self.records.add(rec)
        spec = self.manager.status(vm).spec if found.vm_migrating else None
        if step.state.phase is p.SourcePhase.HELD and spec is not None:
            ctx = SwitchoverContext(spec=spec, source=self.host, destination=rec.destination, migration_id=rec.id,
                                    source_qmp=self.manager.qmp(vm), proto_nodes=self.manager.proto_nodes(vm))
            hooks = default_hooks(spec)
            run = _Run(mid=rec.id, vm=vm, destination=rec.destination, dest=agent_client(url), ctx=ctx, hooks=hooks,
                       state=step.state, done_hooks=list(hooks))
            try:
                for command in step.commands:
                    await self._execute(run, command)
            finally:
                await run.dest.aclose()
            return
        for command in step.commands:
            if isinstance(command, p.EndRecord):
                self.records.end(rec.id, Phase.FAILED, error=command.reason)

    # ---- helpers ----------------------------------------------------------------------------------------
    @staticmethod
    async def _final_statistics(qmp: Any, final: MigrationSample) -> MigrationSample:
        """The completed stream's figures (downtime, bytes), read after the commit when the completion
        came as an event; the source QEMU keeps them until it is destroyed."""
        if final.ram is not None:
            return final
        try:
            return MigrationSample.from_qmp(await qmp.execute_within(ROLLBACK_STEP_TIMEOUT, "query-migrate"), at=final.at)
        except KvmotionError as exc:
            log.warning("reading the completed migration's statistics: %s", exc)
            return final

    async def _stream_error(self, run: _Run, sample: MigrationSample, when: str) -> MigrationError:
        """QEMU only says the socket broke; the destination's agent knows whether its shadow died."""
        cause = await self._shadow_fate(run)
        return MigrationError(f"QEMU's migration stream to {run.destination} {sample.status.value}{when}: "
                              f"{sample.error or 'no detail'}" + (f" ({cause})" if cause else ""))

    async def _check_stream_whole(self, run: _Run, sockets: list[int]) -> None:
        """Raise if a connection of the paused stream was closed by the other end. QEMU 10.0 may
        find a dead multifd connection only while it saves the device state and then wedge there
        holding its big lock: the source could then neither resume nor be cancelled. Cancelled
        before the continue, it can."""
        if not sockets:
            return  # not found during pre-copy: QEMU's own error handling is all there is
        alive = await st.on_qemu_sockets(self.manager, run.vm, established, sockets)
        if alive is not None and alive < len(sockets):
            cause = await self._shadow_fate(run)
            raise MigrationError(f"the migration stream to {run.destination} broke at switchover: {len(sockets) - alive} "
                                 f"of its {len(sockets)} connections closed by the other end" + (f" ({cause})" if cause else ""))

    async def _shadow_fate(self, run: _Run) -> str:
        deadline = time.monotonic() + SHADOW_SETTLE
        while True:
            try:
                state = (await run.dest.request("GET", f"/v1/vms/{run.vm}", timeout=SHADOW_QUERY_TIMEOUT))["state"]
            except NotFound:
                return f"the shadow VM on {run.destination} is gone: its QEMU exited or its agent destroyed it"
            except Unreachable:
                return f"the agent on {run.destination} does not answer"
            except (KvmotionError, KeyError, TypeError):
                return ""
            # The agent notices a dead QEMU within its exit poll: give it that long before blaming the network.
            if state != VmState.INCOMING.value or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if state == VmState.INCOMING.value:
            return f"the shadow VM on {run.destination} is alive but its stream broke or stalled"
        if state in (VmState.CRASHED.value, VmState.STOPPED.value):
            return f"the shadow VM on {run.destination} is gone: its QEMU exited"
        return f"the shadow VM on {run.destination} is {state}"

    @staticmethod
    async def _await_migration_event(events: Any, timeout: float, seen: dict[str, float]) -> str | None:
        """Sleep up to `timeout`, waking early on a MIGRATION status change (returned); note STOP's timestamp."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = await events.get(left)
            except TimeoutError:
                return None
            if ev.name == "STOP":
                seen["stop"] = ev.timestamp
            elif ev.name == "MIGRATION" and ev.data.get("status") != "active":
                return str(ev.data.get("status"))
        return None

    @staticmethod
    def _drain_stop(events: Any, seen: dict[str, float]) -> float | None:
        """Timestamp of the source's STOP event, if it has arrived."""
        while True:
            try:
                ev = events.get_nowait()
            except asyncio.QueueEmpty:
                return seen.get("stop")
            if ev.name == "STOP":
                seen["stop"] = ev.timestamp

    async def _wait_completion(self, run: _Run, events: Any, seen: dict[str, float], t0: float, uri: str) -> MigrationSample:
        """The source QEMU's last sample of the stream. A completion is returned as soon as QEMU's
        event says so, as a sample with the status only (no query first): from here to the commit
        is the guest's pause. The statistics are read once the VM runs again."""
        qmp = run.ctx.source_qmp
        stall = _StallWatch()  # from now: the hooks' time before migrate-continue is not the stream's
        while True:
            try:
                # QEMU writes the stream's end holding its big lock: on a dead link the monitor
                # hangs with it, so the monitor's silence is a stall too.
                reply = await asyncio.wait_for(qmp.execute("query-migrate"), STALL_TIMEOUT)
            except TimeoutError:
                reply = None
            sample = MigrationSample.from_qmp(reply, at=time.monotonic() - t0) if reply is not None else None
            if sample is not None and sample.status.is_terminal:
                return sample
            if sample is None or stall.stalled(sample):
                # Break the stream as QEMU's yank would, so its writes fail now and the rollback's
                # migrate_cancel and cont get through, instead of after TCP's many-minute timeout.
                await st.on_stream_sockets(self.manager, run.vm, uri, shutdown_to)
                raise await self._stalled(run, " at switchover")
            # QEMU sets "completed" after it lets go of its big lock, which the query above may have
            # waited for: wait for the event then, not for a poll (the next query covers "failed").
            if await self._await_migration_event(events, COMPLETION_POLL, seen) == MigrationStatus.COMPLETED.value:
                return MigrationSample(status=MigrationStatus.COMPLETED, at=time.monotonic() - t0)

    async def _stalled(self, run: _Run, when: str) -> MigrationError:
        cause = await self._shadow_fate(run)
        return MigrationError(f"no data reached {run.destination} for {STALL_TIMEOUT:.0f} s{when}: the migration "
                              f"stream stalled" + (f" ({cause})" if cause else ""))

    def _progress(self, mid: str, sample: MigrationSample, tracker: RoundTracker, state: pol.PolicyState, frac: float,
                  now: float) -> None:
        ram = sample.ram
        last = tracker.latest_round
        self.records.update(mid, progress=Progress(
            round=sample.sync_count,
            transferred=ram.transferred if ram else 0,
            remaining=ram.remaining if ram else 0,
            total=ram.total if ram else 0,
            link_rate=ram.link_rate if ram else 0.0,
            dirty_rate=ram.dirty_rate if ram else 0.0,
            predicted_downtime_ms=(last.predicted_downtime * 1000) if last else float(sample.expected_downtime_ms or 0),
            downtime_limit_ms=state.downtime_ms,
            throttle=frac,
            elapsed=now,
        ))

    async def _throttle(self, current: VcpuThrottle | None, vm: str, fraction: float) -> VcpuThrottle | None:
        if current is None:
            if fraction <= 0:
                return None
            cpus = await self.manager.qmp(vm).execute_within(QMP_TIMEOUT, "query-cpus-fast")
            current = await asyncio.to_thread(VcpuThrottle, vm, [c["thread-id"] for c in cpus])
        await asyncio.to_thread(current.set_throttle, fraction)
        return current

    async def _limit_unsent_at_once(self, vm: str, uri: str, settings: StreamSettings) -> bool:
        """The unsent-data limit on every migration connection as soon as QEMU has opened them
        (SOCKETS_OPEN_WAIT). True once done (or impossible); False leaves it to the usual check."""
        deadline = time.monotonic() + st.SOCKETS_OPEN_WAIT
        while True:
            n = await st.on_stream_sockets(self.manager, vm, uri, limit_unsent, st.UNSENT_LIMIT)
            if n is None or n >= st.stream_connections(False, settings):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)

    async def _egress_rate(self, dest: AsyncAgentClient) -> int | None:
        """Bytes/s this host sends towards the destination agent's address (NIC speed, tbf shaping);
        None when it cannot tell (then nothing is compressed)."""
        host = urlsplit(str(dest.url)).hostname or ""
        try:
            return (await asyncio.to_thread(egress_link, host)).rate
        except (KvmotionError, OSError) as exc:
            log.warning("the link towards %s: %s", host, exc)
            return None

    async def _limit_unsent(self, vm: str, uri: str) -> bool:
        """Bound the source QEMU's unsent migration data (module docstring of qemu.sockets) if the
        sockets hold a backlog. True once done, or once it cannot be done (only a shorter pause is
        at stake); False to look again at the next tick."""
        n = await st.on_stream_sockets(self.manager, vm, uri, limit_unsent, st.UNSENT_LIMIT, st.BACKLOG_WORTH_LIMITING)
        return n is None or n > 0
