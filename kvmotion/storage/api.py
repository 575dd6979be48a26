"""The datastore's control API (JSON over mutual TLS), served next to the NBD port by `datastore serve`.

Who may do what (kvmotion.api.identity):
- info, list and show disks, /metrics (Prometheus): VIEW (users with any role, hosts);
- create and delete disks: users with role operator or higher;
- acquire, renew, release a lease: hosts only, always for the host named in their own
  certificate (no body names a host);
- transfer: hosts only, as the lease's holder handing it on, or as the host that handed it over
  taking it back (LeaseTable.transfer).
With --insecure there are no certificates: lease calls name their host in the Kvmotion-Host
header, a claim nobody checks (today's plain-text behaviour, behind a warning).

Handlers are plain `def`s: FastAPI runs them in its thread pool, because a lease change may wait
on the lease lock (an in-flight write) and fdatasync the disk. Errors have the shared shape
{"error": {"kind", "message"}} (kvmotion.api.serving); DatastoreClient turns them back into the
same exceptions.
"""

from __future__ import annotations

import time

from fastapi import Depends, FastAPI, Response
from pydantic import BaseModel, ConfigDict
from starlette.requests import HTTPConnection

from kvmotion.api.address import API_PREFIX, INSECURE_HOST_HEADER
from kvmotion.api.datastore import Acquire, CreateDisk, NoBody, Transfer
from kvmotion.api.disks import DiskInfo, Lease
from kvmotion.api.identity import HOSTS, OPERATE, VIEW, Identity, Kind
from kvmotion.api.metrics import CONTENT_TYPE, render
from kvmotion.api.serving import AuthorizedRoute, allow, caller_check
from kvmotion.core.errors import InvalidInput
from kvmotion.storage.datastore import Datastore
from kvmotion.storage.metrics import DatastoreMetrics

RENEW_SUFFIX = "/renew"  # left out of the audit log when it succeeds: every host renews every few seconds


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeaseOut(_Body):
    disk: str
    host: str
    vm: str
    generation: int
    expires_at: float
    handed_over_by: str | None = None

    @staticmethod
    def of(lease: Lease) -> LeaseOut:
        return LeaseOut(**lease.to_dict())  # type: ignore[arg-type]


class DiskOut(_Body):
    name: str
    size: int
    allocated: int
    generation: int
    lease: LeaseOut | None

    @staticmethod
    def of(d: DiskInfo) -> DiskOut:
        return DiskOut(name=d.name, size=d.size, allocated=d.allocated, generation=d.generation,
                       lease=LeaseOut.of(d.lease) if d.lease else None)


class InfoOut(_Body):
    name: str
    lease_ttl: float
    now: float


_hosts_only = caller_check(HOSTS, "change disk leases")


def lease_caller(conn: HTTPConnection) -> Identity:
    """The host a lease call acts for: the one its certificate names (or, with --insecure, the
    Kvmotion-Host header's claim)."""
    if conn.app.state.security.insecure:
        name = conn.headers.get(INSECURE_HOST_HEADER)
        if not name:
            raise InvalidInput(f"lease calls to an --insecure datastore name their host in the {INSECURE_HOST_HEADER} header")
        who = Identity(Kind.HOST, name)
        conn.scope.setdefault("state", {})["kvmotion_caller"] = f"{who} (claimed, --insecure)"
        return who
    return _hosts_only(conn)


lease_caller.checks_caller = True  # type: ignore[attr-defined]  # AuthorizedRoute runs it before the body is read


def create_app(ds: Datastore, metrics: DatastoreMetrics | None = None) -> FastAPI:
    """The control API; GET /metrics serves `metrics`' registry (default: new ones for `ds`)."""
    app = FastAPI(title=f"kvmotion datastore {ds.name}", docs_url=None, redoc_url=None)
    app.router.route_class = AuthorizedRoute  # callers checked before their bodies are read
    view = allow(VIEW, "read the datastore")
    counted = metrics or DatastoreMetrics(ds)
    app.state.metrics = counted

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(view)])
    def metrics_text() -> Response:
        return Response(render(counted.registry), media_type=CONTENT_TYPE)

    @app.get(f"{API_PREFIX}/info", dependencies=[Depends(view)])
    def info() -> InfoOut:
        return InfoOut(name=ds.name, lease_ttl=ds.ttl, now=time.time())

    @app.get(f"{API_PREFIX}/disks", dependencies=[Depends(view)])
    def list_disks() -> list[DiskOut]:
        return [DiskOut.of(d) for d in ds.list_disks()]

    @app.post(f"{API_PREFIX}/disks", dependencies=[Depends(allow(OPERATE, "create disks"))])
    def create_disk(body: CreateDisk) -> DiskOut:
        return DiskOut.of(ds.create_disk(body.name, body.size, body.prealloc))

    @app.get(f"{API_PREFIX}/disks/{{disk}}", dependencies=[Depends(view)])
    def get_disk(disk: str) -> DiskOut:
        return DiskOut.of(ds.disk(disk))

    @app.delete(f"{API_PREFIX}/disks/{{disk}}", status_code=204, dependencies=[Depends(allow(OPERATE, "delete disks"))])
    def delete_disk(disk: str) -> Response:
        ds.delete_disk(disk)
        return Response(status_code=204)

    @app.post(f"{API_PREFIX}/disks/{{disk}}/acquire")
    def acquire(disk: str, body: Acquire, who: Identity = Depends(lease_caller)) -> LeaseOut:
        return LeaseOut.of(counted.lease_call("acquire", lambda: ds.acquire(disk, who.name, body.vm)))

    @app.post(f"{API_PREFIX}/disks/{{disk}}{RENEW_SUFFIX}")
    def renew(disk: str, body: NoBody | None = None, who: Identity = Depends(lease_caller)) -> LeaseOut:
        return LeaseOut.of(counted.lease_call("renew", lambda: ds.renew(disk, who.name)))

    @app.post(f"{API_PREFIX}/disks/{{disk}}/transfer")
    def transfer(disk: str, body: Transfer, who: Identity = Depends(lease_caller)) -> LeaseOut:
        return LeaseOut.of(counted.lease_call(
            "transfer", lambda: ds.transfer(disk, body.from_host, body.to_host, body.vm, body.generation, by=who.name)))

    @app.post(f"{API_PREFIX}/disks/{{disk}}/release", status_code=204)
    def release(disk: str, body: NoBody | None = None, who: Identity = Depends(lease_caller)) -> Response:
        counted.lease_call("release", lambda: ds.release(disk, who.name))
        return Response(status_code=204)

    return app
