"""The migration engine. The source agent drives; the destination agent hosts the shadow VM.

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
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from kvmotion.api.agent import AsyncAgentClient, VmState
from kvmotion.api.config import load_config
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import Check, MigrationOptions, MigrationRecord, Phase, Progress, Summary, record_from_json
from kvmotion.api.spec import VmSpec
from kvmotion.api.tls import agent_client, qemu_creds_dir
from kvmotion.core.errors import Conflict, Forbidden, KvmotionError, MigrationError, NotFound, PrecheckFailed, Unreachable, VmFailed
from kvmotion.core.files import write_atomic
from kvmotion.core.jsonio import as_json
from kvmotion.host import resources
from kvmotion.host.throttle import VcpuThrottle
from kvmotion.host.vms import HOST_RESERVE, VmManager
from kvmotion.migration import policy as pol
from kvmotion.migration.checks import HostFacts, errors_of, run_checks
from kvmotion.migration.facts import cpu_models, datastores_reached, facts_from_json, facts_to_json
from kvmotion.migration.hooks import SwitchoverContext, default_hooks
from kvmotion.migration.stats import RoundTracker
from kvmotion.net.netns import egress_link
from kvmotion.qemu import confine
from kvmotion.qemu.cancel import cancel_migration
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus
from kvmotion.qemu.sockets import established, limit_receive_buffer, limit_unsent, shutdown_to, stream_fds

log = logging.getLogger("kvmotion.migration")
T = TypeVar("T")

TICK = 0.1  # s between query-migrate polls: QEMU's own bandwidth window is 100 ms
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU has no "unlimited", libvirt uses a huge value too
COMMIT_RETRY = 20.0  # s the source keeps asking an unreachable destination agent to commit
STALL_TIMEOUT = 10.0  # s without a byte reaching the destination before the stream counts as stalled
CLEANUP_TIMEOUT = 10.0  # s for the destination to destroy its shadow on rollback
ROLLBACK_STEP_TIMEOUT = 15.0  # s one QMP command on the source may take during a rollback
CANCEL_WAIT = 10.0  # s the source's QEMU may take to end a cancelled stream before it resumes anyway
ORPHAN_TIMEOUT = 30.0  # s a shadow waits for a source agent it cannot reach (> COMMIT_RETRY: the source gave up by then)
STALE_SHADOW_WAIT = 20.0  # s a restarted destination waits for the source to cancel before destroying a shadow
COMMIT_TIMEOUT = 20.0  # s one commit may take: loading the stream's end (INCOMING_SETTLE) plus resume
RESOLVE_INTERVAL = 2.0  # s between tries to settle a commit whose outcome is unknown
RESOLVE_FOR = 3600.0  # s the source keeps trying before leaving it to the operator
GUARD_INTERVAL = 1.0  # s between the destination's questions to the source about an uncommitted shadow
SHADOW_SETTLE = 1.0  # s to let the destination agent notice its shadow's QEMU died (it polls every 0.2 s)
INCOMING_SETTLE = 10.0  # s the destination may take to load the end of the stream the source has sent
COMPLETION_POLL = 0.05  # s between the switchover's queries (stall watch); completion itself comes as an event
TLS_ID = "kvmotion-tls"
AUTHZ_ID = "kvmotion-authz"  # the destination QEMU's tls-authz: only the source host's QEMU identity
# Of the source -> destination requests (/v1/incoming): a destination refuses versions it does not speak.
PROTOCOL_VERSION = 1
# Pages go over this many parallel connections (QEMU multifd; zero pages are then found in those
# threads too). Measured on the lab (TCG, 2 cores, 512 MiB idle guest): unshaped veth 124-138 ms
# against 186-359 ms on one connection; 1 Gbit/s unchanged (615-629 against 620-643 ms). Three
# rather than two once the destination's receive buffers are small (RECEIVE_BUFFER): 1 GiB idle
# over unshaped veth, migrate -> running 268-276 ms against 286-303 ms with two. Both sides must
# use the same count. QEMU 10.0 refuses multifd together with postcopy-ram.
MULTIFD_CHANNELS = 3
# Receive buffer of the shadow's migration sockets (SO_RCVBUF on its listening socket, which the
# accepted connections inherit; the kernel doubles it). Autotuned, each grows to megabytes, and
# what they hold when the source stops is loaded by the destination after the source has
# finished: 23-85 ms of pause on an unshaped link (QEMU trace: the destination's multifd threads
# reached the final sync 66-80 ms after the source's). Measured (TCG, unshaped veth): idle 1 GiB,
# pause 40-55 ms autotuned, 6-19 ms with 256 KiB, 14-61 ms with 1 MiB; but with 256 KiB a guest
# writing 100 MB/s lost so much throughput that the policy throttled it (migrate -> running
# 1155-1455 ms against 938-1055 autotuned; 931-1004 ms with 1 MiB). Two MiB in flight per
# connection is still far above a LAN's bandwidth-delay product (10 Gbit/s x 0.2 ms = 250 KB).
RECEIVE_BUFFER = 1 << 20
# Compressed, each byte in those buffers is ~4 bytes of pages still to decompress, and the
# destination's threads, not the link, fall behind: idle 1 GiB over 1 Gbit/s, zstd, pause 12-222 ms
# with 1 MiB, 29-54 ms with 256 KiB, 6-23 ms with 64 KiB (migrate -> running 358-458 ms, against
# 282-389 with 256 KiB: the price of a window that small, still half of the uncompressed time).
RECEIVE_BUFFER_COMPRESSED = 64 << 10
# Unsent bytes each migration socket may hold once the switchover is near (TCP_NOTSENT_LOWAT):
# what the source's buffers hold when its vCPUs stop crosses the link before the destination can
# resume. Measured (TCG, idle 1 GiB guest, 1 Gbit/s, bench/README.md): pause 51-86 ms with the
# kernel's default buffers, 12-30 ms with 128 KiB from the start, which also slowed the whole
# migration ~10 %; so it is set only for the last MiBs (12-61 ms), and only where the link is the
# bottleneck (a backlog in the sockets): on an unshaped link it only added wakeups to the final copy.
UNSENT_LIMIT = 128 << 10
NEAR_SWITCHOVER = 16 << 20  # bytes QEMU still has to send when the limit may go on (> one TICK at 1 Gbit/s)
BACKLOG_WORTH_LIMITING = 1 << 20  # bytes queued in the migration sockets
# Compressed pages are made faster than a slow link carries them: the source's socket buffers fill
# from the first packet and everything in them waits out the switchover (idle 512 MiB guest over
# 1 Gbit/s, zstd: pause 79-114 ms with the limit set at the first tick, 28-37 ms set at once). So
# with compression the limit goes on as soon as QEMU has opened its connections.
SOCKETS_OPEN_WAIT = 0.1  # s after `migrate` to find them


def _multifd(postcopy: bool) -> dict[str, bool]:
    return {"multifd": not postcopy}


def _stream_connections(postcopy: bool) -> int:
    """TCP connections QEMU opens for one migration stream (the main one, then multifd's)."""
    return 1 if postcopy else MULTIFD_CHANNELS + 1


def _multifd_params(compression: pol.Compression) -> dict[str, object]:
    """The multifd parameters both ends must set alike."""
    return {"multifd-channels": MULTIFD_CHANNELS, "multifd-compression": compression.value}


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


class Cancelled(MigrationError):
    """The user cancelled the migration."""


class CommitUnknown(MigrationError):
    """The destination may have resumed the VM: neither the commit nor its cancellation was answered."""


async def add_stream_tls(qmp, host: str, endpoint: str, peer: str | None = None,
                         user: confine.QemuUser | None = None) -> dict[str, str]:
    """Give a QEMU of `host` its TLS credentials for a migration stream (the folder of its qemu:HOST
    identity, never the agent's key) and return the migration parameters that use them. A server
    (the destination) also gets a tls-authz that admits only `peer`'s QEMUs: the cluster CA signs
    every host's certificates, so the CA check alone would admit any host, or a host's agent
    identity. A client (the source) checks that the server's certificate names `peer` (the
    destination host; its QEMU certificate's SAN holds the host name and addresses). With `user`
    (QEMU runs unprivileged) the files are checked first: QEMU's own "Error while reading file"
    would not say why."""
    creds = qemu_creds_dir(host)
    if user is not None:
        fix = (f"issue {host}'s certificate again (kvmotion cluster cert) now that the user exists, "
               f"or chgrp {confine.QEMU_USER} and chmod 0640 the key")
        for name in ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem"):
            confine.check_readable(creds / name, user, fix)
    for qom_id in (TLS_ID, AUTHZ_ID):
        try:
            await qmp.execute("object-del", id=qom_id)
        except VmFailed:
            pass  # none yet (this QEMU's first migration)
    await qmp.execute("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_ID, "endpoint": endpoint,
                                        "dir": str(creds), "verify-peer": True})
    if endpoint == "client":
        return {"tls-creds": TLS_ID, "tls-hostname": peer or "", "tls-authz": ""}
    if peer is None:
        raise ValueError("a migration stream's server admits one peer: name it")
    await qmp.execute("object-add", **{"qom-type": "authz-simple", "id": AUTHZ_ID,
                                        "identity": Identity(Kind.QEMU, peer).tls_dn()})
    return {"tls-creds": TLS_ID, "tls-authz": AUTHZ_ID}


class IncomingSources:
    """Which host started each migration this host receives: only that host may commit or abort it.
    One small file per migration, so that a restarted agent still answers the source's retried
    commit of a VM it had committed (the shadows it had not committed are gone by then)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._known: dict[str, str] = {}

    def _path(self, mid: str) -> Path:
        return self.folder / f"{mid}.json"

    def get(self, mid: str) -> str | None:
        if mid not in self._known:
            try:
                self._known[mid] = str(json.loads(self._path(mid).read_text())["source"])
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("incoming migration %s: unreadable source record: %s", mid, exc)
                return None
        return self._known[mid]

    def remember(self, mid: str, source: str) -> None:
        if self.get(mid) is not None:
            raise Conflict(f"migration {mid} is already known here (from {self._known[mid]}): use a new migration id")
        write_atomic(self._path(mid), json.dumps({"source": source}), 0o600)
        self._known[mid] = source

    def forget(self, mid: str) -> None:
        self._known.pop(mid, None)
        self._path(mid).unlink(missing_ok=True)

    def keep_only(self, mids: set[str]) -> None:
        """Forget every migration not in `mids` (after a restart: the ones whose VM is still here)."""
        for path in self.folder.glob("*.json") if self.folder.exists() else ():
            if path.stem not in mids:
                self.forget(path.stem)


def _never_connected(exc: Unreachable) -> bool:
    """True when the request cannot have reached the agent (no connection was made)."""
    return isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))


def _record_to_json(rec: MigrationRecord) -> dict:
    return as_json(rec)


def encryption_policy() -> bool:
    """Whether migration streams are encrypted: the cluster's setting, never a caller's wish."""
    return load_config().encrypted


def destination_client(host: str) -> AsyncAgentClient:
    """A client of `host`'s agent at the address the cluster inventory gives (NotFound: no such host)."""
    return agent_client(Inventory().host(host).url)


class MigrationService:
    def __init__(self, manager: VmManager, listen_ip: str, limit: int = 4) -> None:
        self.manager = manager
        self.host = manager.config.name
        self.listen_ip = listen_ip
        self.limit = limit
        self.records: dict[str, MigrationRecord] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancels: dict[str, asyncio.Event] = {}
        self.cancelled_by: dict[str, str] = {}
        manager.keeps_stale_shadows = True  # _end_stale_shadow ends them
        self.incoming_active: set[str] = set()
        self.incoming_sources = IncomingSources(manager.config.state_dir / "incoming")
        # VM -> its outgoing migration's id (None while the checks run): one migration per VM. Taken
        # and tested without an await in between, released when the migration ends however it ends.
        self.migrating: dict[str, str | None] = {}
        self.incoming_aborting: set[str] = set()  # shadows being destroyed: a commit must not win the race
        self.history_dir = manager.config.state_dir / "migrations"

    # ---- facts & checks --------------------------------------------------------------------------
    def active(self) -> int:
        return sum(1 for r in self.records.values() if not r.phase.terminal) + len(self.incoming_active)

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
        self.records[mid] = rec
        self.cancels[mid] = asyncio.Event()
        self.tasks[mid] = asyncio.create_task(self._drive(mid, dest))
        return rec

    async def _drive(self, mid: str, dest: AsyncAgentClient) -> None:
        """The migration, then the VM is free for the next one (whatever the outcome)."""
        try:
            await self._run(mid, dest)
        finally:
            self._release(self.records[mid].vm, mid)

    def _update(self, mid: str, **changes) -> MigrationRecord:
        rec = dataclasses.replace(self.records[mid], **changes)
        self.records[mid] = rec
        return rec

    def _phase(self, mid: str, phase: Phase, at: float | None = None) -> None:
        """Enter `phase`, stamped `at` (wall clock, e.g. a QMP event's time) or now."""
        rec = self.records[mid]
        self._update(mid, phase=phase, phase_times=(*rec.phase_times, (phase.value, at or time.time())))
        log.info("migration %s of %s: %s", mid, rec.vm, phase.value)

    def cancel(self, mid: str, by: str = "the user") -> MigrationRecord:
        rec = self.get(mid)
        if not rec.phase.cancellable or mid not in self.cancels:
            raise Conflict(f"migration {mid} is in phase {rec.phase.value}: too late to cancel")
        self.cancelled_by.setdefault(mid, by)
        self.cancels[mid].set()
        return rec

    def cancel_vm(self, vm: str) -> MigrationRecord:
        for rec in self.records.values():
            if rec.vm == vm and not rec.phase.terminal:
                return self.cancel(rec.id)
        raise NotFound(f"no migration of VM {vm} is running on {self.host}")

    def get(self, mid: str) -> MigrationRecord:
        if mid in self.records:
            return self.records[mid]
        path = self.history_dir / f"{mid}.json"
        if path.exists():
            return record_from_json(json.loads(path.read_text()))
        raise NotFound(f"no migration {mid} on {self.host}")

    def history(self) -> list[MigrationRecord]:
        out = {r.id: r for r in self.records.values()}
        if self.history_dir.exists():
            for p in self.history_dir.glob("*.json"):
                try:
                    rec = record_from_json(json.loads(p.read_text()))
                except (OSError, ValueError, KeyError):
                    continue
                out.setdefault(rec.id, rec)
        return sorted(out.values(), key=lambda r: r.started_at)

    async def recover(self) -> None:
        """After this agent restarted (VmManager.recover has run): settle the outgoing migrations it
        was driving, whose records are on disk from the prepare phase on. A VM whose QEMU completed
        the stream but was never destroyed may run on the destination, or nowhere: it stays paused
        and the destination is asked, as after a commit with no answer (_resolve). A migration that
        had not completed was cancelled by VmManager.recover: its record says so, and so tells the
        destination's guard to destroy its shadow."""
        # Incoming migrations: the uncommitted shadows are gone (VmManager.recover) or going
        # (stale_shadows); keep the sources of the VMs committed here, which may still be asked for
        # a retried commit, and of the stale shadows, whose source aborts them.
        self.incoming_sources.keep_only({m for r in self.manager.store.all()
                                         for m in (r.incoming_migration, r.committed_migration) if m})
        for name, mid in self.manager.stale_shadows:
            self.tasks[f"stale-{mid}"] = asyncio.create_task(self._end_stale_shadow(name, mid))
        self.manager.stale_shadows.clear()
        latest: dict[str, MigrationRecord] = {}
        for rec in self.history():  # oldest first
            if rec.source == self.host:
                latest[rec.vm] = rec
        for vm, rec in latest.items():
            state: VmState | None = None
            try:
                state = self.manager.status(vm).state
                stream = (await self.manager.qmp(vm).execute("query-migrate")).get("status")
            except NotFound:
                state, stream = None, None
            except KvmotionError:  # no QEMU, or a QEMU that does not answer: nothing to settle with it
                stream = None
            if stream == "completed" and state is VmState.MIGRATING and rec.phase is not Phase.DONE:
                try:
                    dest_url = Inventory().host(rec.destination).url
                except KvmotionError as exc:
                    log.error("migration %s: VM %s stays paused on %s for the operator: %s", rec.id, vm, self.host, exc)
                    continue
                self.manager.set_state(vm, VmState.PAUSED)
                self.records[rec.id] = rec
                spec = self.manager.status(vm).spec
                ctx = SwitchoverContext(spec=spec, source=self.host, destination=rec.destination, migration_id=rec.id,
                                        source_qmp=self.manager.qmp(vm), proto_nodes=self.manager.proto_nodes(vm))
                if not rec.phase.terminal:
                    self._phase(rec.id, Phase.FAILED)
                    self._persist(self._update(rec.id, ended_at=time.time(), error=(
                        f"the agent on {self.host} restarted after the stream had completed; VM {vm} stays paused "
                        f"on {self.host} until {rec.destination} says whether it runs the VM")))
                log.warning("migration %s: VM %s completed its stream but was not destroyed: asking %s", rec.id, vm,
                            rec.destination)
                self.tasks[f"resolve-{rec.id}"] = asyncio.create_task(
                    self._resolve(rec.id, dest_url, default_hooks(spec), ctx))
            elif not rec.phase.terminal:
                where = (f"VM {vm} keeps running on {self.host}" if state is VmState.RUNNING
                         else f"VM {vm} is {state.value if state else 'gone'} on {self.host}")
                self.records[rec.id] = rec
                self._phase(rec.id, Phase.FAILED)
                self._persist(self._update(rec.id, ended_at=time.time(), error=(
                    f"the agent on {self.host} restarted during the migration and gave it up; {where}")))

    def _persist(self, rec: MigrationRecord) -> None:
        write_atomic(self.history_dir / f"{rec.id}.json", json.dumps(_record_to_json(rec), indent=1))

    async def _run(self, mid: str, dest: AsyncAgentClient) -> None:
        rec = self.records[mid]
        spec = self.manager.status(rec.vm).spec
        qmp = self.manager.qmp(rec.vm)
        ctx = SwitchoverContext(spec=spec, source=self.host, destination=rec.destination, migration_id=mid,
                                source_qmp=qmp, proto_nodes=self.manager.proto_nodes(rec.vm))
        hooks = default_hooks(spec)
        done_hooks: list = []
        dest_prepared = committed = False
        throttle = None
        tracker = RoundTracker()
        stop_at: float | None = None
        seen: dict[str, float] = {}  # QMP event timestamps: "stop"
        final: MigrationSample | None = None
        postcopy = False
        self.manager.set_state(rec.vm, VmState.MIGRATING)
        try:
            # ---- prepare: the shadow VM first, before any memory moves
            self._phase(mid, Phase.PREPARE)
            tls = rec.encrypted
            compression = pol.stream_compression(await self._egress_rate(dest), rec.options.allow_postcopy)
            try:
                answer = await dest.request(
                    "POST", "/v1/incoming",
                    json={"version": PROTOCOL_VERSION, "spec": as_json(spec), "migration_id": mid, "source": self.host,
                          "postcopy": rec.options.allow_postcopy, "compression": compression.value},
                    timeout=90,
                )
            except KvmotionError as exc:  # the destination's own words, said about its shadow
                raise MigrationError(f"preparing the shadow VM on {rec.destination} failed: {exc}") from exc
            dest_prepared = True
            # On disk from here on: an agent restarted later must know what it was driving (recover).
            self._persist(self.records[mid])
            uri = answer["uri"]
            for hook in hooks:
                await hook.before_precopy(ctx)
            self._check_cancel(mid)
            config = dataclasses.replace(
                pol.preset(rec.options.policy),
                max_downtime_ms=rec.options.max_downtime_ms,
                allow_postcopy=rec.options.allow_postcopy,
            )
            decision = pol.start(config, spec.memory)
            state = decision.state
            # Pause before switchover only when a hook has something to hand over (disk leases):
            # otherwise the round trip through this loop (event, query, migrate-continue) only
            # lengthens the guest's pause and the migration (measured in bench/README.md).
            pause = bool(hooks)
            caps = {"pause-before-switchover": pause, "events": True, "postcopy-ram": rec.options.allow_postcopy,
                    **_multifd(rec.options.allow_postcopy)}
            await qmp.execute("migrate-set-capabilities",
                              capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            params: dict = {"max-bandwidth": rec.options.bandwidth or UNLIMITED_BANDWIDTH,
                            "downtime-limit": state.downtime_ms, **_multifd_params(compression),
                            # QEMU's own estimate (0) unless set below: a rolled-back attempt may have set it
                            "avail-switchover-bandwidth": 0}
            if tls:
                params.update(await add_stream_tls(qmp, self.host, "client", rec.destination,
                                                   self.manager.confinement.user))
            else:
                params.update({"tls-creds": ""})
            await qmp.execute("migrate-set-parameters", **params)

            async with qmp.listen("STOP", "MIGRATION") as events:
                # ---- pre-copy under the policy
                self._phase(mid, Phase.PRECOPY)
                t0 = time.monotonic()
                await qmp.execute("migrate", uri=uri)
                stall = _StallWatch()
                stream: list[int] = []  # the source QEMU's stream sockets, checked at switchover
                unsent_limited = compression is not pol.Compression.NONE and await self._limit_unsent_at_once(rec.vm, uri)
                while True:
                    self._check_cancel(mid)
                    now = time.monotonic() - t0
                    sample = MigrationSample.from_qmp(await qmp.execute("query-migrate"), at=now)
                    frac = throttle.fraction if throttle else 0.0
                    tracker, closed = tracker.observe(sample, frac)
                    if closed is not None and compression is not pol.Compression.NONE:
                        # QEMU's switchover test divides pending page bytes by its wire rate, which
                        # compression makes several times too slow: it waited rounds it needed not.
                        # (The policy still judges by the wire rate, so it throttles a compressed
                        # writer harder than its pages need: see bench/README.md.)
                        await qmp.execute("migrate-set-parameters",
                                          **{"avail-switchover-bandwidth": int(closed.page_rate)})
                    self._progress(mid, sample, tracker, state, frac, now)
                    if sample.status is MigrationStatus.PRE_SWITCHOVER or (
                        sample.status is MigrationStatus.DEVICE and not pause
                    ):
                        break
                    if sample.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                        raise await self._stream_error(dest, rec, sample, "")
                    if sample.status is MigrationStatus.COMPLETED:
                        final = sample
                        break
                    if pause and len(stream) < _stream_connections(rec.options.allow_postcopy):
                        stream = await self._on_stream_sockets(rec.vm, uri, stream_fds) or []
                    if not unsent_limited and sample.ram is not None and 0 < sample.ram.remaining <= NEAR_SWITCHOVER:
                        unsent_limited = await self._limit_unsent(rec.vm, uri)
                    if stall.stalled(sample):
                        raise await self._stalled(dest, rec, "")
                    decision = pol.tick(config, state, pol.Observation(now, sample, tracker.latest_round))
                    state = decision.state
                    for action in decision.actions:
                        if isinstance(action, pol.SetDowntimeLimit):
                            await qmp.execute("migrate-set-parameters", **{"downtime-limit": action.ms})
                        elif isinstance(action, pol.SetThrottle):
                            throttle = await self._throttle(throttle, rec.vm, action.fraction)
                        elif isinstance(action, pol.StartPostcopy):
                            await qmp.execute("migrate-start-postcopy")
                            postcopy = True
                        elif isinstance(action, pol.Abort):
                            raise MigrationError(f"convergence policy gave up: {action.reason}")
                    # Wake at once when QEMU pauses before switchover: every ms here is guest downtime.
                    await self._await_migration_event(events, TICK, seen)

                # ---- switchover: source vCPUs are stopped and its disks flushed
                stop_at = self._drain_stop(events, seen)
                self._phase(mid, Phase.SWITCHOVER, at=stop_at)
                for hook in hooks:
                    # Rolled back even if it fails: a hand-over that timed out may still happen
                    # (a stalled datastore acting on the request late); taking back is idempotent.
                    done_hooks.append(hook)
                    await hook.before_switchover(ctx)
                if final is None:
                    if pause:
                        await self._check_stream_whole(dest, rec, stream)
                        await qmp.execute("migrate-continue", state="pre-switchover")
                    final = await self._wait_completion(qmp, events, seen, t0, dest, rec, uri)
                if stop_at is None:
                    stop_at = self._drain_stop(events, seen)
                if final.status is not MigrationStatus.COMPLETED:
                    raise await self._stream_error(dest, rec, final, " at switchover")

            # ---- commit: the destination takes the VM and resumes it
            self._phase(mid, Phase.COMMIT)
            answer = await self._commit(dest, mid)
            committed = True
        except BaseException as exc:  # noqa: BLE001 - every failure before commit rolls back
            await self._rollback(mid, qmp, dest, dest_prepared, done_hooks, ctx, throttle, exc)
            return
        finally:
            await dest.aclose()
        resumed_at = float(answer["resumed_at"])
        if final is not None:  # not yet observed: the stream's last figures, read now that the VM runs
            tracker, _ = tracker.observe(await self._final_statistics(qmp, final), throttle.fraction if throttle else 0.0)
        await self._finish_source(mid, rec.vm, throttle)
        for hook in done_hooks:
            await hook.after_commit(ctx)
        stats = tracker.summary()
        summary = Summary(
            total_ms=stats.total_time * 1000,
            downtime_ms=stats.downtime * 1000 if stats.downtime is not None else None,
            pause_ms=(resumed_at - stop_at) * 1000 if stop_at else None,
            setup_ms=stats.setup_time * 1000,
            rounds=stats.rounds,
            bytes=stats.bytes_transferred,
            zero_pages=stats.zero_pages,
            normal_pages=stats.normal_pages,
            mean_link_rate=stats.mean_link_rate,
            peak_dirty_rate=stats.peak_dirty_rate,
            throttle_max=stats.throttle_max,
            encrypted=rec.encrypted,
            converged=not postcopy,
            postcopy=postcopy,
            compression=compression.value,
        )
        self._phase(mid, Phase.DONE)
        rec = self._update(mid, ended_at=time.time(), summary=summary, rounds=tuple(as_json(r) for r in stats.round_log))
        self._persist(rec)
        del committed

    @staticmethod
    async def _final_statistics(qmp, final: MigrationSample) -> MigrationSample:
        """The completed stream's figures (downtime, bytes), read after the commit when the completion
        came as an event; the source QEMU keeps them until it is destroyed."""
        if final.ram is not None:
            return final
        try:
            return MigrationSample.from_qmp(await qmp.execute_within(ROLLBACK_STEP_TIMEOUT, "query-migrate"), at=final.at)
        except KvmotionError as exc:
            log.warning("reading the completed migration's statistics: %s", exc)
            return final

    async def _stream_error(self, dest: AsyncAgentClient, rec: MigrationRecord, sample: MigrationSample, when: str) -> MigrationError:
        """QEMU only says the socket broke; the destination's agent knows whether its shadow died."""
        cause = await self._shadow_fate(dest, rec)
        return MigrationError(f"QEMU's migration stream to {rec.destination} {sample.status.value}{when}: "
                              f"{sample.error or 'no detail'}" + (f" ({cause})" if cause else ""))

    async def _check_stream_whole(self, dest: AsyncAgentClient, rec: MigrationRecord, stream: list[int]) -> None:
        """Raise if a connection of the paused stream was closed by the other end. QEMU 10.0 may
        find a dead multifd connection only while it saves the device state and then wedge there
        holding its big lock (migration thread stuck in multifd_send_sync_main, monitor silent):
        the source could then neither resume nor be cancelled. Cancelled before the continue, it can."""
        if not stream:
            return  # not found during pre-copy: QEMU's own error handling is all there is
        alive = await self._on_qemu_sockets(rec.vm, established, stream)
        if alive is not None and alive < len(stream):
            cause = await self._shadow_fate(dest, rec)
            raise MigrationError(f"the migration stream to {rec.destination} broke at switchover: {len(stream) - alive} "
                                 f"of its {len(stream)} connections closed by the other end" + (f" ({cause})" if cause else ""))

    async def _shadow_fate(self, dest: AsyncAgentClient, rec: MigrationRecord) -> str:
        deadline = time.monotonic() + SHADOW_SETTLE
        while True:
            try:
                state = (await dest.request("GET", f"/v1/vms/{rec.vm}", timeout=3))["state"]
            except NotFound:
                return f"the shadow VM on {rec.destination} is gone: its QEMU exited or its agent destroyed it"
            except Unreachable:
                return f"the agent on {rec.destination} does not answer"
            except (KvmotionError, KeyError, TypeError):
                return ""
            # The agent notices a dead QEMU within its exit poll: give it that long before blaming the network.
            if state != VmState.INCOMING.value or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if state == VmState.INCOMING.value:
            return f"the shadow VM on {rec.destination} is alive but its stream broke or stalled"
        if state in (VmState.CRASHED.value, VmState.STOPPED.value):
            return f"the shadow VM on {rec.destination} is gone: its QEMU exited"
        return f"the shadow VM on {rec.destination} is {state}"

    def _check_cancel(self, mid: str) -> None:
        if self.cancels[mid].is_set():
            raise Cancelled(f"cancelled by {self.cancelled_by.get(mid, 'the user')}")

    @staticmethod
    async def _await_migration_event(events, timeout: float, seen: dict[str, float]) -> str | None:
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
    def _drain_stop(events, seen: dict[str, float]) -> float | None:
        """Timestamp of the source's STOP event, if it has arrived."""
        while True:
            try:
                ev = events.get_nowait()
            except asyncio.QueueEmpty:
                return seen.get("stop")
            if ev.name == "STOP":
                seen["stop"] = ev.timestamp

    async def _wait_completion(self, qmp, events, seen: dict[str, float], t0: float, dest: AsyncAgentClient,
                               rec: MigrationRecord, uri: str) -> MigrationSample:
        """The source QEMU's last sample of the stream. A completion is returned as soon as QEMU's
        event says so, as a sample with the status only (no query first): from here to the commit
        is the guest's pause. The caller reads the statistics once the VM runs again."""
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
                await self._on_stream_sockets(rec.vm, uri, shutdown_to)
                raise await self._stalled(dest, rec, " at switchover")
            # QEMU sets "completed" after it lets go of its big lock, which the query above may have
            # waited for: wait for the event then, not for a poll (the next query covers "failed").
            if await self._await_migration_event(events, COMPLETION_POLL, seen) == MigrationStatus.COMPLETED.value:
                return MigrationSample(status=MigrationStatus.COMPLETED, at=time.monotonic() - t0)

    async def _stalled(self, dest: AsyncAgentClient, rec: MigrationRecord, when: str) -> MigrationError:
        cause = await self._shadow_fate(dest, rec)
        return MigrationError(f"no data reached {rec.destination} for {STALL_TIMEOUT:.0f} s{when}: the migration "
                              f"stream stalled" + (f" ({cause})" if cause else ""))

    def _progress(self, mid: str, sample: MigrationSample, tracker: RoundTracker, state, frac: float, now: float) -> None:
        ram = sample.ram
        last = tracker.latest_round
        self._update(mid, progress=Progress(
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

    async def _throttle(self, current, vm: str, fraction: float):
        if current is None:
            if fraction <= 0:
                return None
            cpus = await self.manager.qmp(vm).execute("query-cpus-fast")
            current = await asyncio.to_thread(VcpuThrottle, vm, [c["thread-id"] for c in cpus])
        await asyncio.to_thread(current.set_throttle, fraction)
        return current

    async def _on_qemu_sockets(self, vm: str, action: Callable[..., T], *args: object) -> T | None:
        """Run a kvmotion.qemu.sockets action on the VM's QEMU; None (logged) when it could not be
        done: only the pause's length is at stake, never the migration."""
        pid = self.manager.status(vm).pid
        try:
            if pid is None:
                raise OSError("no QEMU process")
            return await asyncio.to_thread(action, pid, *args)
        except (OSError, ValueError) as exc:
            log.warning("VM %s: %s on its QEMU's migration sockets failed: %s", vm, action.__name__, exc)
            return None

    async def _on_stream_sockets(self, vm: str, uri: str, action: Callable[..., T], *args: object) -> T | None:
        """A kvmotion.qemu.sockets action on the source QEMU's sockets to the migration's URI."""
        host, _, port = uri.removeprefix("tcp:").rpartition(":")
        return await self._on_qemu_sockets(vm, action, host.strip("[]"), int(port), *args)

    async def _limit_unsent_at_once(self, vm: str, uri: str) -> bool:
        """The unsent-data limit on every migration connection as soon as QEMU has opened them
        (SOCKETS_OPEN_WAIT). True once done (or impossible); False leaves it to the usual check."""
        deadline = time.monotonic() + SOCKETS_OPEN_WAIT
        while True:
            n = await self._on_stream_sockets(vm, uri, limit_unsent, UNSENT_LIMIT)
            if n is None or n >= _stream_connections(False):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)

    async def _egress_rate(self, dest: AsyncAgentClient) -> int | None:
        """Bytes/s this host sends towards the destination agent's address (NIC speed, tbf
        shaping); None when it cannot tell (then nothing is compressed)."""
        host = urlsplit(dest.url).hostname or ""
        try:
            return (await asyncio.to_thread(egress_link, host)).rate
        except (KvmotionError, OSError) as exc:
            log.warning("the link towards %s: %s", host, exc)
            return None

    async def _limit_unsent(self, vm: str, uri: str) -> bool:
        """Bound the source QEMU's unsent migration data (module docstring of qemu.sockets) if the
        sockets hold a backlog. True once done, or once it cannot be done (only a shorter pause is
        at stake: a failure is not fatal); False to look again at the next tick."""
        n = await self._on_stream_sockets(vm, uri, limit_unsent, UNSENT_LIMIT, BACKLOG_WORTH_LIMITING)
        return n is None or n > 0

    async def _commit(self, dest: AsyncAgentClient, mid: str) -> Any:
        """Ask the destination to commit. When that fails, a commit may still have happened (an
        answer lost, or a request the destination reads later): settle it by destroying the shadow
        before anything resumes here. Raises the commit's error once the shadow is gone, or
        CommitUnknown when the destination answers neither."""
        deadline = time.monotonic() + COMMIT_RETRY
        delivered = False  # may a commit request have reached the destination's agent?
        while True:
            try:
                left = deadline - time.monotonic()
                return await dest.request("POST", f"/v1/incoming/{mid}/commit", timeout=max(2.0, min(COMMIT_TIMEOUT, left)))
            except Unreachable as exc:
                delivered = delivered or not _never_connected(exc)
                if time.monotonic() > deadline:
                    failure: KvmotionError = exc
                    break
                await asyncio.sleep(0.5)
            except KvmotionError as exc:
                failure = exc
                break
        try:
            await dest.request("DELETE", f"/v1/incoming/{mid}", timeout=CLEANUP_TIMEOUT)
        except Conflict:
            log.warning("migration %s: the commit's answer was lost but %s committed: the VM runs there", mid, dest.url)
            try:
                return await dest.request("POST", f"/v1/incoming/{mid}/commit", timeout=COMMIT_TIMEOUT)
            except KvmotionError:
                return {"resumed_at": time.time()}
        except KvmotionError as exc:
            if not delivered and isinstance(failure, Unreachable):
                # No request ever reached it: nothing but a commit from us can resume the shadow.
                raise MigrationError(f"could not commit on {self.records[mid].destination}: {failure}") from None
            raise CommitUnknown(f"the commit got no answer ({failure}), nor did destroying the shadow ({exc})") from failure
        raise MigrationError(f"could not commit on {self.records[mid].destination}: {failure}") from failure

    async def _hold_paused(self, mid, dest, done_hooks, ctx, throttle, exc: CommitUnknown) -> None:
        """The destination may run the VM: resuming here could make two copies. Keep the source
        paused (its disks' leases stay where they are) and settle it in the background."""
        rec = self.records[mid]
        self.manager.set_state(rec.vm, VmState.PAUSED)
        if throttle is not None:
            await asyncio.to_thread(throttle.release)
        error = (f"{exc}; VM {rec.vm} stays paused on {self.host} so that it never runs twice: it resumes here once "
                 f"{rec.destination} confirms the shadow is destroyed, or is removed here if {rec.destination} runs it")
        log.error("migration %s: %s", mid, error)
        self._phase(mid, Phase.FAILED)
        self._persist(self._update(mid, ended_at=time.time(), error=error))
        self.tasks[f"resolve-{mid}"] = asyncio.create_task(self._resolve(mid, dest.url, list(done_hooks), ctx))

    async def _resolve(self, mid: str, dest_url: str, done_hooks: list, ctx: SwitchoverContext) -> None:
        rec = self.records[mid]
        client = agent_client(dest_url)
        try:
            deadline = time.monotonic() + RESOLVE_FOR
            while time.monotonic() < deadline:
                await asyncio.sleep(RESOLVE_INTERVAL)
                try:
                    await client.request("DELETE", f"/v1/incoming/{mid}", timeout=CLEANUP_TIMEOUT)
                except Conflict:
                    for hook in done_hooks:
                        await hook.after_commit(ctx)
                    await self._finish_source(mid, rec.vm, None)
                    outcome = f"settled: {rec.destination} had committed, the VM runs there; the paused copy here is gone"
                except KvmotionError:
                    continue
                else:
                    for hook in reversed(done_hooks):
                        await hook.on_rollback(ctx)
                    await self.manager.qmp(rec.vm).execute("cont")
                    self.manager.set_state(rec.vm, VmState.RUNNING)
                    outcome = f"settled: {rec.destination} destroyed the shadow, the VM resumed on {self.host}"
                log.warning("migration %s: %s", mid, outcome)
                self._persist(self._update(mid, error=f"{self.records[mid].error} — {outcome}"))
                return
            log.error("migration %s: %s never answered: VM %s stays paused on %s for the operator", mid,
                      rec.destination, rec.vm, self.host)
        except KvmotionError as exc:
            log.error("migration %s: settling the commit failed: %s", mid, exc)
        finally:
            await client.aclose()

    async def _finish_source(self, mid: str, vm: str, throttle) -> None:
        if throttle is not None:
            await asyncio.to_thread(throttle.release)
        try:
            await self.manager.stop(vm, force=False, timeout=10)
        except KvmotionError as exc:
            log.warning("stopping the source copy of %s after commit: %s", vm, exc)
        await self.manager.delete(vm)

    async def _rollback(self, mid, qmp, dest, dest_prepared, done_hooks, ctx, throttle, exc: BaseException) -> None:
        cancelled = isinstance(exc, (Cancelled, asyncio.CancelledError))
        rec = self.records[mid]
        self._phase(mid, Phase.ROLLBACK)
        if isinstance(exc, CommitUnknown):
            await self._hold_paused(mid, dest, done_hooks, ctx, throttle, exc)
            return
        notes: list[str] = []
        resumed = False
        # Every step is bounded: a source QEMU wedged holding its big lock must not hang the
        # agent; the record then says the VM could not be resumed, instead of never ending.
        ask = functools.partial(qmp.execute_within, ROLLBACK_STEP_TIMEOUT)
        try:
            # Leases first: the source must hold its disks again before its vCPUs run.
            for hook in reversed(done_hooks):
                try:
                    await asyncio.wait_for(hook.on_rollback(ctx), ROLLBACK_STEP_TIMEOUT * 2)
                except KvmotionError as e:
                    notes.append(f"{hook.name} rollback: {e}")
                except TimeoutError:
                    notes.append(f"{hook.name} rollback: not done within {ROLLBACK_STEP_TIMEOUT * 2:.0f} s")
            try:
                status = MigrationSample.from_qmp(await ask("query-migrate")).status
                if not status.is_terminal and status is not MigrationStatus.NONE:
                    # A stalled stream is broken off in the order QEMU 10.0 survives (qemu/cancel.py).
                    await cancel_migration(ask, self.manager.status(rec.vm).pid, CANCEL_WAIT)
                run = await ask("query-status")
                if run["status"] != "running":
                    await ask("cont")
                resumed = True
            except KvmotionError as e:
                notes.append(f"resuming the source: {e}")
            if throttle is not None:
                await asyncio.to_thread(throttle.release)
            if dest_prepared:
                try:
                    await dest.request("DELETE", f"/v1/incoming/{mid}", timeout=CLEANUP_TIMEOUT)
                except KvmotionError as e:
                    notes.append(f"destination cleanup: {e}; the agent on {rec.destination} destroys the uncommitted "
                                 f"shadow once it learns the migration failed, or when it restarts")
        finally:
            self.manager.set_state(rec.vm, VmState.RUNNING if resumed else VmState.PAUSED)
        if isinstance(exc, KvmotionError):
            why = str(exc)
        elif isinstance(exc, asyncio.CancelledError):
            why = "the agent is shutting down"
        else:
            log.exception("migration %s failed", mid, exc_info=exc)
            why = f"{type(exc).__name__}: {exc}"
        where = f"VM {rec.vm} keeps running on {self.host}" if resumed else f"VM {rec.vm} could not be resumed on {self.host}"
        error = f"{why}; {where}" + (f" ({'; '.join(notes)})" if notes else "")
        self._phase(mid, Phase.CANCELLED if cancelled else Phase.FAILED)
        rec = self._update(mid, ended_at=time.time(), error=error)
        self._persist(rec)

    # ---- destination side ------------------------------------------------------------------------
    async def prepare_incoming(self, spec: VmSpec, mid: str, source: str, postcopy: bool,
                               compression: pol.Compression = pol.Compression.NONE) -> str:
        """The paused shadow VM for migration `mid` from host `source` (the caller: the API checked
        that), listening for the stream. Only `source` may commit or abort it, and with the
        cluster's encryption policy only `source`'s QEMUs may send the stream."""
        if self.active() >= self.limit:
            raise Conflict(f"{self.host} already runs {self.active()} migrations (limit {self.limit})")
        encrypted = encryption_policy()
        self.incoming_sources.remember(mid, source)
        try:
            await self.manager.create(spec, incoming_migration=mid)
        except BaseException:
            self.incoming_sources.forget(mid)
            raise
        self.incoming_active.add(mid)
        try:
            await self.manager.start(spec.name, incoming=True)
            qmp = self.manager.qmp(spec.name)
            caps = {"events": True, "postcopy-ram": postcopy, **_multifd(postcopy)}
            await qmp.execute("migrate-set-capabilities",
                              capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
            await qmp.execute("migrate-set-parameters", **_multifd_params(compression))
            if encrypted:
                await qmp.execute("migrate-set-parameters", **await add_stream_tls(
                    qmp, self.host, "server", source, self.manager.confinement.user))
            await qmp.execute("migrate-incoming", uri=f"tcp:{self.listen_ip}:0")
            info = await qmp.execute("query-migrate")
            addr = info["socket-address"][0]
            size = RECEIVE_BUFFER if compression is pol.Compression.NONE else RECEIVE_BUFFER_COMPRESSED
            await self._on_qemu_sockets(spec.name, limit_receive_buffer, int(addr["port"]), size)
            self.tasks[f"incoming-{mid}"] = asyncio.create_task(self._guard_incoming(mid, source))
            return f"tcp:{addr['host']}:{addr['port']}"
        except BaseException as exc:
            log.warning("preparing the shadow VM %s for migration %s failed: %s", spec.name, mid, exc)
            await self.abort_incoming(mid)
            raise

    def authorize_incoming(self, mid: str, host: str | None, what: str) -> None:
        """Only the host that prepared incoming migration `mid` may `what` it. `host` is the calling
        host; None on an --insecure listener, which knows no identities and checks nobody."""
        if host is None:
            return
        source = self.incoming_sources.get(mid)
        if source == host:
            return
        if source is None:
            try:
                self._incoming_vm(mid)
            except NotFound:
                return  # nothing here for it: answered as for any unknown migration
            raise Forbidden(f"host {host} may not {what} migration {mid}: {self.host} does not know which host started it")
        raise Forbidden(f"host {host} may not {what} migration {mid}: only its source, {source}, may")

    def _incoming_vm(self, mid: str) -> str:
        for st in self.manager.list():
            rec = self.manager.store.get(st.name)
            if rec.incoming_migration == mid or rec.committed_migration == mid:
                return st.name
        raise NotFound(f"no incoming migration {mid} on {self.host} (its shadow VM is gone)")

    async def commit_incoming(self, mid: str) -> float:
        name = self._incoming_vm(mid)
        rec = self.manager.store.get(name)
        qmp = self.manager.qmp(name)
        if rec.committed_migration == mid:  # a retried commit: already done
            return rec.resumed_at or time.time()
        async with qmp.listen("MIGRATION", "RESUME") as events:
            await self._wait_incoming_loaded(qmp, name, events)
            if mid in self.incoming_aborting or mid not in self.incoming_active:
                raise MigrationError(f"the shadow VM {name} on {self.host} is being destroyed: migration {mid} was given up")
            # The VM is ours from here on: persist that before it runs, so a crash cannot forget it.
            self.manager.commit_incoming(name, mid)
            await qmp.execute("cont")
            resumed = await events.wait_for("RESUME", timeout=10)
        self.manager.set_resumed(name, resumed.timestamp)
        self.incoming_active.discard(mid)
        try:
            # More announce rounds than QEMU's automatic ones at incoming completion (which ran
            # while the VM was still paused): switches re-learn the MAC now that it runs here.
            await qmp.execute("announce-self", initial=20, max=200, rounds=5, step=50)
        except VmFailed as exc:
            log.warning("announce-self for %s: %s", name, exc)
        return resumed.timestamp

    async def _wait_incoming_loaded(self, qmp, name: str, events) -> None:
        """Wait until the shadow has loaded the whole stream. The source's QEMU says "completed"
        once it has sent the last byte; the destination may still be loading it (status
        "active"), so asking once races with it."""
        deadline = time.monotonic() + INCOMING_SETTLE
        status = (await qmp.execute("query-migrate")).get("status")
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

    async def _guard_incoming(self, mid: str, source: str) -> None:
        """Destroy an uncommitted shadow whose source gave up without telling us (a cut link loses
        the source's DELETE): ask the source about the migration until the shadow is committed or gone."""
        try:
            client = agent_client(Inventory().host(source).url)
        except KvmotionError as exc:
            log.warning("incoming migration %s: cannot watch source %s: %s", mid, source, exc)
            return
        silent_since: float | None = None
        try:
            while True:
                await asyncio.sleep(GUARD_INTERVAL)
                if mid not in self.incoming_active:
                    return  # committed, or destroyed already
                try:
                    phase = Phase((await client.request("GET", f"/v1/migrations/{mid}", timeout=5))["phase"])
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
                log.warning("incoming migration %s: %s: destroying its uncommitted shadow VM", mid, why)
                try:
                    await self.abort_incoming(mid)
                except Conflict:
                    pass  # committed meanwhile: the VM is ours
                return
        finally:
            await client.aclose()

    async def _end_stale_shadow(self, name: str, mid: str) -> None:
        """An uncommitted shadow this agent found still running after a restart: ask its source to
        cancel (it then breaks its stream off in an order its QEMU survives, and aborts the shadow
        here), wait for that, and destroy the shadow if it is still there. The shadow is never
        committed now: a restarted agent knows no incoming migration (commit_incoming refuses)."""
        source = self.incoming_sources.get(mid)
        deadline = time.monotonic() + STALE_SHADOW_WAIT
        if source is not None:
            try:
                client = destination_client(source)
                try:
                    await client.request("POST", f"/v1/migrations/{mid}/cancel", timeout=5)
                    while time.monotonic() < deadline and self._has_shadow(name, mid):
                        rec = await client.request("GET", f"/v1/migrations/{mid}", timeout=5)
                        if Phase(rec["phase"]).terminal:
                            break
                        await asyncio.sleep(0.2)
                finally:
                    await client.aclose()
            except KvmotionError as exc:  # gone, too late, unreachable: the shadow goes anyway
                log.warning("migration %s: asking %s to cancel before destroying the stale shadow of %s: %s",
                            mid, source, name, exc)
        if self._has_shadow(name, mid):
            log.warning("migration %s: destroying the shadow of VM %s left by this agent's restart", mid, name)
            await self.abort_incoming(mid)

    def _has_shadow(self, name: str, mid: str) -> bool:
        try:
            return self.manager.store.get(name).incoming_migration == mid
        except NotFound:
            return False

    async def abort_incoming(self, mid: str) -> None:
        try:
            name = self._incoming_vm(mid)
        except NotFound:
            self.incoming_active.discard(mid)
            self.incoming_sources.forget(mid)
            return
        if self.manager.store.get(name).committed_migration == mid:
            raise Conflict(f"migration {mid} is already committed on {self.host}: the VM runs here")
        # From here a commit of this migration is refused (no await between the check above and this).
        self.incoming_aborting.add(mid)
        self.incoming_active.discard(mid)
        try:
            await self.manager.stop(name, force=True)
        except (Conflict, NotFound):
            pass  # not running; or gone: the manager forgets a shadow as soon as its QEMU has exited
        try:
            await self.manager.delete(name)
        except NotFound:
            pass  # the manager forgets a shadow by itself once its QEMU has exited
        finally:
            self.incoming_aborting.discard(mid)
        self.incoming_sources.forget(mid)


def as_record_json(rec: MigrationRecord) -> dict:
    return _record_to_json(rec)


__all__ = ["Cancelled", "MigrationService", "Unreachable", "as_record_json", "facts_to_json"]
