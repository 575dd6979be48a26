"""The host agent's HTTP JSON API (FastAPI; OpenAPI document at /openapi.json, docs at /docs).

Errors are JSON `{"error": {"kind": <KvmotionError subclass>, "message": <one line>}}` so the
client can re-raise the same error class the agent raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from fastapi import Body, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from kvmotion import __version__, errors
from kvmotion.host import resources
from kvmotion.host.resources import HostInfo
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.jsonio import as_json
from kvmotion.migration.facts import datastores_reached
from kvmotion.qemu import accel as accel_mod
from kvmotion.qemu.spec import VmSpec

log = logging.getLogger("kvmotion.agent")

STATUS_OF = {
    errors.InvalidInput: 400,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.InsufficientResources: 409,
    errors.PrecheckFailed: 409,
    errors.LeaseError: 409,
    errors.Unreachable: 502,
}


def http_status(exc: errors.KvmotionError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def create_app(config: HostConfig, extra_routers=()) -> FastAPI:
    manager = VmManager(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.recover()
        yield
        await manager.shutdown()

    app = FastAPI(title="kvmotion host agent", version=__version__, lifespan=lifespan)
    app.state.manager = manager
    app.state.config = config

    @app.exception_handler(errors.KvmotionError)
    async def _kvmotion_error(request: Request, exc: errors.KvmotionError):
        return JSONResponse(status_code=http_status(exc), content={"error": {"kind": type(exc).__name__, "message": str(exc)}})

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error serving %s %s", request.method, request.url.path)
        message = f"internal error in agent {config.name}: {type(exc).__name__}: {exc}"
        return JSONResponse(status_code=500, content={"error": {"kind": "KvmotionError", "message": message}})

    @app.get("/v1/host")
    async def host_info() -> dict:
        mem = resources.meminfo()
        info = HostInfo(
            name=config.name,
            version=__version__,
            accel=config.accel.accel.value,
            accel_reason=config.accel.reason,
            qemu_user=manager.confinement.runs_as,
            qemu_user_reason=manager.confinement.reason,
            memory_total=mem.total,
            memory_available=mem.available,
            memory_committed=manager.committed_memory(),
            cpus=resources.cpu_count(),
            cpu_model_name=resources.cpu_model_name(),
            cpu_features=sorted(accel_mod.cpu_flags()),
            portgroups=dict(config.portgroups),
            datastores=sorted(await asyncio.to_thread(datastores_reached)),
            vms=len(manager.list()),
        )
        return as_json(info)

    @app.get("/v1/vms")
    async def list_vms() -> list:
        return [as_json(s) for s in manager.list()]

    @app.post("/v1/vms", status_code=201)
    async def create_vm(spec: dict = Body(...)) -> dict:
        return as_json(await manager.create(VmSpec.from_json(spec)))

    @app.get("/v1/vms/{name}")
    async def get_vm(name: str) -> dict:
        return as_json(manager.status(name))

    @app.post("/v1/vms/{name}/start")
    async def start_vm(name: str, wait_ready: bool = False, timeout: float = 60.0) -> dict:
        return as_json(await manager.start(name, wait_ready=wait_ready, timeout=timeout))

    @app.post("/v1/vms/{name}/stop")
    async def stop_vm(name: str, force: bool = False) -> dict:
        return as_json(await manager.stop(name, force=force))

    @app.delete("/v1/vms/{name}", status_code=204)
    async def delete_vm(name: str) -> None:
        await manager.delete(name)

    @app.websocket("/v1/vms/{name}/console")
    async def console(ws: WebSocket, name: str) -> None:
        await ws.accept()
        try:
            status = manager.status(name)
            if status.pid is None:
                raise errors.Conflict(f"VM {name} is not running")
            path = manager._paths(name).serial
            reader, writer = await asyncio.open_unix_connection(str(path))
        except (errors.KvmotionError, OSError) as exc:
            await ws.send_text(f"kvmotion: error: {exc}")
            await ws.close(code=1011)
            return

        async def pump_out() -> None:
            while data := await reader.read(4096):
                await ws.send_bytes(data)

        async def pump_in() -> None:
            while True:
                msg = await ws.receive_bytes()
                writer.write(msg)
                await writer.drain()

        tasks = [asyncio.create_task(pump_out()), asyncio.create_task(pump_in())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            for t in tasks:
                t.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await ws.close()

    for make_router in extra_routers:
        app.include_router(make_router(manager, config))
    return app
