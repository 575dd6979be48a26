"""Migration endpoints of a host agent: source side (start, progress, cancel, history) and destination side (incoming)."""

from __future__ import annotations

from fastapi import APIRouter, Body

from kvmotion.errors import InvalidInput
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.jsonio import as_json
from kvmotion.migration.engine import MigrationService, as_record_json, facts_to_json
from kvmotion.migration.model import MigrationOptions
from kvmotion.migration.policy import Compression
from kvmotion.qemu.spec import VmSpec


def _options(data: dict) -> MigrationOptions:
    try:
        return MigrationOptions(**data)
    except TypeError as exc:
        raise InvalidInput(f"malformed migration options: {exc}") from exc


def migration_router(manager: VmManager, config: HostConfig, listen_ip: str, limit: int) -> APIRouter:
    svc = MigrationService(manager, listen_ip, limit)
    manager.after_recover.append(svc.recover)
    router = APIRouter(prefix="/v1")

    @router.get("/migration/facts")
    async def facts() -> dict:
        return facts_to_json(await svc.facts())

    @router.post("/migrations/check")
    async def check(body: dict = Body(...)) -> list:
        from kvmotion.cluster.tls import agent_client

        dest = agent_client(body["destination_url"])
        try:
            return [as_json(c) for c in await svc.check(body["vm"], dest, _options(body.get("options", {})))]
        finally:
            await dest.aclose()

    @router.post("/migrations", status_code=201)
    async def start(body: dict = Body(...)) -> dict:
        try:
            vm, dest, url = body["vm"], body["destination"], body["destination_url"]
        except KeyError as exc:
            raise InvalidInput(f"migration request lacks {exc}") from None
        return as_record_json(await svc.start(vm, dest, url, _options(body.get("options", {}))))

    @router.get("/migrations")
    async def history() -> list:
        return [as_record_json(r) for r in svc.history()]

    @router.get("/migrations/{mid}")
    async def get(mid: str) -> dict:
        return as_record_json(svc.get(mid))

    @router.post("/migrations/{mid}/cancel")
    async def cancel(mid: str) -> dict:
        return as_record_json(svc.cancel(mid))

    @router.post("/vms/{name}/migration/cancel")
    async def cancel_vm(name: str) -> dict:
        return as_record_json(svc.cancel_vm(name))

    @router.post("/incoming", status_code=201)
    async def incoming(body: dict = Body(...)) -> dict:
        spec = VmSpec.from_json(body.get("spec"))  # validated like POST /v1/vms (older peers' specs too)
        try:
            compression = Compression(body.get("compression", Compression.NONE.value))
        except ValueError:
            raise InvalidInput(f"unknown stream compression {body.get('compression')!r}: use one of "
                               f"{', '.join(c.value for c in Compression)}") from None
        uri = await svc.prepare_incoming(spec, body["migration_id"], body["source"], bool(body["encrypted"]),
                                         bool(body.get("postcopy")), compression)
        return {"uri": uri}

    @router.post("/incoming/{mid}/commit")
    async def commit(mid: str) -> dict:
        return {"resumed_at": await svc.commit_incoming(mid)}

    @router.delete("/incoming/{mid}", status_code=204)
    async def abort(mid: str) -> None:
        await svc.abort_incoming(mid)

    return router
