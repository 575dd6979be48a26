"""The datastore's HTTP control API (JSON), served next to the NBD port by `datastore serve`.

Handlers are plain `def`s: FastAPI runs them in its thread pool, because a lease change may
wait on the lease lock (an in-flight write) and fdatasync the disk.
Errors come back as {"error": <kvmotion error class>, "message": <one line>} with a status
that matches; DatastoreClient turns them back into the same exceptions.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from kvmotion.errors import (
    Conflict,
    InsufficientResources,
    InvalidInput,
    KvmotionError,
    LeaseError,
    NotFound,
)
from kvmotion.storage.address import API_PREFIX
from kvmotion.storage.datastore import Datastore

_STATUS: dict[type[KvmotionError], int] = {
    InvalidInput: 400,
    NotFound: 404,
    Conflict: 409,
    LeaseError: 409,
    InsufficientResources: 507,
}


class CreateDisk(BaseModel):
    name: str
    size: int
    prealloc: bool = False


class Acquire(BaseModel):
    host: str
    vm: str


class HostOnly(BaseModel):
    host: str


class Transfer(BaseModel):
    from_host: str
    to_host: str
    vm: str
    generation: int | None = None  # only if the lease is still this generation


def create_app(ds: Datastore) -> FastAPI:
    app = FastAPI(title=f"kvmotion datastore {ds.name}", docs_url=None, redoc_url=None)

    @app.exception_handler(KvmotionError)
    def _kvmotion_error(request: Request, exc: KvmotionError) -> JSONResponse:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"bad request to {request.url.path}: {where}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": "InvalidInput", "message": message}, status_code=400)

    @app.get(f"{API_PREFIX}/info")
    def info() -> dict[str, object]:
        return {"name": ds.name, "lease_ttl": ds.ttl, "now": time.time()}

    @app.get(f"{API_PREFIX}/disks")
    def list_disks() -> list[dict[str, object]]:
        return [d.to_dict() for d in ds.list_disks()]

    @app.post(f"{API_PREFIX}/disks")
    def create_disk(body: CreateDisk) -> dict[str, object]:
        return ds.create_disk(body.name, body.size, body.prealloc).to_dict()

    @app.get(f"{API_PREFIX}/disks/{{disk}}")
    def get_disk(disk: str) -> dict[str, object]:
        return ds.disk(disk).to_dict()

    @app.delete(f"{API_PREFIX}/disks/{{disk}}")
    def delete_disk(disk: str) -> dict[str, object]:
        ds.delete_disk(disk)
        return {}

    @app.post(f"{API_PREFIX}/disks/{{disk}}/acquire")
    def acquire(disk: str, body: Acquire) -> dict[str, object]:
        return ds.acquire(disk, body.host, body.vm).to_dict()

    @app.post(f"{API_PREFIX}/disks/{{disk}}/renew")
    def renew(disk: str, body: HostOnly) -> dict[str, object]:
        return ds.renew(disk, body.host).to_dict()

    @app.post(f"{API_PREFIX}/disks/{{disk}}/transfer")
    def transfer(disk: str, body: Transfer) -> dict[str, object]:
        return ds.transfer(disk, body.from_host, body.to_host, body.vm, body.generation).to_dict()

    @app.post(f"{API_PREFIX}/disks/{{disk}}/release")
    def release(disk: str, body: HostOnly) -> dict[str, object]:
        ds.release(disk, body.host)
        return {}

    return app
