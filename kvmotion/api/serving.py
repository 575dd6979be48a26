"""What every kvmotion HTTP listener shares: mutual TLS with the cluster CA, the caller's identity
from its certificate, per-route authorization, request limits, an audit log and one error shape.

The agent API and the datastore's control API (and the center's, later) are served by
`make_server`. uvicorn verifies the client certificate against the cluster CA during the TLS
handshake (no certificate, or another CA's: no connection); its protocol classes are extended here
to hand the certificate to the application through the ASGI TLS extension
(scope["extensions"]["tls"]["client_cert_chain"]), where `caller` turns it into an Identity.

Errors on the wire: {"error": {"kind": <KvmotionError subclass>, "message": <one line>}}.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from kvmotion.api.identity import INSECURE, Identity, Rule, authorize, identity_of_der
from kvmotion.core import errors
from kvmotion.core.validation import describe_request_errors

log = logging.getLogger("kvmotion.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

STATUS_OF: dict[type[errors.KvmotionError], int] = {
    errors.InvalidInput: 422,  # as FastAPI answers a request its models refuse
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.InsufficientResources: 409,
    errors.PrecheckFailed: 409,
    errors.LeaseError: 409,
    errors.Unreachable: 502,
}
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def http_status(exc: errors.KvmotionError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"kind": kind, "message": message}}


@dataclass(frozen=True)
class Limits:
    """Per-listener limits (`host serve` / `datastore serve` flags)."""

    max_body: int = 1 << 20  # bytes of a request body
    max_connections_per_client: int = 32  # open connections from one client address
    max_connections: int = 512  # open connections in all

    def __post_init__(self) -> None:
        if not 1024 <= self.max_body <= 1 << 30:
            raise errors.InvalidInput(f"invalid request body limit {self.max_body}: use 1K to 1G")
        if not 1 <= self.max_connections_per_client <= self.max_connections <= 65536:
            raise errors.InvalidInput(
                f"invalid connection limits ({self.max_connections_per_client} per client, {self.max_connections} "
                "in all): use 1 <= per client <= in all <= 65536"
            )


@dataclass(frozen=True)
class Security:
    """How a listener authenticates: mutual TLS with `tls_files` (cert, key, CA), callers known by
    their certificates; or `insecure` (plain HTTP, every caller acts as an admin)."""

    tls_files: tuple[Path, Path, Path] | None
    audit_log: Path | None
    limits: Limits = field(default_factory=Limits)
    # TLS clients may come without a certificate (the center: join and login issue the first one);
    # one of another CA still gets no connection. Routes refuse callers without one (401).
    optional_client_cert: bool = False
    # Successful calls the audit log leaves out (path suffixes), e.g. lease renewals every few seconds.
    quiet: tuple[str, ...] = ()
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and self.tls_files is not None:
            raise errors.InvalidInput("a listener is either insecure or served with TLS files, not both")
        if self.tls_files is not None:
            for path in self.tls_files:
                if not path.exists():
                    raise errors.SetupError(f"TLS file {path} is missing: issue the certificate, or serve with --insecure")


def insecure_warning(what: str) -> str:
    return (f"WARNING: {what} serves plain HTTP with --insecure: no encryption, no authentication, every "
            "caller may do everything (trusted networks and benchmarks only)")


# ---- who is calling -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _identity_of_pem(pem: str) -> Identity:
    return identity_of_der(ssl.PEM_cert_to_DER_cert(pem))


def identity_from_scope(scope: Scope, security: Security) -> Identity:
    if security.insecure:
        return INSECURE
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        raise errors.Unauthorized("no client certificate: use a certificate of the cluster CA")
    return _identity_of_pem(chain[0])


class SessionAuth(Protocol):
    """Callers known by a session cookie (the center's browser sessions), when they show no certificate."""

    def identify(self, conn: HTTPConnection) -> Identity | None:
        """The caller (None: no session named); raises Unauthorized or Forbidden to refuse it."""
        ...


def _has_certificate(scope: Scope) -> bool:
    return bool((scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain"))


def caller(conn: HTTPConnection) -> Identity:
    """The identity of the caller of this request or websocket: its certificate's, or (an app with
    `app.state.sessions`, a caller without a certificate) its session's."""
    security: Security = conn.app.state.security
    sessions: SessionAuth | None = getattr(conn.app.state, "sessions", None)
    if sessions is not None and not security.insecure and not _has_certificate(conn.scope):
        who = sessions.identify(conn)
        if who is not None:
            return who
    return identity_from_scope(conn.scope, security)


def caller_check(rule: Rule, what: str) -> Callable[[HTTPConnection], Identity]:
    """The caller, if `rule` allows it to `what`; 403 otherwise. On an --insecure listener every
    caller is INSECURE and may do everything. (As a dependency: `allow`.)"""

    def check(conn: HTTPConnection) -> Identity:
        who = caller(conn)
        conn.scope.setdefault("state", {})["kvmotion_caller"] = str(who)
        return who if who is INSECURE else authorize(who, rule, what)

    return check


def allow(rule: Rule, what: str) -> Callable[[HTTPConnection], Awaitable[Identity]]:
    """A FastAPI dependency: caller_check's answer."""
    check = caller_check(rule, what)

    # async: FastAPI runs a plain def dependency in a worker thread, a hop that costs more than the check
    async def dependency(conn: HTTPConnection) -> Identity:
        return check(conn)

    dependency.checks_caller = check  # type: ignore[attr-defined]  # AuthorizedRoute runs it first
    return dependency


class AuthorizedRoute(APIRoute):
    """A route that runs its `allow` checks (its own and its dependencies') before FastAPI reads the
    request body: a caller it refuses gets 403 whatever it sent, and no body is parsed for it.
    (FastAPI reads the body before solving dependencies.) Use it as the route class of every
    router of a secured app: `APIRouter(route_class=AuthorizedRoute)`, `app.router.route_class`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks: list[Callable[[Request], Any]] = []
        pending = list(self.dependant.dependencies)
        while pending:
            dep = pending.pop()
            marker = getattr(dep.call, "checks_caller", None) if dep.call is not None else None
            if marker is True and dep.call is not None:  # a plain check
                checks.append(dep.call)
            elif callable(marker):  # the check an async dependency wraps
                checks.append(marker)
            pending.extend(dep.dependencies)
        if not checks:
            return handler

        async def checked(request: Request) -> Response:
            for check in checks:
                check(request)
            return await handler(request)

        return checked


# ---- errors ---------------------------------------------------------------------------------------
def request_error_message(request: Request, exc: RequestValidationError) -> str:
    """One line naming the refused field; the body is called what its model calls itself."""
    route = request.scope.get("route")
    model = getattr(getattr(getattr(route, "body_field", None), "field_info", None), "annotation", None)
    return describe_request_errors(exc.errors(), getattr(model, "_what", "request body"))


# The kind of error an HTTP status raised by the framework itself (no route, a body it cannot read) stands for.
KIND_OF_STATUS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict"}


def http_error_message(request: Request, exc: HTTPException) -> str:
    """One line for an HTTP error the framework raised before any route ran."""
    where = repr(request.scope.get("path", ""))[:80]  # repr: a decoded path may hold newlines
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"no API route {request.method} {where}: see /openapi.json"
    if exc.status_code == 405:
        return f"method {request.method} is not allowed on {where}: see /openapi.json"
    return f"{request.method} {where}: " + " ".join(str(exc.detail).split())


def install_error_handlers(app: FastAPI, service: str) -> None:
    @app.exception_handler(errors.KvmotionError)
    async def _kvmotion_error(request: Request, exc: errors.KvmotionError) -> JSONResponse:
        return JSONResponse(status_code=http_status(exc), content=error_body(type(exc).__name__, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=error_body("InvalidInput", request_error_message(request, exc)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = KIND_OF_STATUS.get(exc.status_code, "InvalidInput" if exc.status_code < 500 else "KvmotionError")
        return JSONResponse(status_code=exc.status_code, content=error_body(kind, http_error_message(request, exc)),
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error serving %s %s", request.method, request.url.path)
        message = f"internal error in {service}: {type(exc).__name__}"
        return JSONResponse(status_code=500, content=error_body("KvmotionError", message))


# ---- request limits and audit log (ASGI middleware) -----------------------------------------------
class AuditLog:
    """JSON lines: when, who, what, result. Appended with O_APPEND, one write per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, **entry: object) -> None:
        os.write(self._fd, (json.dumps(entry, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def _json_response(status: int, kind: str, message: str) -> tuple[Message, Message]:
    body = json.dumps(error_body(kind, message)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


class Guard:
    """Refuses bodies over the limit (413) before the application sees them, and writes every
    mutating call (and every websocket session) to the audit log with its result."""

    def __init__(self, app: Asgi, security: Security) -> None:
        self.app = app
        self.security = security
        self.audit = AuditLog(security.audit_log) if security.audit_log else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.time()
        audited = False

        def audit(status: int) -> None:
            nonlocal audited
            if not audited:
                audited = True
                self._audit(scope, started, status)

        async def send_tracked(message: Message) -> None:
            # Written before the response leaves: a client that has its answer finds the entry.
            if message["type"] == "http.response.start":
                audit(message["status"])
            elif message["type"] == "websocket.accept":
                audit(101)
            elif message["type"] == "websocket.close":
                audit(403)
            await send(message)

        try:
            if scope["type"] == "http":
                buffered = await self._buffered(scope, receive, send_tracked)
                if buffered is None:
                    return
                receive = buffered
            await self.app(scope, receive, send_tracked)
        finally:
            audit(0)  # the client went away before any answer

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (JSON requests are small) up to the limit, then replay it."""
        limit = self.security.limits.max_body
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            for message in _json_response(413, "InvalidInput", f"request body over the limit of {limit} bytes"):
                await send(message)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                for reply in _json_response(413, "InvalidInput", f"request body over the limit of {limit} bytes"):
                    await send(reply)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _audit(self, scope: Scope, started: float, status: int) -> None:
        if self.audit is None:
            return
        method = scope.get("method", "WEBSOCKET")
        if scope["type"] == "http" and method not in MUTATING:
            return
        path = scope.get("path", "")
        if 200 <= status < 300 and any(path.endswith(q) for q in self.security.quiet):
            return
        who = (scope.get("state") or {}).get("kvmotion_caller")
        if who is None:
            try:
                who = str(identity_from_scope(scope, self.security))
            except errors.KvmotionError:
                who = "unauthenticated"
        client = scope.get("client")
        self.audit.write(at=round(started, 3), who=who, method=method, path=path, status=status,
                         ms=round((time.time() - started) * 1000, 1), client=client[0] if client else None)


# ---- uvicorn: certificate into the scope, connections per client ----------------------------------
class _Connections:
    """Open connections per client address, shared by a server's protocol instances."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.by_transport: dict[int, str] = {}
        self.per_client: dict[str, int] = {}

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        if (self.per_client.get(client, 0) >= self.limits.max_connections_per_client
                or len(self.by_transport) >= self.limits.max_connections):
            log.warning("refused a connection from %s: connection limit (%d per client, %d in all)", client,
                        self.limits.max_connections_per_client, self.limits.max_connections)
            return False
        self.by_transport[id(transport)] = client
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        transport = getattr(transport, "raw", transport)  # the one admitted, under a _Coalescing
        client = self.by_transport.pop(id(transport), None)
        if client is not None:
            left = self.per_client[client] - 1
            if left:
                self.per_client[client] = left
            else:
                del self.per_client[client]


class _Coalescing:
    """A connection's transport whose writes within one step of the event loop leave together (a
    response's head and body: one TLS record and one send instead of two). Everything else is the
    transport's own; close() sends what waits first, abort() drops it."""

    def __init__(self, raw: asyncio.Transport) -> None:
        self.raw = raw
        self._waiting: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._flush)
        self._waiting.append(bytes(data))

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if self._waiting:
            data = b"".join(self._waiting)
            self._waiting.clear()
            if not self.raw.is_closing():
                self.raw.write(data)

    def close(self) -> None:
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._waiting.clear()
        self.raw.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _with_certificate(app: Asgi, transport: asyncio.BaseTransport) -> Asgi:
    """`app` for one connection: every scope gets the ASGI TLS extension with the client's certificate."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        return app
    tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)], "tls_version": ssl_object.version(),
           "cipher_suite": (ssl_object.cipher() or (None,))[0]}

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})["tls"] = tls
        await app(scope, receive, send)

    return wrapped


def _protocols(connections: _Connections) -> tuple[type, type]:
    class Http(HttpToolsProtocol):  # httptools: uvicorn's C parser
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn hands it TCP transports
            if not connections.admit(transport):
                transport.abort()
                return
            super().connection_made(transport)
            self.app = _with_certificate(self.app, transport)
            self.transport = _Coalescing(transport)  # type: ignore[assignment]  # a transport in all it does

        def connection_lost(self, exc: Exception | None) -> None:
            connections.release(self.transport)
            super().connection_lost(exc)

    class Ws(WebSocketsSansIOProtocol):
        # Made by Http on an upgrade, on the same (already admitted) transport.
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn hands it TCP transports
            super().connection_made(transport)
            self.app = _with_certificate(self.app, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.release(self.transport)
            super().connection_lost(exc)

    return Http, Ws


def secure(app: FastAPI, security: Security, service: str) -> Asgi:
    """`app` with the error shape, caller identities and the guard (limits, audit)."""
    app.state.security = security
    install_error_handlers(app, service)
    return Guard(app, security)


def make_server(app: FastAPI, security: Security, service: str, server_class: type[uvicorn.Server] = uvicorn.Server,
                **config: Any) -> uvicorn.Server:
    """A uvicorn server for `app` under `security` (serve it with server.serve(sockets=[...]));
    `server_class` e.g. to leave signal handling to the caller."""
    if not security.insecure and security.tls_files is None:
        raise errors.SetupError(f"{service} has no TLS certificate to serve with: issue one, or serve with --insecure")
    http, ws = _protocols(_Connections(security.limits))
    tls: dict[str, Any] = {}
    if security.tls_files is not None:
        cert, key, ca = security.tls_files
        tls = dict(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(ca),
                   ssl_cert_reqs=ssl.CERT_OPTIONAL if security.optional_client_cert else ssl.CERT_REQUIRED)
    config.setdefault("log_level", "warning")
    config.setdefault("access_log", False)  # the audit log records what matters; a line per heartbeat does not
    return server_class(uvicorn.Config(secure(app, security, service), http=http, ws=ws, **tls, **config))
