"""Wire models of the center's browser routes: sessions (sign in with a password or a one-time
sign-in token the CLI issues), a VM's destinations with their prechecks and predictions, and a
migration task's detail (the source agent's last record: rounds, rates, throttle, summary), and the
hosts' loads the page's event stream carries (`loads` messages) as the hosts report them.

A session is a cookie (HttpOnly, SameSite=Strict) plus a CSRF token the page sends back in the
CSRF_HEADER of every mutating call; the center keeps both hashed. The calls below serve both
center clients (`client.call(web.create_signin_token())`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from kvmotion.api.center import (
    NAME_PATTERN,
    TASK_ID_PATTERN,
    Call,
    TaskView,
    UserName,
    Wire,
    path_name,
)
from kvmotion.api.identity import Role
from kvmotion.api.migration import Level

SESSION_COOKIE = "kvmotion_session"
CSRF_HEADER = "X-KVMotion-CSRF"
SIGNIN_PATTERN = r"^[A-Za-z0-9_-]{20,64}$"  # a one-time sign-in token (secrets.token_urlsafe)
SESSION_TTL = 8 * 3600.0  # seconds a browser session lasts
SIGNIN_TTL = 300.0  # seconds a sign-in token may wait to be used


class SessionLogin(Wire):
    """Sign in with a user and password, or with a one-time sign-in token (`kvmotion center web-token`)."""

    _what: ClassVar[str] = "sign-in request"
    user: UserName | None = None
    password: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    token: Annotated[str, Field(pattern=SIGNIN_PATTERN)] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> SessionLogin:
        by_password = self.user is not None and self.password is not None
        if by_password == (self.token is not None) or (self.user is None) != (self.password is None):
            raise ValueError("give a user and a password, or a sign-in token")
        return self


class SessionInfo(Wire):
    """Who a session is."""

    user: str
    role: Role
    expires: float


class SessionView(SessionInfo):
    """The signed-in user; `csrf` goes in the CSRF_HEADER of every mutating call of the session."""

    csrf: str


class SigninToken(Wire):
    """A one-time sign-in token for the caller's own user: open `path` on the center within `expires`."""

    token: str
    path: str  # "/#signin=TOKEN": the fragment never reaches a server or a log
    expires: float


# ---- the hosts' loads, on the page's event stream -------------------------------------------------------
LOADS_EVENT = "loads"  # the SSE event name of a HostLoads message (GET /v1/events?follow=1&loads=1)


class HostLoadView(Wire):
    """What a host's CPU and memory bars show, from its last full report (None: no report yet)."""

    host: str
    cpus: int | None = None
    cpu_demand: float | None = None  # CPUs its VMs kept busy
    memory_total: int | None = None
    memory_available: int | None = None


class HostLoads(Wire):
    hosts: tuple[HostLoadView, ...]


# ---- a VM's destinations -----------------------------------------------------------------------------
class Destination(Wire):
    host: str
    verdict: Level  # pass, warning (it may go, mind the reasons) or error (refused)
    reasons: tuple[str, ...] = ()  # why not (error) or what to mind (warning)
    score: float | None = None  # placement's load after the move (lower is better)
    predicted_s: float | None = None
    predicted_downtime_ms: float | None = None


class Destinations(Wire):
    vm: str
    source: str | None
    chosen: str | None  # what placement picks when none is named
    destinations: tuple[Destination, ...]


# ---- a migration's detail ---------------------------------------------------------------------------------
class RoundView(Wire):
    round: int
    wall_time: float  # s
    bytes_sent: int
    link_rate: float  # bytes/s
    dirty_rate: float  # bytes/s
    remaining: int
    throttle: float  # 0..1


class LiveProgress(Wire):
    round: int = 0
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    link_rate: float = 0.0
    dirty_rate: float = 0.0
    throttle: float = 0.0
    predicted_downtime_ms: float = 0.0
    elapsed: float = 0.0


class MigrationSummary(Wire):
    total_ms: float
    downtime_ms: float | None  # QEMU's: the source's part of the pause
    pause_ms: float | None = None  # the guest's downtime: source stopped -> destination resumed
    rounds: int
    bytes: int
    mean_link_rate: float
    peak_dirty_rate: float
    throttle_max: float
    converged: bool
    encrypted: bool


class CheckView(Wire):
    name: str
    level: Level
    reason: str


class MigrationDetail(Wire):
    """A migration task with what the source agent last said of it (phase "" before it started)."""

    task: TaskView
    agent_id: str | None = None
    phase: str = ""
    error: str | None = None
    checks: tuple[CheckView, ...] = ()  # the source agent's prechecks
    progress: LiveProgress = LiveProgress()
    rounds: tuple[RoundView, ...] = ()
    summary: MigrationSummary | None = None


# ---- calls ----------------------------------------------------------------------------------------------------
def create_signin_token() -> Call:
    return Call("POST", "/v1/sessions/signin", SigninToken)


def sign_in(request: SessionLogin) -> Call:
    return Call("POST", "/v1/sessions", SessionView, request)


def destinations(vm: str) -> Call:
    return Call("GET", f"/v1/vms/{path_name(vm, NAME_PATTERN, 'VM name')}/destinations", Destinations)


def migration_detail(task_id: str) -> Call:
    return Call("GET", f"/v1/tasks/{path_name(task_id, TASK_ID_PATTERN, 'task id')}/migration", MigrationDetail)

