"""Client of a host agent's API: the CLI and other agents talk to agents only through this."""

from __future__ import annotations

import ssl

import httpx

from kvmotion.core import errors
from kvmotion.core.httpclient import default_ssl_context
from kvmotion.host.resources import HostInfo
from kvmotion.host.vms import VmStatus, status_from_json
from kvmotion.core.jsonio import as_json
from kvmotion.qemu.spec import VmSpec

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


def _unreachable(url: str, exc: Exception) -> errors.Unreachable:
    return errors.Unreachable(f"host agent at {url} is not reachable ({type(exc).__name__}: {exc or 'no answer'})")


class AgentClient:
    """Synchronous client (CLI)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=ssl_context or default_ssl_context(), timeout=timeout)

    def request(self, method: str, path: str, *, json: object = None, params: dict | None = None, timeout: float | None = None) -> object:
        try:
            r = self._http.request(method, path, json=json, params=params, timeout=timeout or self._http.timeout)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        raise_for_error(r, self.url)
        return r.json() if r.content else None

    def host(self) -> HostInfo:
        return HostInfo.from_json(self.request("GET", "/v1/host"))  # type: ignore[arg-type]

    def vms(self) -> list[VmStatus]:
        return [status_from_json(d) for d in self.request("GET", "/v1/vms")]  # type: ignore[union-attr]

    def vm(self, name: str) -> VmStatus:
        return status_from_json(self.request("GET", f"/v1/vms/{name}"))  # type: ignore[arg-type]

    def create(self, spec: VmSpec) -> VmStatus:
        return status_from_json(self.request("POST", "/v1/vms", json=as_json(spec)))  # type: ignore[arg-type]

    def start(self, name: str, wait_ready: bool = False, timeout: float = 60.0) -> VmStatus:
        data = self.request(
            "POST", f"/v1/vms/{name}/start", params={"wait_ready": wait_ready, "timeout": timeout}, timeout=timeout + 30
        )
        return status_from_json(data)  # type: ignore[arg-type]

    def stop(self, name: str, force: bool = False) -> VmStatus:
        return status_from_json(self.request("POST", f"/v1/vms/{name}/stop", params={"force": force}, timeout=60))  # type: ignore[arg-type]

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/v1/vms/{name}")

    def close(self) -> None:
        self._http.close()


class AsyncAgentClient:
    """Asynchronous client (agent to agent, inside the agent's event loop)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, verify=ssl_context or default_ssl_context(), timeout=timeout)

    async def request(self, method: str, path: str, *, json: object = None, params: dict | None = None, timeout: float | None = None) -> object:
        try:
            r = await self._http.request(method, path, json=json, params=params, timeout=timeout or self._http.timeout)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        raise_for_error(r, self.url)
        return r.json() if r.content else None

    async def host(self) -> HostInfo:
        return HostInfo.from_json(await self.request("GET", "/v1/host"))  # type: ignore[arg-type]

    async def aclose(self) -> None:
        await self._http.aclose()
