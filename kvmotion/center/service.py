"""The center's operations: what each API call does, between the wire models, the pure rules
(auth, liveness), the cluster CA and the store. Synchronous (the store is): the HTTP layer runs
them in worker threads, asyncio code through asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmotion.api.center import (
    PROTOCOL_VERSION,
    CaInfo,
    ClusterSettings,
    DatastoreSpec,
    DatastoreView,
    EventPage,
    Heartbeat,
    HeartbeatAnswer,
    HostLoad,
    HostState,
    HostView,
    JoinAnswer,
    JoinRequest,
    LoginAnswer,
    LoginRequest,
    TokenCreate,
    TokenCreated,
    TokenView,
    UserAdd,
    UserAdded,
    UserView,
    parse_token,
)
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import CA, cert_pem, load_csr, sha256_hex, sign_csr
from kvmotion.center import auth
from kvmotion.center.placement import cpu_demand
from kvmotion.center.store import HostRow, Store, TokenRow, UserRow
from kvmotion.core.errors import Conflict, InvalidInput, NotFound, Unauthorized

LOGIN_VALIDITY = dt.timedelta(days=7)  # a user logs in again weekly; a role change reaches old certificates by then
ADMIN = "admin"
SETTINGS_TTL = 2.0


@dataclass(frozen=True)
class FirstStart:
    """What the first start made and prints once."""

    admin_password: str
    token: str
    token_expires: float


def _token_view(row: TokenRow) -> TokenView:
    return TokenView(id=row.id, expires=row.expires, uses_left=row.uses_left, created=row.created,
                     created_by=row.created_by)


def _user_view(row: UserRow) -> UserView:
    return UserView(name=row.name, role=row.role, created=row.created)


def agent_url(address: str, port: int, secure: bool) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"{'https' if secure else 'http'}://{shown}:{port}"


class Center:
    """The center's operations over `store`, signing with `ca`. `clock`: wall-clock seconds."""

    def __init__(self, store: Store, ca: CA, *, insecure: bool = False, clock: Callable[[], float] = time.time,
                 password_cost: int = auth.SCRYPT_LOG2_N) -> None:
        self.store = store
        self.ca = ca
        self.insecure = insecure
        self.clock = clock
        self.passwords = auth.Passwords(password_cost)
        self.ca_pem = cert_pem(ca.cert)
        self._samples: dict[str, tuple[HostLoad, float]] = {}  # host -> its last load and when (CPU demand)
        self._settings_cache: tuple[float, ClusterSettings] | None = None
        self.ca_sha256 = sha256_hex(ca.cert)

    # ---- first start ----
    def bootstrap(self, settings: ClusterSettings) -> FirstStart | None:
        """On a store without users: user admin with a random password, a join token (24 h, any
        number of joins) and the settings, in one transaction. None on any later start."""
        if self.store.users():
            return None
        password = auth.new_password()
        now = self.clock()
        parts, row = auth.new_token(self.ca_sha256, now, auth.DEFAULT_TTL, None, "center")
        admin = UserRow(name=ADMIN, role=Role.ADMIN, password_hash=self.passwords.hash(password), created=now)
        if not self.store.bootstrap(admin, row, settings, now):
            return None  # another process got there first
        return FirstStart(admin_password=password, token=str(parts), token_expires=row.expires)

    # ---- public: CA, join, login ----
    def ca_info(self) -> CaInfo:
        return CaInfo(ca_cert=self.ca_pem, sha256=self.ca_sha256)

    def join(self, request: JoinRequest) -> JoinAnswer:
        """A host's certificates (host:NAME and qemu:NAME) for the keys of its CSRs, if its token
        may join now; the host is recorded in the same transaction that spends the token. A refused
        join changes nothing and returns nothing."""
        parts = parse_token(request.token)
        host_csr = load_csr(request.host_csr, "host CSR")
        qemu_csr = load_csr(request.qemu_csr, "QEMU CSR")
        if host_csr.public_key() == qemu_csr.public_key():
            raise InvalidInput("the host and QEMU CSRs carry the same key: QEMU needs a key of its own")
        now = self.clock()
        auth.check_token(parts, self.ca_sha256, self.store.token(parts.id), now)  # before any signing
        if self.store.host(request.name) is not None:
            raise Conflict(f"host {request.name} has joined already: remove it first (DELETE /v1/hosts/{request.name})")
        ips = (request.address,)
        host_cert = sign_csr(self.ca, host_csr, Identity(Kind.HOST, request.name), ips, server=True)
        qemu_cert = sign_csr(self.ca, qemu_csr, Identity(Kind.QEMU, request.name), ips, server=True)
        row = HostRow(name=request.name, address=request.address,
                      agent_url=agent_url(request.address, request.agent_port, not self.insecure),
                      state=HostState.NOT_RESPONDING, joined=now)
        joined = self.store.join(parts.id, lambda token: auth.check_token(parts, self.ca_sha256, token, now), row,
                                 f"host:{request.name}")
        return JoinAnswer(host=joined.view(), ca_cert=self.ca_pem, host_cert=cert_pem(host_cert),
                          qemu_cert=cert_pem(qemu_cert), settings=self.store.settings())

    def login(self, request: LoginRequest) -> LoginAnswer:
        """A user certificate carrying the role the store gives the user, for the key of the CSR."""
        csr = load_csr(request.csr, "CSR")
        user = self.store.user(request.user)
        if not self.passwords.check(request.password, user.password_hash if user else None) or user is None:
            raise Unauthorized("wrong user name or password")
        cert = sign_csr(self.ca, csr, Identity(Kind.USER, user.name, user.role), server=False, validity=LOGIN_VALIDITY)
        self.store.record_login(user.name, f"user:{user.name}", self.clock())
        return LoginAnswer(user=user.name, role=user.role, ca_cert=self.ca_pem, cert=cert_pem(cert),
                           expires=cert.not_valid_after_utc.timestamp())

    # ---- hosts ----
    def settings(self) -> ClusterSettings:
        return self.store.settings()

    def hosts(self) -> list[HostView]:
        return [h.view() for h in self.store.hosts()]

    def host(self, name: str) -> HostView:
        row = self.store.host(name)
        if row is None:
            raise NotFound(f"no host {name} has joined")
        return row.view()

    def remove_host(self, name: str, who: Identity) -> None:
        self.store.remove_host(name, str(who), self.clock())

    def heartbeat(self, name: str, beat: Heartbeat) -> HeartbeatAnswer:
        if beat.version != PROTOCOL_VERSION:
            raise Conflict(f"host {name} speaks center protocol {beat.version}; this center speaks {PROTOCOL_VERSION}: "
                           "run the same kvmotion version on both")
        now = self.clock()
        measured = [vm.cpu_demand for vm in beat.load.vms]
        if all(d is not None for d in measured):  # the agent's own figures over its sampling interval
            demand: float | None = sum(d for d in measured if d is not None)
        else:  # an agent that sends run-time totals only: the demand between two of its heartbeats
            before = self._samples.get(name)
            demand = cpu_demand(before[0], before[1], beat.load, now) if before is not None else None
        # The store keeps the host's load with each VM's figures (CPU demand and ready: what DRS reads),
        # its VMs' run times stay here too, for the next demand.
        row = self.store.record_heartbeat(name, now, beat.vms, beat.load, beat.migrations, demand)
        self._samples[name] = (beat.load, now)
        settings = self._settings(now)
        return HeartbeatAnswer(state=row.state, interval=settings.heartbeat_interval, now=now, settings=settings)

    def _settings(self, now: float) -> ClusterSettings:
        """The settings, read again at most every SETTINGS_TTL seconds (every heartbeat answers with them)."""
        cached = self._settings_cache
        if cached is None or not 0 <= now - cached[0] < SETTINGS_TTL:
            cached = self._settings_cache = (now, self.store.settings())
        return cached[1]

    # ---- datastores ----
    def datastores(self) -> list[DatastoreView]:
        return self.store.datastores()

    def add_datastore(self, spec: DatastoreSpec, who: Identity) -> DatastoreView:
        view = DatastoreView(name=spec.name, nbd_url=spec.nbd_url, control_url=spec.control_url, added=self.clock())
        self.store.add_datastore(view, str(who))
        return view

    def remove_datastore(self, name: str, who: Identity) -> None:
        self.store.remove_datastore(name, str(who), self.clock())

    # ---- users ----
    def users(self) -> list[UserView]:
        return [_user_view(u) for u in self.store.users()]

    def add_user(self, request: UserAdd, who: Identity) -> UserAdded:
        made = request.password is None
        password = auth.new_password() if request.password is None else auth.check_new_password(request.password)
        if self.store.user(request.name) is not None:  # before the hash: a refusal costs nothing
            raise Conflict(f"user {request.name} exists already")
        row = UserRow(name=request.name, role=request.role, password_hash=self.passwords.hash(password),
                      created=self.clock())
        self.store.add_user(row, str(who))
        return UserAdded(user=_user_view(row), password=password if made else None)

    # ---- tokens ----
    def create_token(self, request: TokenCreate, who: Identity) -> TokenCreated:
        parts, row = auth.new_token(self.ca_sha256, self.clock(), request.ttl, request.uses, str(who))
        self.store.add_token(row, str(who))
        return TokenCreated(token=str(parts), info=_token_view(row))

    def tokens(self) -> list[TokenView]:
        return [_token_view(t) for t in self.store.tokens()]

    def delete_token(self, token_id: str, who: Identity) -> None:
        self.store.delete_token(token_id, str(who), self.clock())

    # ---- events ----
    def events(self, since: int, limit: int) -> EventPage:
        events = self.store.events(since, limit)
        return EventPage(events=tuple(events), next=events[-1].id if events else since)
