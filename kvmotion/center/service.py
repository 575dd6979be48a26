"""The center's operations: what each API call does, between the wire models, the pure rules
(auth, liveness), the cluster CA and the store. Synchronous (the store is): the HTTP layer runs
them in worker threads, asyncio code through asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmotion.api.center import (
    AGENT_PROVIDER,
    PROTOCOL_VERSION,
    Alive,
    CaInfo,
    ClusterSettings,
    DatastoreJoinAnswer,
    DatastoreJoinRequest,
    DatastoreSpec,
    DatastoreView,
    EventPage,
    HealthReport,
    Heartbeat,
    HeartbeatAnswer,
    HostLoad,
    HostState,
    HostView,
    JoinAnswer,
    JoinRequest,
    LoginAnswer,
    LoginRequest,
    SettingsUpdate,
    Severity,
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


def datastore_urls(address: str, nbd_port: int, secure: bool) -> tuple[str, str]:
    """(NBD URL, control URL) of a datastore at `address`: nbds:// and https:// unless insecure."""
    shown = f"[{address}]" if ":" in address else address
    if secure:
        return f"nbds://{shown}:{nbd_port}", f"https://{shown}:{nbd_port + 1}"
    return f"nbd://{shown}:{nbd_port}", f"http://{shown}:{nbd_port + 1}"


def host_demand(load: HostLoad) -> float | None:
    """CPUs the host's VMs kept busy, as its agent measured them over its sampling interval: the
    sum of its VMs' figures; None while none of its running VMs has one yet (a first sample)."""
    measured = [vm.cpu_demand for vm in load.vms if vm.cpu_demand is not None]
    if load.vms and not measured:
        return None
    return sum(measured)


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
        self._digests: dict[str, str] = {}  # host -> the digest of its last full report
        self._states: dict[str, HostState] = {}  # host -> its state after its last full report
        self._heard: dict[str, float] = {}  # host -> its last Alive beat not yet in the store (take_heard)
        self._heard_lock = threading.Lock()
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

    def join_datastore(self, request: DatastoreJoinRequest) -> DatastoreJoinAnswer:
        """A datastore's certificate (datastore:NAME for its address) for the key of its CSR, if its
        token may join now; the datastore is recorded in the same transaction that spends the token."""
        parts = parse_token(request.token)
        csr = load_csr(request.csr, "datastore CSR")
        now = self.clock()
        auth.check_token(parts, self.ca_sha256, self.store.token(parts.id), now)  # before any signing
        if any(d.name == request.name for d in self.store.datastores()):
            raise Conflict(f"datastore {request.name} exists already: remove it first (`kvmotion datastore rm {request.name}`)")
        ips = tuple(dict.fromkeys((request.address, *request.more_addresses)))
        cert = sign_csr(self.ca, csr, Identity(Kind.DATASTORE, request.name), ips, server=True)
        nbd, control = datastore_urls(request.address, request.nbd_port, not self.insecure)
        view = DatastoreView(name=request.name, nbd_url=nbd, control_url=control, added=now)
        self.store.join_datastore(parts.id, lambda token: auth.check_token(parts, self.ca_sha256, token, now), view,
                                  f"datastore:{request.name}")
        return DatastoreJoinAnswer(datastore=view, ca_cert=self.ca_pem, cert=cert_pem(cert))

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
        self.forget(name)

    @staticmethod
    def _check_version(name: str, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise Conflict(f"host {name} speaks center protocol {version}; this center speaks {PROTOCOL_VERSION}: "
                           "run the same kvmotion version on both")

    def heartbeat(self, name: str, beat: Heartbeat) -> HeartbeatAnswer:
        """A full report: the host's VMs, load and migrations."""
        self._check_version(name, beat.version)
        now = self.clock()
        # The store keeps the host's load with each VM's figures (what placement, DRS and metrics read)
        # and their CPU demand as the agent measured it: a full report comes every report_interval.
        row = self.store.record_heartbeat(name, now, beat.vms, beat.load, beat.migrations, host_demand(beat.load))
        self._agent_health(name, beat.health, now)
        if beat.digest is None:
            self._digests.pop(name, None)
        else:
            self._digests[name] = beat.digest
        self._states[name] = row.state
        settings = self._settings(now)
        return HeartbeatAnswer(state=row.state, interval=settings.heartbeat_interval, now=now, settings=settings)

    def _agent_health(self, name: str, reports: Sequence[HealthReport], now: float) -> None:
        """The agent's built-in providers' word, written where it changed (an event each); a
        component they no longer report is ok again. The operations controller acts on it."""
        stored = {(e.provider, e.component): e.severity for e in self.store.health(name) if e.provider == AGENT_PROVIDER}
        told = {(r.provider, r.component): r for r in reports if r.provider == AGENT_PROVIDER}
        for key, report in told.items():
            if stored.get(key, Severity.OK) is not report.severity:
                self.store.report_health(name, report, f"host:{name}", now)
        for provider, component in stored.keys() - told.keys():
            self.store.report_health(name, HealthReport(provider=provider, component=component, severity=Severity.OK,
                                                        reason="no longer reported"), f"host:{name}", now)

    def alive_in_memory(self, name: str, beat: Alive) -> HeartbeatAnswer | None:
        """The common Alive beat without I/O (the HTTP layer calls it in its event loop): the digest
        is the one of the host's last full report and the settings were read lately. The beat is
        noted here and written to the store by the heartbeat controller's next tick (take_heard),
        before it looks for silent hosts. None: `alive` must answer."""
        self._check_version(name, beat.version)
        now = self.clock()
        cached = self._settings_cache
        state = self._states.get(name)
        if (state is None or self._digests.get(name) != beat.digest or cached is None
                or not 0 <= now - cached[0] < SETTINGS_TTL):
            return None
        with self._heard_lock:
            self._heard[name] = now
        return HeartbeatAnswer(state=state, interval=cached[1].heartbeat_interval, now=now, settings=cached[1])

    def take_heard(self) -> dict[str, float]:
        """The Alive beats noted since the last call (host -> when), for the store."""
        with self._heard_lock:
            heard, self._heard = self._heard, {}
        return heard

    def forget(self, name: str) -> None:
        """The host became not responding (or was removed): its next Alive beat is answered with a
        request for its full report (its VMs are unknown until then)."""
        self._digests.pop(name, None)
        self._states.pop(name, None)

    def alive(self, name: str, beat: Alive) -> HeartbeatAnswer:
        """A beat between full reports, through the store. The full report is asked for when this
        center does not know the digest (it restarted, or the report was lost) or the host is not
        responding (its VMs are unknown until it reports them)."""
        self._check_version(name, beat.version)
        now = self.clock()
        settings = self._settings(now)
        known = self._digests.get(name) == beat.digest
        state = self.store.record_alive(name, now) if known else None
        if state is None:
            row = self.store.host(name)
            if row is None:
                raise NotFound(f"host {name} has not joined this center: join it with `kvmotion host join`")
            return HeartbeatAnswer(state=row.state, interval=settings.heartbeat_interval, now=now, settings=settings,
                                   report=True)
        return HeartbeatAnswer(state=state, interval=settings.heartbeat_interval, now=now, settings=settings)

    def _settings(self, now: float) -> ClusterSettings:
        """The settings, read again at most every SETTINGS_TTL seconds (every heartbeat answers with them)."""
        cached = self._settings_cache
        if cached is None or not 0 <= now - cached[0] < SETTINGS_TTL:
            cached = self._settings_cache = (now, self.store.settings())
        return cached[1]

    def update_settings(self, update: SettingsUpdate, who: Identity) -> ClusterSettings:
        """The settings with `update`'s fields changed, in one transaction with an event."""
        changes = update.changes()
        if not changes:
            raise InvalidInput("no setting to change: name at least one")
        before = self.store.settings()
        after = ClusterSettings(**(before.model_dump() | changes))
        what = ", ".join(f"{k} {getattr(before, k)} -> {v}" for k, v in changes.items())
        self.store.change_settings(after, what, str(who), self.clock())
        self._settings_cache = None
        return after

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
    def events(self, since: int, limit: int, newest: bool = False) -> EventPage:
        """The `limit` events after `since`, or (newest) the last `limit` events; `next` is the id to
        follow from."""
        events = self.store.newest_events(limit) if newest else self.store.events(since, limit)
        return EventPage(events=tuple(events), next=events[-1].id if events else since)
