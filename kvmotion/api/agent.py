"""A host agent's API as its clients see it: VM states and status, host facts, and the clients
(the CLI and other agents talk to agents only through these)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx
from pydantic import BaseModel

from kvmotion.api.spec import VmSpec
from kvmotion.core import errors
from kvmotion.core.httpclient import default_ssl_context


class VmState(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"  # shadow VM waiting for a migration stream
    MIGRATING = "migrating"  # source of a migration in progress
    STOPPING = "stopping"
    CRASHED = "crashed"  # QEMU exited without being asked to


@dataclass(frozen=True)
class VmStatus:
    name: str
    state: VmState
    host: str
    memory: int
    vcpus: int
    pid: int | None
    started_at: float | None
    ready: bool
    spec: VmSpec


@dataclass(frozen=True)
class HostInfo:
    name: str
    version: str
    accel: str
    accel_reason: str
    qemu_user: str  # who the VMs' QEMU processes run as (kvmotion.qemu.confine)
    qemu_user_reason: str
    memory_total: int
    memory_available: int
    memory_committed: int
    cpus: int
    cpu_model_name: str
    cpu_features: list[str]
    portgroups: dict[str, str]
    datastores: list[str]  # datastores of the cluster registry this host reaches now
    vms: int

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> HostInfo:
        return HostInfo(**{f: data[f] for f in HostInfo.__dataclass_fields__})


def status_from_json(data: Mapping[str, Any]) -> VmStatus:
    return VmStatus(
        name=data["name"],
        state=VmState(data["state"]),
        host=data["host"],
        memory=int(data["memory"]),
        vcpus=int(data["vcpus"]),
        pid=data.get("pid"),
        started_at=data.get("started_at"),
        ready=bool(data.get("ready")),
        spec=VmSpec.from_json(data["spec"]),
    )


_KINDS = {
    cls.__name__: cls
    for cls in (
        errors.KvmotionError, errors.InvalidInput, errors.NotFound, errors.Conflict,
        errors.InsufficientResources, errors.Unreachable, errors.SetupError, errors.VmFailed,
        errors.MigrationError, errors.PrecheckFailed, errors.LeaseError,
    )
}


def raise_for_error(response: httpx.Response, agent: str) -> None:
    """Re-raise the agent's error as the same KvmotionError subclass, with its message."""
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
        cls = _KINDS.get(err["kind"], errors.KvmotionError)
        raise cls(err["message"])
    except (ValueError, KeyError, TypeError):
        raise errors.KvmotionError(f"agent {agent} answered HTTP {response.status_code}: {response.text[:200]}") from None


def _body(body: BaseModel | None) -> dict[str, Any]:
    """A request's body: a wire model as JSON (its own serialization), never a hand-made dict."""
    if body is None:
        return {}
    return {"content": body.model_dump_json(), "headers": {"content-type": "application/json"}}


def _unreachable(url: str, exc: Exception) -> errors.Unreachable:
    return errors.Unreachable(f"host agent at {url} is not reachable ({type(exc).__name__}: {exc or 'no answer'})")


class AgentClient:
    """Synchronous client (CLI)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=ssl_context or default_ssl_context(), timeout=timeout)

    def request(self, method: str, path: str, *, body: BaseModel | None = None, params: dict | None = None,
                timeout: float | None = None) -> Any:
        """The decoded JSON answer (None for an empty one); the agent's error re-raised."""
        try:
            r = self._http.request(method, path, params=params, timeout=timeout or self._http.timeout, **_body(body))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        raise_for_error(r, self.url)
        return r.json() if r.content else None

    def host(self) -> HostInfo:
        return HostInfo.from_json(self.request("GET", "/v1/host"))

    def vms(self) -> list[VmStatus]:
        return [status_from_json(d) for d in self.request("GET", "/v1/vms")]

    def vm(self, name: str) -> VmStatus:
        return status_from_json(self.request("GET", f"/v1/vms/{name}"))

    def create(self, spec: VmSpec) -> VmStatus:
        return status_from_json(self.request("POST", "/v1/vms", body=spec))

    def start(self, name: str, wait_ready: bool = False, timeout: float = 60.0) -> VmStatus:
        data = self.request(
            "POST", f"/v1/vms/{name}/start", params={"wait_ready": wait_ready, "timeout": timeout}, timeout=timeout + 30
        )
        return status_from_json(data)

    def stop(self, name: str, force: bool = False) -> VmStatus:
        return status_from_json(self.request("POST", f"/v1/vms/{name}/stop", params={"force": force}, timeout=60))

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/v1/vms/{name}")

    def close(self) -> None:
        self._http.close()


class AsyncAgentClient:
    """Asynchronous client (agent to agent, inside the agent's event loop)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, verify=ssl_context or default_ssl_context(), timeout=timeout)

    async def request(self, method: str, path: str, *, body: BaseModel | None = None, params: dict | None = None,
                      timeout: float | None = None) -> Any:
        """The decoded JSON answer (None for an empty one); the agent's error re-raised."""
        try:
            r = await self._http.request(method, path, params=params, timeout=timeout or self._http.timeout, **_body(body))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        raise_for_error(r, self.url)
        return r.json() if r.content else None

    async def host(self) -> HostInfo:
        return HostInfo.from_json(await self.request("GET", "/v1/host"))

    async def aclose(self) -> None:
        await self._http.aclose()
