"""Client of a datastore's control API: disks and write leases (the data path is NBD).

Over HTTPS the client presents a certificate of the cluster CA (`ssl_context`): a host's for lease
calls, which then act for that host; a user's for the CLI. Over plain HTTP (a datastore served
with --insecure) lease calls name their host in a header instead (`host`).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, ConfigDict, Field

from kvmotion.api.address import API_PREFIX, INSECURE_HOST_HEADER
from kvmotion.api.disks import DiskInfo, Lease, check_disk_name
from kvmotion.api.registry import DatastoreRef
from kvmotion.api.tls import cli_ssl_context, host_ssl_context
from kvmotion.core import errors
from kvmotion.core.errors import KvmotionError, Unreachable

# Error classes the server may name in a response; anything else becomes a plain KvmotionError.
_ERRORS: dict[str, type[KvmotionError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidInput,
        errors.NotFound,
        errors.Conflict,
        errors.LeaseError,
        errors.InsufficientResources,
        errors.Unauthorized,
        errors.Forbidden,
    )
}
# Idle connections are dropped before the server's keep-alive (server.KEEP_ALIVE) would close them
# under a request; renewals every few seconds keep one warm, so a switchover's lease transfer
# needs no TLS handshake.
KEEPALIVE_EXPIRY = 20.0


# ---- request bodies (the datastore's routes take them; kvmotion.storage.api) ----
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateDisk(_Body):
    name: str
    size: int = Field(gt=0)
    prealloc: bool = False


class Acquire(_Body):
    vm: str


class NoBody(_Body):
    """Renew and release carry nothing (an old client's {"host": ...} is refused, not ignored)."""


class Transfer(_Body):
    from_host: str
    to_host: str
    vm: str
    generation: int | None = None  # only if the lease is still this generation


@dataclass(frozen=True)
class DatastoreInfo:
    name: str
    lease_ttl: float  # seconds a lease lives without renewal
    now: float  # the datastore's clock when it answered


class DatastoreClient:
    """`DatastoreClient("https://10.77.0.1:10810", ssl_context=ctx)`; every call is one HTTP request."""

    def __init__(self, control_url: str, timeout: float = 10.0, http: httpx.Client | None = None, *,
                 ssl_context: ssl.SSLContext | None = None, host: str | None = None) -> None:
        self.control_url = control_url.rstrip("/")
        if http is None and self.control_url.startswith("https:") and ssl_context is None:
            raise errors.SetupError(f"datastore at {self.control_url}: HTTPS needs a certificate of the cluster CA")
        headers = {INSECURE_HOST_HEADER: host} if host and not self.control_url.startswith("https:") else {}
        # A lease change waits for in-flight writes and an fdatasync: allow for it when reading.
        # TCP_NODELAY: a request leaves as headers then body; on a kept connection Nagle would hold
        # the body back until the server's delayed ACK, 40 ms later (measured on lease transfers).
        transport = httpx.HTTPTransport(verify=ssl_context if ssl_context is not None else False,
                                        limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY),
                                        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = http or httpx.Client(
            base_url=self.control_url, timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            headers=headers, transport=transport,
        )
        if http is not None and headers:
            http.headers.update(headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DatastoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: BaseModel | None = None) -> object:
        content = None if body is None else body.model_dump_json()  # a wire model, never a hand-made dict
        try:
            resp = self._http.request(method, f"{API_PREFIX}{path}", content=content,
                                      headers=None if body is None else {"content-type": "application/json"})
        except httpx.TimeoutException:
            raise Unreachable(f"datastore at {self.control_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise Unreachable(
                f"datastore at {self.control_url} is unreachable ({exc or type(exc).__name__}); "
                "is `kvmotion datastore serve` running there, and does it trust this certificate?"
            ) from None
        if resp.status_code == 204:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.is_success:
            return data
        problem = data.get("error") if isinstance(data, dict) else None
        if isinstance(problem, dict) and "message" in problem:
            raise _ERRORS.get(str(problem.get("kind")), KvmotionError)(str(problem["message"]))
        raise KvmotionError(f"datastore at {self.control_url} answered HTTP {resp.status_code} to {path}")

    def info(self) -> DatastoreInfo:
        d = self._call("GET", "/info")
        assert isinstance(d, dict)
        return DatastoreInfo(str(d["name"]), float(d["lease_ttl"]), float(d["now"]))

    def reachable(self) -> bool:
        try:
            self.info()
        except KvmotionError:
            return False
        return True

    def create_disk(self, name: str, size: int, prealloc: bool = False) -> DiskInfo:
        d = self._call("POST", "/disks", CreateDisk(name=name, size=size, prealloc=prealloc))
        assert isinstance(d, dict)
        return DiskInfo.from_dict(d)

    def delete_disk(self, name: str) -> None:
        self._call("DELETE", f"/disks/{check_disk_name(name)}")

    def disk(self, name: str) -> DiskInfo:
        d = self._call("GET", f"/disks/{check_disk_name(name)}")
        assert isinstance(d, dict)
        return DiskInfo.from_dict(d)

    def list_disks(self) -> list[DiskInfo]:
        d = self._call("GET", "/disks")
        assert isinstance(d, list)
        return [DiskInfo.from_dict(x) for x in d]

    def _lease(self, disk: str, op: str, body: BaseModel | None = None) -> Lease:
        d = self._call("POST", f"/disks/{check_disk_name(disk)}/{op}", body)
        assert isinstance(d, dict)
        return Lease.from_dict(d)

    def acquire(self, disk: str, vm: str) -> Lease:
        """The write lease on `disk` for VM `vm` of the calling host."""
        return self._lease(disk, "acquire", Acquire(vm=vm))

    def renew(self, disk: str) -> Lease:
        return self._lease(disk, "renew")

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None) -> Lease:
        """Move the write lease at switchover (the caller is `from_host`), or take it back in a
        rollback (the caller is `to_host`, and handed it over); once this returns, `from_host`
        can no longer write. With `generation`, only if the lease is still that generation."""
        return self._lease(disk, "transfer", Transfer(from_host=from_host, to_host=to_host, vm=vm, generation=generation))

    def release(self, disk: str) -> None:
        self._call("POST", f"/disks/{check_disk_name(disk)}/release")


def client_for(ref: DatastoreRef, host: str | None = None, timeout: float = 10.0) -> DatastoreClient:
    """A client of datastore `ref`: as host `host` (an agent) or, without one, as the CLI's user."""
    if not ref.tls:
        return DatastoreClient(ref.control_url, timeout=timeout, host=host)
    ctx = host_ssl_context(host) if host else cli_ssl_context()
    return DatastoreClient(ref.control_url, timeout=timeout, ssl_context=ctx, host=host)
