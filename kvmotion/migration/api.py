"""Migration endpoints of a host agent: source side (check, start, progress, cancel, history) and
destination side (incoming, commit, abort).

Who may call what: users with the viewer role and peer hosts read (a destination's guard asks the
source about a migration); operators check, start and cancel; only hosts call the host-to-host
routes, and only for their own migrations: /v1/incoming from the host it names as the source,
commit and abort from the host that prepared that incoming migration.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from prometheus_client import CollectorRegistry

from kvmotion.api.identity import HOSTS, INSECURE, OPERATE, VIEW, Identity, Kind, Rule
from kvmotion.api.migration import (
    MID_PATTERN,
    NAME_PATTERN,
    CommitAnswer,
    IncomingAnswer,
    IncomingRequest,
    MigrationOptions,
    MigrationRequest,
)
from kvmotion.api.serving import AuthorizedRoute, allow
from kvmotion.core.errors import Forbidden
from kvmotion.core.jsonio import as_json
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.migration.engine import MigrationService, as_record_json, facts_to_json
from kvmotion.migration.metrics import MigrationCollector
from kvmotion.migration.policy import preset

OPERATE_OR_HOSTS = Rule(OPERATE.role, HOSTS.kinds)  # operators; a destination for its own migrations
MigrationId = Annotated[str, Path(pattern=MID_PATTERN, description="Migration id")]
VmName = Annotated[str, Path(pattern=NAME_PATTERN, description="VM on this host")]


def _options(body: MigrationRequest) -> MigrationOptions:
    """The request's options (InvalidInput: an unknown policy)."""
    preset(body.options.policy)
    return body.options.options()


def _peer_host(what: str):
    """A dependency: the calling host's name, if the caller is a host (403 otherwise). None on an
    --insecure listener, which knows no identities: there every caller may do everything."""
    def dependency(who: Identity = Depends(allow(HOSTS, what))) -> str | None:
        return None if who is INSECURE else who.name

    return dependency


def migration_router(manager: VmManager, config: HostConfig, listen_ip: str, limit: int,
                     keep: Callable[[MigrationService], None] | None = None,
                     registry: CollectorRegistry | None = None) -> APIRouter:
    """The routes over a new MigrationService; `keep` is handed the service (the heartbeats report its
    migrations); its metrics go into `registry` (the agent app's, served at /metrics)."""
    svc = MigrationService(manager, listen_ip, limit)
    if keep is not None:
        keep(svc)
    if registry is not None:
        registry.register(MigrationCollector(svc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # Inside the agent's own lifespan: VmManager.recover has run, and its shutdown comes after.
        async with svc.running():
            await svc.recover()
            yield

    return routes(svc, lifespan)


def routes(svc: MigrationService, lifespan: Any = None) -> APIRouter:
    # Callers checked before their bodies are read (AuthorizedRoute).
    router = APIRouter(prefix="/v1", route_class=AuthorizedRoute, lifespan=lifespan)
    view = [Depends(allow(VIEW, "read migrations"))]
    operate = [Depends(allow(OPERATE, "migrate VMs"))]

    @router.get("/migration/facts", dependencies=view)
    async def facts() -> dict:
        return facts_to_json(await svc.facts())

    @router.post("/migrations/check", dependencies=operate)
    async def check(body: MigrationRequest) -> list:
        _options(body)  # refuse bad options here too, as the migration itself would
        return [as_json(c) for c in await svc.check(body.vm, body.destination)]

    @router.post("/migrations", status_code=201, dependencies=operate)
    async def start(body: MigrationRequest) -> dict:
        return as_record_json(await svc.start(body.vm, body.destination, _options(body)))

    @router.get("/migrations", dependencies=view)
    async def history() -> list:
        return [as_record_json(r) for r in svc.history()]

    @router.get("/migrations/{mid}", dependencies=view)
    async def get(mid: MigrationId) -> dict:
        return as_record_json(svc.get(mid))

    @router.post("/migrations/{mid}/cancel")
    async def cancel(mid: MigrationId,
                     who: Identity = Depends(allow(OPERATE_OR_HOSTS, "cancel migrations"))) -> dict:
        if who is INSECURE or who.kind is not Kind.HOST:
            return as_record_json(svc.cancel(mid))
        # A destination gives up its side (its agent restarted): only for migrations to itself.
        if svc.get(mid).destination != who.name:
            raise Forbidden(f"host {who.name} may cancel only migrations to itself, not {mid}")
        return as_record_json(svc.cancel(mid, by=f"{who.name}, which gave up its shadow VM", stream_healthy=False))

    @router.post("/vms/{name}/migration/cancel", dependencies=operate)
    async def cancel_vm(name: VmName) -> dict:
        return as_record_json(svc.cancel_vm(name))

    @router.post("/incoming", status_code=201)
    async def incoming(body: IncomingRequest,
                       host: str | None = Depends(_peer_host("send this host migrations"))) -> IncomingAnswer:
        if host is not None and body.source != host:
            raise Forbidden(f"host {host} may not start a migration from {body.source}: a host sends only its own VMs")
        # Another major version was refused by IncomingRequest's validation, in one line.
        return await svc.prepare_incoming(body)

    @router.post("/incoming/{mid}/commit")
    async def commit(mid: MigrationId,
                     host: str | None = Depends(_peer_host("commit migrations to this host"))) -> CommitAnswer:
        svc.authorize_incoming(mid, host, "commit")
        return CommitAnswer(resumed_at=await svc.commit_incoming(mid))

    @router.delete("/incoming/{mid}", status_code=204)
    async def abort(mid: MigrationId, host: str | None = Depends(_peer_host("abort migrations to this host"))) -> None:
        svc.authorize_incoming(mid, host, "abort")
        await svc.abort_incoming(mid)

    return router
