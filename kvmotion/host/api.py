"""The host agent's HTTP JSON API (FastAPI; OpenAPI document at /openapi.json, docs at /docs).

Served by kvmotion.api.serving (mutual TLS, identities, limits, audit log). Each route says who
may call it: viewers and peer hosts read (Prometheus' /metrics too), operators change VMs. Errors are JSON
`{"error": {"kind": <KvmotionError subclass>, "message": <one line>}}` so the client can re-raise
the same error class the agent raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Response, WebSocket
from prometheus_client import CollectorRegistry

from kvmotion import __version__
from kvmotion.api.agent import HostInfo
from kvmotion.api.identity import OPERATE, VIEW, authorize
from kvmotion.api.metrics import CONTENT_TYPE, new_registry, render
from kvmotion.api.serving import AuthorizedRoute, allow, caller
from kvmotion.api.spec import NAME_PATTERN, VmSpec
from kvmotion.core import errors
from kvmotion.core.jsonio import as_json
from kvmotion.host import resources
from kvmotion.host.metrics import HostCollector
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.qemu import accel as accel_mod
from kvmotion.storage.host import reachable_datastores

log = logging.getLogger("kvmotion.agent")


# A VM's name in a path: the VM spec's rule (anything else names no VM).
VmName = Annotated[str, Path(pattern=NAME_PATTERN)]


class _ConsoleClosed(Exception):
    """The VM's serial socket reached its end."""


# A job the agent runs beside its API for as long as it serves (e.g. heartbeats to the center):
# called with the VM manager and an event set at shutdown, by which it must return.
Background = Callable[[VmManager, asyncio.Event], Awaitable[None]]


def create_app(config: HostConfig, extra_routers=(), background: Sequence[Background] = (),
               registry: CollectorRegistry | None = None) -> FastAPI:
    """The agent's app; GET /metrics serves `registry` (default: a new one; pass the one the
    extra routers register their collectors in) with the host's and its VMs' figures added."""
    manager = VmManager(config)
    metrics_registry = registry or new_registry()
    host_metrics = HostCollector(manager)
    metrics_registry.register(host_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.recover()
        stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as jobs:
                for job in background:
                    jobs.create_task(job(manager, stop))
                try:
                    yield
                finally:
                    stop.set()  # each job ends within its bounded wait; the group waits for them
        finally:
            await manager.shutdown()

    app = FastAPI(title="kvmotion host agent", version=__version__, lifespan=lifespan)
    app.router.route_class = AuthorizedRoute  # callers checked before their bodies are read
    view = [Depends(allow(VIEW, "read this host's state"))]
    operate = [Depends(allow(OPERATE, "change VMs"))]
    app.state.manager = manager
    app.state.config = config
    app.state.metrics = metrics_registry

    @app.get("/metrics", include_in_schema=False, dependencies=view)
    async def metrics() -> Response:
        await host_metrics.refresh()
        return Response(render(metrics_registry), media_type=CONTENT_TYPE)

    @app.get("/v1/host", dependencies=view)
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
            datastores=sorted(await asyncio.to_thread(reachable_datastores, config.name)),
            vms=len(manager.list()),
        )
        return as_json(info)

    @app.get("/v1/vms", dependencies=view)
    async def list_vms() -> list:
        return [as_json(s) for s in manager.list()]

    @app.post("/v1/vms", status_code=201, dependencies=operate)
    async def create_vm(spec: VmSpec) -> dict:
        return as_json(await manager.create(spec))

    @app.get("/v1/vms/{name}", dependencies=view)
    async def get_vm(name: VmName) -> dict:
        return as_json(manager.status(name))

    @app.post("/v1/vms/{name}/start", dependencies=operate)
    async def start_vm(
        name: VmName,
        wait_ready: bool = False,
        timeout: Annotated[float, Query(ge=1, le=600, description="seconds to wait for the guest's ready line")] = 60.0,
    ) -> dict:
        return as_json(await manager.start(name, wait_ready=wait_ready, timeout=timeout))

    @app.post("/v1/vms/{name}/stop", dependencies=operate)
    async def stop_vm(name: VmName, force: bool = False) -> dict:
        return as_json(await manager.stop(name, force=force))

    @app.delete("/v1/vms/{name}", status_code=204, dependencies=operate)
    async def delete_vm(name: VmName) -> None:
        await manager.delete(name)

    @app.websocket("/v1/vms/{name}/console")
    async def console(ws: WebSocket, name: str) -> None:
        try:
            authorize(caller(ws), OPERATE, "use VM consoles")
        except errors.KvmotionError as exc:
            await ws.close(code=1008, reason=str(exc)[:120])  # before accept: the client sees HTTP 403
            return
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
            raise _ConsoleClosed  # the serial socket closed (QEMU stopped): end the other pump too

        async def pump_in() -> None:
            while True:
                msg = await ws.receive_bytes()
                writer.write(msg)
                await writer.drain()

        try:
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(pump_out())
                pumps.create_task(pump_in())
        except* Exception:  # noqa: BLE001 - either side went away, in whichever form starlette or asyncio says it
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await ws.close()

    for make_router in extra_routers:
        app.include_router(make_router(manager, config))
    return app
