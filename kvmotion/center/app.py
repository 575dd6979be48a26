"""The center's HTTP API (FastAPI), served by kvmotion.api.serving: TLS with client certificates
optional at the handshake (Security.optional_client_cert), so that a host without a certificate
can join and a user without one can log in. Every route needs an identity from a certificate of
the cluster CA, but three: GET /v1/ca (the CA certificate, public: a client checks it against its
pin before it sends any secret), POST /v1/join (a join token) and POST /v1/login (a password).
The OpenAPI document and /docs need an identity too.

Handlers are plain `def`s: FastAPI runs them in worker threads, where the store's calls block.
Every mutating call is in the audit log (kvmotion.api.serving.Guard) and changes of state are
events in the store; successful heartbeats (every 2 s per host) are left out of the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from kvmotion import __version__
from kvmotion.api.center import (
    NAME_PATTERN,
    TASK_ID_PATTERN,
    TOKEN_ID_PATTERN,
    Alive,
    CaInfo,
    ClusterSettings,
    DatastoreSpec,
    DatastoreView,
    EventPage,
    Heartbeat,
    HeartbeatAnswer,
    HostView,
    JoinAnswer,
    JoinRequest,
    LoginAnswer,
    LoginRequest,
    MigrateRequest,
    SettingsUpdate,
    TaskStarted,
    TaskState,
    TaskView,
    TokenCreate,
    TokenCreated,
    TokenView,
    UserAdd,
    UserAdded,
    UserView,
    VmCreate,
    VmCreated,
    VmView,
)
from kvmotion.api.identity import ADMINISTER, HOSTS, INSECURE, OPERATE, VIEW, Identity
from kvmotion.api.serving import AuthorizedRoute, allow
from kvmotion.center.dispatcher import Dispatcher
from kvmotion.center.heartbeat import HeartbeatController
from kvmotion.center.service import Center
from kvmotion.center.tasks import Tasks
from kvmotion.core.errors import Forbidden

QUIET_SUFFIXES = ("/heartbeat", "/alive")  # Security.quiet for the center's listener: a host's beats

HostName = Annotated[str, Path(pattern=NAME_PATTERN)]
DatastoreName = Annotated[str, Path(pattern=NAME_PATTERN)]
TokenIdPath = Annotated[str, Path(pattern=TOKEN_ID_PATTERN)]
VmName = Annotated[str, Path(pattern=NAME_PATTERN)]
TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN)]
FOLLOW_POLL = 0.5  # seconds between looks at the store while following events
KEEPALIVE = 15.0  # seconds: at most this long without a byte on a followed event stream


def _note_caller(request: Request, text: str) -> None:
    """Who the audit log names for a call made without a certificate (join, login)."""
    request.scope.setdefault("state", {})["kvmotion_caller"] = text


def create_app(center: Center, controller: HeartbeatController | None = None,
               dispatcher: Dispatcher | None = None) -> FastAPI:
    """The app; `controller` (default: one over center.store with center.clock) and `dispatcher`
    (none by default: tasks then stay queued) run in its lifespan."""
    control = controller or HeartbeatController(center.store, clock=center.clock)
    control.liveness = center  # Alive beats noted in memory reach the store through its ticks
    ops = Tasks(center.store, center.clock)
    stop = asyncio.Event()  # set when the app shuts down: followed event streams end too

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop.clear()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(control.run(stop), name="heartbeat controller")
            if dispatcher is not None:
                tasks.create_task(dispatcher.run(stop), name="dispatcher")
            try:
                yield
            finally:
                stop.set()  # the controllers end within one tick; the group waits for them

    app = FastAPI(title="kvmotion center", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.router.route_class = AuthorizedRoute  # callers checked before their bodies are read
    app.state.center = center
    app.state.controller = control
    app.state.dispatcher = dispatcher
    view = Depends(allow(VIEW, "read the cluster's state"))
    admin = Depends(allow(ADMINISTER, "manage the cluster"))
    operate = Depends(allow(OPERATE, "change VMs and migrate them"))

    # ---- documents (any identity) ----
    @app.get("/openapi.json", include_in_schema=False, dependencies=[view])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[view])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="kvmotion center")

    # ---- public ----
    @app.get("/v1/ca", summary="The cluster CA's certificate (public: check it against your pin)")
    def ca() -> CaInfo:
        return center.ca_info()

    @app.post("/v1/join", status_code=201, summary="A host joins with a token: its CSRs signed")
    def join(body: JoinRequest, request: Request) -> JoinAnswer:
        _note_caller(request, f"joining host:{body.name}")
        return center.join(body)

    @app.post("/v1/login", summary="A user logs in with a password: its CSR signed, with its role")
    def login(body: LoginRequest, request: Request) -> LoginAnswer:
        _note_caller(request, f"logging in user:{body.user}")
        return center.login(body)

    # ---- reads ----
    @app.get("/v1/settings", dependencies=[view])
    def settings() -> ClusterSettings:
        return center.settings()

    @app.get("/v1/hosts", dependencies=[view])
    def hosts() -> list[HostView]:
        return center.hosts()

    @app.get("/v1/hosts/{name}", dependencies=[view])
    def host(name: HostName) -> HostView:
        return center.host(name)

    @app.get("/v1/datastores", dependencies=[view])
    def datastores() -> list[DatastoreView]:
        return center.datastores()

    # follow=1 is left out of the OpenAPI document: a generated client (or fuzzer) reading the whole
    # answer would wait for ever; the summary says it is there.
    @app.get("/v1/events", dependencies=[view], response_model=EventPage,
             summary="A page of events; with ?follow=1 a stream of them (server-sent events: a `data:` line "
                     "with each event's JSON, a comment at least every 15 s)")
    def events(since: Annotated[int, Query(ge=0, le=1 << 62, description="the `next` of the page before")] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               follow: Annotated[bool, Query(include_in_schema=False)] = False,
               ) -> EventPage | StreamingResponse:
        if follow:
            return StreamingResponse(_follow(since), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})
        return center.events(since, limit)

    async def _follow(since: int) -> AsyncIterator[str]:
        """Each new event as one `data:` line; a comment line at least every KEEPALIVE seconds (so a
        client and any proxy see the stream alive); ends when the center stops."""
        quiet = 0.0
        while not stop.is_set():
            page = await asyncio.to_thread(center.events, since, 1000)
            for event in page.events:
                yield f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"
            since = page.next
            if page.events:
                quiet = 0.0
                continue
            if quiet >= KEEPALIVE:
                yield ": keep-alive\n\n"
                quiet = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_POLL):
                    await stop.wait()
            quiet += FOLLOW_POLL

    # ---- VMs, migrations, tasks ----
    @app.get("/v1/vms", dependencies=[view], response_model=list[VmView])
    def vms() -> Response:
        return Response(ops.vm_list_json(), media_type="application/json")

    @app.get("/v1/vms/{name}", dependencies=[view])
    def vm(name: VmName) -> VmView:
        return ops.vm(name)

    @app.post("/v1/vms", status_code=201, summary="Define a VM on a host (named, or chosen by placement)")
    def create_vm(body: VmCreate, who: Identity = operate) -> VmCreated:
        return ops.create_vm(body, who)

    @app.post("/v1/vms/{name}/start", status_code=202)
    def start_vm(name: VmName, who: Identity = operate) -> TaskView:
        return ops.power(name, True, who)

    @app.post("/v1/vms/{name}/stop", status_code=202)
    def stop_vm(name: VmName, who: Identity = operate) -> TaskView:
        return ops.power(name, False, who)

    @app.post("/v1/migrations", status_code=202, summary="Migrate a VM (to a named host, or one placement chooses)")
    def migrate(body: MigrateRequest, who: Identity = operate) -> TaskStarted:
        return ops.migrate(body, who)

    @app.get("/v1/tasks", dependencies=[view])
    def tasks(state: TaskState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[TaskView]:
        return ops.tasks(state, limit)

    @app.get("/v1/tasks/{task_id}", dependencies=[view])
    def task(task_id: TaskIdPath) -> TaskView:
        return ops.task(task_id)

    @app.post("/v1/tasks/{task_id}/cancel")
    def cancel_task(task_id: TaskIdPath, who: Identity = operate) -> TaskView:
        return ops.cancel(task_id, who)

    # ---- a host's own ----
    # A host's beats answer with the model's JSON as it is (response_model: the document only), not
    # validated again by FastAPI: every host, every few seconds.
    @app.post("/v1/hosts/{name}/heartbeat", response_model=HeartbeatAnswer,
              summary="A host's full report: its VMs, their load, its migrations")
    def heartbeat(name: HostName, beat: Heartbeat, who: Identity = Depends(allow(HOSTS, "send heartbeats"))) -> Response:
        if who is not INSECURE and not who.is_host(name):
            raise Forbidden(f"{who} may not send host {name}'s heartbeats: a host reports only for itself")
        return Response(center.heartbeat(name, beat).model_dump_json(), media_type="application/json")

    @app.post("/v1/hosts/{name}/alive", response_model=HeartbeatAnswer,
              summary="A host's beat between its full reports (answer.report: send one now)")
    async def alive(name: HostName, beat: Alive, who: Identity = Depends(allow(HOSTS, "send heartbeats"))) -> Response:
        if who is not INSECURE and not who.is_host(name):
            raise Forbidden(f"{who} may not send host {name}'s heartbeats: a host reports only for itself")
        answer = center.alive_in_memory(name, beat)  # the common case: no I/O, no worker thread
        if answer is None:
            answer = await asyncio.to_thread(center.alive, name, beat)
        return Response(answer.model_dump_json(), media_type="application/json")

    # ---- the admin's ----
    @app.patch("/v1/settings", summary="Change cluster settings (fields left out keep their values)")
    def update_settings(body: SettingsUpdate, who: Identity = admin) -> ClusterSettings:
        return center.update_settings(body, who)

    @app.delete("/v1/hosts/{name}", status_code=204)
    def remove_host(name: HostName, who: Identity = admin) -> None:
        center.remove_host(name, who)

    @app.post("/v1/datastores", status_code=201)
    def add_datastore(spec: DatastoreSpec, who: Identity = admin) -> DatastoreView:
        return center.add_datastore(spec, who)

    @app.delete("/v1/datastores/{name}", status_code=204)
    def remove_datastore(name: DatastoreName, who: Identity = admin) -> None:
        center.remove_datastore(name, who)

    @app.get("/v1/users", dependencies=[admin])
    def users() -> list[UserView]:
        return center.users()

    @app.post("/v1/users", status_code=201)
    def add_user(body: UserAdd, who: Identity = admin) -> UserAdded:
        return center.add_user(body, who)

    @app.get("/v1/tokens", dependencies=[admin])
    def tokens() -> list[TokenView]:
        return center.tokens()

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenCreate, who: Identity = admin) -> TokenCreated:
        return center.create_token(body, who)

    @app.delete("/v1/tokens/{token_id}", status_code=204)
    def delete_token(token_id: TokenIdPath, who: Identity = admin) -> None:
        center.delete_token(token_id, who)

    return app
