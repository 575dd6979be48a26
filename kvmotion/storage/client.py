"""Client of a datastore's control API: disks and write leases (the data path is NBD)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from kvmotion import errors
from kvmotion.errors import KvmotionError, Unreachable
from kvmotion.httpclient import default_ssl_context
from kvmotion.storage.address import API_PREFIX
from kvmotion.storage.datastore import DiskInfo
from kvmotion.storage.lease import Lease, check_disk_name

# Error classes the server may name in a response; anything else becomes a plain KvmotionError.
_ERRORS: dict[str, type[KvmotionError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidInput,
        errors.NotFound,
        errors.Conflict,
        errors.LeaseError,
        errors.InsufficientResources,
    )
}


@dataclass(frozen=True)
class DatastoreInfo:
    name: str
    lease_ttl: float  # seconds a lease lives without renewal
    now: float  # the datastore's clock when it answered


class DatastoreClient:
    """`DatastoreClient("http://10.77.0.1:10810")`; every call is one HTTP request."""

    def __init__(self, control_url: str, timeout: float = 10.0, http: httpx.Client | None = None) -> None:
        self.control_url = control_url.rstrip("/")
        # A lease change waits for in-flight writes and an fdatasync: allow for it when reading.
        self._http = http or httpx.Client(
            base_url=self.control_url, timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            verify=default_ssl_context(),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "DatastoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, object] | None = None) -> object:
        try:
            resp = self._http.request(method, f"{API_PREFIX}{path}", json=body)
        except httpx.TimeoutException:
            raise Unreachable(f"datastore at {self.control_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise Unreachable(
                f"datastore at {self.control_url} is unreachable ({exc or type(exc).__name__}); "
                "is `kvmotion datastore serve` running there?"
            ) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.is_success:
            return data
        if isinstance(data, dict) and "message" in data:
            raise _ERRORS.get(str(data.get("error")), KvmotionError)(str(data["message"]))
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
        d = self._call("POST", "/disks", {"name": name, "size": size, "prealloc": prealloc})
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

    def _lease(self, disk: str, op: str, body: dict[str, object]) -> Lease:
        d = self._call("POST", f"/disks/{check_disk_name(disk)}/{op}", body)
        assert isinstance(d, dict)
        return Lease.from_dict(d)

    def acquire(self, disk: str, host: str, vm: str) -> Lease:
        return self._lease(disk, "acquire", {"host": host, "vm": vm})

    def renew(self, disk: str, host: str) -> Lease:
        return self._lease(disk, "renew", {"host": host})

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None) -> Lease:
        """Move the write lease at switchover; when it returns, `from_host` can no longer write.
        With `generation`, only if the lease is still that generation (see LeaseTable.transfer)."""
        return self._lease(disk, "transfer", {"from_host": from_host, "to_host": to_host, "vm": vm, "generation": generation})

    def release(self, disk: str, host: str) -> None:
        self._call("POST", f"/disks/{check_disk_name(disk)}/release", {"host": host})
