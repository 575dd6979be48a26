"""The center's HTTP API (FastAPI), served by kvmotion.api.serving: TLS with client certificates
optional at the handshake (Security.optional_client_cert), so that a host without a certificate
can join and a user without one can log in. Every route needs an identity from a certificate of
the cluster CA, but four: GET /v1/ca (the CA certificate, public: a client checks it against its
pin before it sends any secret), POST /v1/join and POST /v1/datastores/join (a join token) and
POST /v1/login (a password). The OpenAPI document, /docs and /metrics (Prometheus) need an identity too.

Handlers are plain `def`s: FastAPI runs them in worker threads, where the store's calls block.
Every mutating call is in the audit log (kvmotion.api.serving.Guard) and changes of state are
events in the store; successful heartbeats (every 2 s per host) are left out of the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry

from kvmotion import __version__
from kvmotion.api.center import (
    NAME_PATTERN,
    TASK_ID_PATTERN,
    TOKEN_ID_PATTERN,
    Alive,
    CaInfo,
    ClusterSettings,
    DatastoreJoinAnswer,
    DatastoreJoinRequest,
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
from kvmotion.api.metrics import CONTENT_TYPE, new_registry, render
from kvmotion.api.operations import (
    RULE_PATTERN,
    DrsApplied,
    DrsApply,
    DrsConfig,
    DrsStatus,
    HealthReport,
    HostHealth,
    MaintenanceAnswer,
    MaintenanceExit,
    MaintenanceRequest,
    RuleSpec,
    RuleView,
)
from kvmotion.api.serving import AuthorizedRoute, allow
from kvmotion.api.web import (
    LOADS_EVENT,
    SESSION_COOKIE,
    SESSION_TTL,
    Destinations,
    MigrationDetail,
    SessionInfo,
    SessionLogin,
    SessionView,
    SigninToken,
)
from kvmotion.center import static, webviews
from kvmotion.center.dispatcher import Dispatcher
from kvmotion.center.heartbeat import HeartbeatController
from kvmotion.center.metrics import CenterCollector
from kvmotion.center.operations import Operations
from kvmotion.center.service import Center
from kvmotion.center.sessions import Sessions
from kvmotion.center.tasks import Tasks
from kvmotion.core.errors import Forbidden, InvalidInput, NotFound

QUIET_SUFFIXES = ("/heartbeat", "/alive")  # Security.quiet for the center's listener: a host's beats

HostName = Annotated[str, Path(pattern=NAME_PATTERN)]
DatastoreName = Annotated[str, Path(pattern=NAME_PATTERN)]
TokenIdPath = Annotated[str, Path(pattern=TOKEN_ID_PATTERN)]
VmName = Annotated[str, Path(pattern=NAME_PATTERN)]
TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN)]
RuleNamePath = Annotated[str, Path(pattern=RULE_PATTERN)]
FOLLOW_POLL = 0.5  # seconds between looks at the store while following events
KEEPALIVE = 15.0  # seconds: at most this long without a byte on a followed event stream


def _note_caller(request: Request, text: str) -> None:
    """Who the audit log names for a call made without a certificate (join, login)."""
    request.scope.setdefault("state", {})["kvmotion_caller"] = text


def create_app(center: Center, controller: HeartbeatController | None = None,
               dispatcher: Dispatcher | None = None, operations_interval: float | None = 2.0,
               registry: CollectorRegistry | None = None) -> FastAPI:
    """The app; `controller` (default: one over center.store with center.clock), `dispatcher`
    (none by default: tasks then stay queued) and the operations controller (maintenance, health,
    DRS; every `operations_interval` seconds, None: not run) run in its lifespan. GET /metrics serves
    `registry` (default: a new one) with the center's collector in it."""
    control = controller or HeartbeatController(center.store, clock=center.clock)
    control.liveness = center  # Alive beats noted in memory reach the store through its ticks
    ops = Tasks(center.store, center.clock)
    operations = Operations(center.store, ops, center.clock)
    ops.predict = operations.predict  # a user's migration task records its prediction too
    stop = asyncio.Event()  # set when the app shuts down: followed event streams end too

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal stop
        stop = asyncio.Event()  # this loop's (an app served again runs in another loop)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(control.run(stop), name="heartbeat controller")
            if dispatcher is not None:
                tasks.create_task(dispatcher.run(stop), name="dispatcher")
            if operations_interval is not None:
                tasks.create_task(operations.run(stop, operations_interval), name="operations")
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
    metrics_registry = registry or new_registry()
    metrics_registry.register(CenterCollector(center))
    app.state.metrics = metrics_registry
    sessions = app.state.sessions = Sessions(center.store, center.passwords, center.clock)  # browsers' callers
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

    @app.get("/metrics", include_in_schema=False, dependencies=[view])
    def metrics() -> Response:
        return Response(render(metrics_registry), media_type=CONTENT_TYPE)

    # ---- public ----
    @app.get("/v1/ca", summary="The cluster CA's certificate (public: check it against your pin)")
    def ca() -> CaInfo:
        return center.ca_info()

    @app.post("/v1/datastores/join", status_code=201, summary="A datastore joins with a token: its CSR signed")
    def join_datastore(body: DatastoreJoinRequest, request: Request) -> DatastoreJoinAnswer:
        _note_caller(request, f"joining datastore:{body.name}")
        return center.join_datastore(body)

    @app.post("/v1/join", status_code=201, summary="A host joins with a token: its CSRs signed")
    def join(body: JoinRequest, request: Request) -> JoinAnswer:
        _note_caller(request, f"joining host:{body.name}")
        return center.join(body)

    @app.post("/v1/login", summary="A user logs in with a password: its CSR signed, with its role")
    def login(body: LoginRequest, request: Request) -> LoginAnswer:
        _note_caller(request, f"logging in user:{body.user}")
        return center.login(body)

    # ---- the web client: its files (public: they hold no data) and its sessions ----
    static.install(app)

    @app.post("/v1/sessions", summary="Sign in to the web client (a password, or a one-time sign-in token): "
                                      "a session cookie and its CSRF token")
    def sign_in(body: SessionLogin, request: Request, response: Response) -> SessionView:
        _note_caller(request, f"signing in user:{body.user}" if body.user else "signing in with a token")
        view, cookie = sessions.sign_in(body)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(SESSION_TTL), path="/", secure=not center.insecure,
                            httponly=True, samesite="strict")
        return view

    @app.get("/v1/sessions/current", dependencies=[view], summary="Who the session's cookie names")
    def session(request: Request) -> SessionInfo:
        row = sessions.view(request)
        if row is None or row.role is None:  # a caller known by its certificate
            raise NotFound("no session: this caller is known by its certificate (sign in at / for one)")
        return SessionInfo(user=row.user, role=row.role, expires=row.expires)

    @app.delete("/v1/sessions/current", status_code=204, dependencies=[view], summary="Sign out")
    def sign_out(request: Request, response: Response) -> None:
        sessions.sign_out(request)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=not center.insecure, httponly=True, samesite="strict")

    @app.post("/v1/sessions/signin", status_code=201,
              summary="A one-time sign-in token (5 min) for the caller's own user: `kvmotion center web-token`")
    def signin_token(who: Identity = view) -> SigninToken:
        return sessions.signin_token(who)

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

    # follow=1 (and loads=1 with it) is left out of the OpenAPI document: a generated client (or
    # fuzzer) reading the whole answer would wait for ever; the summary says it is there.
    @app.get("/v1/events", dependencies=[view], response_model=EventPage,
             summary="A page of events; with ?follow=1 a stream of them (server-sent events: a `data:` line "
                     "with each event's JSON and its `id:`, a comment at least every 15 s; with &loads=1 also a "
                     "`loads` event with the hosts' CPU and memory figures whenever a host's report changes them)")
    def events(since: Annotated[int, Query(ge=0, le=1 << 62, description="the `next` of the page before")] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               newest: Annotated[bool, Query(description="the newest `limit` events instead of those after `since`; "
                                                         "`next` is then where to follow from")] = False,
               follow: Annotated[bool, Query(include_in_schema=False)] = False,
               loads: Annotated[bool, Query(include_in_schema=False)] = False,
               last_event_id: Annotated[int | None, Header(ge=0, le=1 << 62, include_in_schema=False)] = None,
               ) -> EventPage | StreamingResponse:
        if follow:  # a browser's EventSource reconnecting says where it was (Last-Event-ID)
            if newest:
                raise InvalidInput("newest is for a page of events: follow from that page's next (since=NEXT)")
            return StreamingResponse(_follow(max(since, last_event_id or 0), loads), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})
        return center.events(since, limit, newest)

    async def _follow(since: int, loads: bool) -> AsyncIterator[str]:
        """Each new event as one `data:` line with its id; with `loads`, the hosts' loads (a `loads`
        event, no id) at the start and whenever a report changed them; a comment line at least every
        KEEPALIVE seconds (so a client and any proxy see the stream alive); ends when the center stops."""
        quiet = 0.0
        sent_loads = ""
        while not stop.is_set():
            page = await asyncio.to_thread(center.events, since, 1000)
            for event in page.events:
                yield f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"
            since = page.next
            if loads:
                text = (await asyncio.to_thread(lambda: webviews.host_loads(center.hosts()))).model_dump_json()
                if text != sent_loads:
                    yield f"event: {LOADS_EVENT}\ndata: {text}\n\n"
                    sent_loads, quiet = text, 0.0
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

    @app.get("/v1/vms/{name}/destinations", dependencies=[view],
             summary="Where the VM could migrate: each host's verdict, reasons and predicted time and downtime")
    def destinations(name: VmName) -> Destinations:
        return webviews.destinations(ops, center.store, name, operations.predict)

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

    @app.get("/v1/tasks/{task_id}/migration", dependencies=[view], response_model=MigrationDetail,
             summary="A migration task with the source agent's last record; with ?follow=1 a stream of it "
                     "(server-sent events, a `data:` line at each change) until the task ends")
    def migration_detail(task_id: TaskIdPath, follow: Annotated[bool, Query(include_in_schema=False)] = False,
                         ) -> MigrationDetail | StreamingResponse:
        first = webviews.migration_detail(ops, center.store, task_id)
        if follow:
            return StreamingResponse(_follow_migration(task_id, first), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})
        return first

    async def _follow_migration(task_id: str, detail: MigrationDetail) -> AsyncIterator[str]:
        last = ""
        quiet = 0.0
        while True:
            text = detail.model_dump_json()
            if text != last:
                yield f"data: {text}\n\n"
                last, quiet = text, 0.0
            elif quiet >= KEEPALIVE:
                yield ": keep-alive\n\n"
                quiet = 0.0
            if detail.task.state.terminal or stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_POLL):
                    await stop.wait()
            quiet += FOLLOW_POLL
            detail = await asyncio.to_thread(webviews.migration_detail, ops, center.store, task_id)

    @app.post("/v1/tasks/{task_id}/cancel")
    def cancel_task(task_id: TaskIdPath, who: Identity = operate) -> TaskView:
        return ops.cancel(task_id, who)

    # ---- maintenance, health, rules, DRS ----
    @app.post("/v1/hosts/{name}/maintenance", summary="Enter maintenance: the evacuation plan, run unless dry_run")
    def enter_maintenance(name: HostName, body: MaintenanceRequest, who: Identity = operate) -> MaintenanceAnswer:
        return operations.enter_maintenance(name, body, who)

    @app.post("/v1/hosts/{name}/maintenance/exit", summary="Exit maintenance, moving its VMs back if asked")
    def exit_maintenance(name: HostName, body: MaintenanceExit, who: Identity = operate) -> MaintenanceAnswer:
        return operations.exit_maintenance(name, body, who)

    @app.get("/v1/hosts/{name}/health", dependencies=[view])
    def health(name: HostName) -> HostHealth:
        return operations.health(name)

    @app.post("/v1/hosts/{name}/health", summary="A health provider's report on a component of a host")
    def report_health(name: HostName, body: HealthReport, who: Identity = operate) -> HostHealth:
        return operations.report_health(name, body, who)

    @app.get("/v1/rules", dependencies=[view])
    def rules() -> list[RuleView]:
        return operations.rules()

    @app.post("/v1/rules", status_code=201)
    def add_rule(body: RuleSpec, who: Identity = operate) -> RuleView:
        return operations.add_rule(body, who)

    @app.delete("/v1/rules/{name}", status_code=204)
    def remove_rule(name: RuleNamePath, who: Identity = operate) -> None:
        operations.remove_rule(name, who)

    @app.get("/v1/drs", dependencies=[view], summary="DRS: its configuration, the imbalance and its recommendations")
    def drs() -> DrsStatus:
        return operations.drs()

    @app.put("/v1/drs/config")
    def configure_drs(body: DrsConfig, who: Identity = admin) -> DrsConfig:
        return operations.configure_drs(body, who)

    @app.post("/v1/drs/apply", status_code=202)
    def apply_drs(body: DrsApply, who: Identity = operate) -> DrsApplied:
        return operations.apply_drs(body, who)

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
