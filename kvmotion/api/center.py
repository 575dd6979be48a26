"""The center's wire: typed request and answer models of its HTTP API, and its clients (sync and async).

Every body on the wire is one of these frozen models (no dicts): the center's routes take and return
them, the CLI and the agents send and read them, the OpenAPI document describes them.

TLS, as a client sees the center:
- before it holds a certificate (a host joining, a user logging in) it must still know it talks to
  the right center before it sends a secret: it fetches the CA certificate (GET /v1/ca, public),
  checks its SHA-256 against the pin it was given (a join token carries it, `kvmotion login` takes
  --ca-sha256), and only then connects trusting that CA alone (`pinned_ca`, `trusting`);
- afterwards it presents its certificate from `Credentials` (the login config: center URL, CA,
  certificate and key in one 0600 file, like a kubeconfig).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from kvmotion.api.address import NBD_PORT
from kvmotion.api.identity import Role
from kvmotion.api.spec import (
    NAME_PATTERN,  # host, VM and datastore names: the VM spec's rule
    Checked,
    VmSpec,
)
from kvmotion.core import errors

PROTOCOL_VERSION = 1  # of agent <-> center messages (heartbeats); the center refuses others
DEFAULT_PORT = 7700
AGENT_PORT = 7701

USER_PATTERN = r"^[a-z][a-z0-9._-]{0,31}$"  # kvmotion.api.identity's user names
TOKEN_ID_PATTERN = r"^[0-9a-f]{12}$"
MIGRATION_ID_PATTERN = r"^[0-9a-f]{12}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_PEM = 4096  # characters of a certificate or CSR on the wire (EC: under 1 KiB)
MAX_VMS = 4096  # VMs one heartbeat reports
MAX_MIGRATIONS = 256

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
UserName = Annotated[str, Field(pattern=USER_PATTERN)]
TokenId = Annotated[str, Field(pattern=TOKEN_ID_PATTERN)]
Pem = Annotated[str, Field(min_length=1, max_length=MAX_PEM)]
Count = Annotated[StrictInt, Field(ge=0, le=1 << 62)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"invalid IP address {text[:60]!r}: use e.g. 10.0.0.1 or fd00::1") from None


def _reachable_ip(text: str) -> str:
    """An address peers can dial: not a wildcard, multicast or link-scoped one (%zone)."""
    address = _ip(text)
    parsed = ipaddress.ip_address(address)
    if parsed.is_unspecified or parsed.is_multicast or "%" in address:
        raise ValueError(f"{address} is no address peers can reach: give the host's own address, e.g. 10.0.0.1")
    return address


HostAddress = Annotated[str, Field(max_length=45), AfterValidator(_reachable_ip)]


def is_base_url(url: str, schemes: tuple[str, ...]) -> bool:
    """SCHEME://HOST[:PORT] with one of `schemes`, nothing after the host but an optional "/"."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname) and port != 0 and parts.path in ("", "/") \
        and not (parts.query or parts.fragment or parts.username)


def _url_checker(schemes: tuple[str, ...], what: str) -> Any:
    def check(url: str) -> str:
        if not is_base_url(url, schemes):
            raise ValueError(f"invalid {what} {url[:80]!r}: use {' or '.join(s + '://HOST[:PORT]' for s in schemes)}")
        return url

    return AfterValidator(check)


NbdUrl = Annotated[str, Field(max_length=300), _url_checker(("nbds", "nbd"), "NBD URL")]
ControlUrl = Annotated[str, Field(max_length=300), _url_checker(("https", "http"), "control URL")]


class Wire(Checked):
    """Frozen, no unknown fields; built in code, a wrong value raises InvalidInput naming the field."""

    _what: ClassVar[str] = "request body"  # what a refusal calls the body (kvmotion.api.serving)


# ---- states and kinds ---------------------------------------------------------------------------------
class HostState(str, Enum):
    CONNECTED = "connected"
    NOT_RESPONDING = "not_responding"  # silent for longer than the settings allow, or not heard since joining


class HostMode(str, Enum):
    """What the host is for, beside whether it answers (HostState)."""

    NORMAL = "normal"
    ENTERING_MAINTENANCE = "entering_maintenance"  # being evacuated: no new VMs, its VMs are moving away
    MAINTENANCE = "maintenance"  # empty of running VMs; no new VMs


class Severity(str, Enum):
    OK = "ok"
    MODERATE = "moderate"  # quarantine: new VMs only where nothing else fits, DRS moves VMs off
    SEVERE = "severe"  # maintenance: evacuate

    @property
    def rank(self) -> int:
        return ("ok", "moderate", "severe").index(self.value)


Component = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,31}$")]
AGENT_PROVIDER = "agent"  # an agent's built-in health providers (kvmotion.host.health), in its heartbeats


class HealthReport(Wire):
    """What one provider says of one component of a host."""

    _what: ClassVar[str] = "health report"
    provider: Component = "external"
    component: Component
    severity: Severity
    reason: Annotated[str, Field(max_length=300)] = ""



class ReportedState(str, Enum):
    """A VM's state as its agent reports it (the agent's own VmState)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"  # a migration's shadow: not the VM's home
    MIGRATING = "migrating"
    STOPPING = "stopping"
    CRASHED = "crashed"


class ObservedState(str, Enum):
    """A VM's state as the center last learnt it."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    STOPPING = "stopping"
    CRASHED = "crashed"
    UNKNOWN = "unknown"  # its host is not responding (or was removed): the VM is not lost, only unseen
    ABSENT = "absent"  # its last host stopped reporting it and no other host reports it


class MigrationRole(str, Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class EventKind(str, Enum):
    CENTER_INITIALIZED = "center_initialized"
    HOST_JOINED = "host_joined"
    HOST_REMOVED = "host_removed"
    HOST_CONNECTED = "host_connected"
    HOST_NOT_RESPONDING = "host_not_responding"
    DATASTORE_ADDED = "datastore_added"
    DATASTORE_REMOVED = "datastore_removed"
    USER_ADDED = "user_added"
    USER_LOGGED_IN = "user_logged_in"
    TOKEN_CREATED = "token_created"
    TOKEN_DELETED = "token_deleted"
    SETTINGS_CHANGED = "settings_changed"
    VM_CREATED = "vm_created"
    TASK_QUEUED = "task_queued"
    TASK_STARTED = "task_started"
    TASK_ENDED = "task_ended"
    TASK_CANCEL_REQUESTED = "task_cancel_requested"
    DRIFT = "drift"  # desired and observed differ (reported by the reconcile pass)
    HOST_MODE = "host_mode"  # entering, in or out of maintenance
    HOST_HEALTH = "host_health"  # a provider's report changed a host's health
    RULE_ADDED = "rule_added"
    RULE_REMOVED = "rule_removed"
    DRS_CONFIGURED = "drs_configured"


# ---- cluster, CA, join, login --------------------------------------------------------------------------
class ClusterSettings(Wire):
    encrypted: StrictBool = True  # migration streams and APIs over TLS (false: a --insecure cluster)
    cpu_baseline: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None
    heartbeat_interval: Annotated[float, Field(ge=0.1, le=60)] = 2.0  # seconds between an agent's heartbeats
    # Seconds between an agent's full reports (VMs, per-VM load) when nothing changed: its load is
    # averaged over this interval (vSphere samples every 20 s); a change is reported at the next beat.
    report_interval: Annotated[float, Field(ge=1, le=600)] = 20.0
    not_responding_after: Annotated[float, Field(ge=1, le=3600)] = 8.0  # seconds of silence: four missed beats
    # Migration admission, like vSphere's vMotion costs: each migration costs 1 on its source and
    # its destination; a host's budget depends on its migration link's speed.
    link_bps: Annotated[StrictInt, Field(ge=1_000_000, le=10**13)] = 1_000_000_000  # unless a host reports its own
    migration_budget_slow: Annotated[StrictInt, Field(ge=1, le=128)] = 4  # links under 10 Gbit/s
    migration_budget_fast: Annotated[StrictInt, Field(ge=1, le=128)] = 8  # links of 10 Gbit/s or more
    cluster_migrations: Annotated[StrictInt, Field(ge=1, le=10000)] = 32  # running at once in the cluster


class SettingsUpdate(Wire):
    """What an admin may change at run time (PATCH /v1/settings); a field left out keeps its value."""

    _what: ClassVar[str] = "settings update"
    heartbeat_interval: Annotated[float, Field(ge=0.1, le=60)] | None = None
    not_responding_after: Annotated[float, Field(ge=1, le=3600)] | None = None
    report_interval: Annotated[float, Field(ge=1, le=600)] | None = None
    link_bps: Annotated[StrictInt, Field(ge=1_000_000, le=10**13)] | None = None
    migration_budget_slow: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    migration_budget_fast: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    cluster_migrations: Annotated[StrictInt, Field(ge=1, le=10000)] | None = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class CaInfo(Wire):
    ca_cert: Pem
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]


class JoinRequest(Wire):
    _what: ClassVar[str] = "join request"
    token: Annotated[str, Field(min_length=1, max_length=200)]
    name: Name
    address: HostAddress  # where peers and the center reach the host's agent
    agent_port: Port = AGENT_PORT
    host_csr: Pem  # the agent's key: host:NAME
    qemu_csr: Pem  # its QEMUs' own key: qemu:NAME


class DatastoreJoinRequest(Wire):
    """A datastore joins with a token: its CSR signed as datastore:NAME for `address` (and any
    `more_addresses` it is also reached at), and it is recorded at the center at `address` (NBD at
    `nbd_port`, its control API at `nbd_port` + 1)."""

    _what: ClassVar[str] = "datastore join request"
    token: Annotated[str, Field(min_length=1, max_length=200)]
    name: Name
    address: HostAddress  # where hosts' QEMUs and agents reach the datastore
    more_addresses: Annotated[tuple[HostAddress, ...], Field(max_length=15)] = ()  # e.g. one per storage network
    nbd_port: Annotated[StrictInt, Field(ge=1, le=65534)] = NBD_PORT
    csr: Pem


class LoginRequest(Wire):
    _what: ClassVar[str] = "login request"
    user: UserName
    password: Annotated[str, Field(min_length=1, max_length=1024)]
    csr: Pem


class LoginAnswer(Wire):
    user: UserName
    role: Role
    ca_cert: Pem
    cert: Pem
    expires: float


# ---- hosts and heartbeats ---------------------------------------------------------------------------------
class VmReport(Wire):
    name: Name
    state: ReportedState
    spec_hash: Annotated[str, Field(pattern=SHA256_PATTERN)] | None = None  # kvmotion.api.spec.spec_hash of its spec


class VmLoad(Wire):
    """One VM's figures as its agent measured them: CPU demand and ready time, its memory."""

    name: Name
    memory: Count = 0  # resident bytes of its QEMU process
    # Over the agent's last sampling interval, in CPUs (1.0: one CPU's worth): vCPU threads running,
    # and runnable but waiting for a CPU (vSphere's "ready"). None on the first sample of a process.
    cpu_demand: Annotated[float, Field(ge=0, le=65536)] | None = None
    cpu_ready: Annotated[float, Field(ge=0, le=65536)] | None = None
    # Bytes/s of pages the guest dirtied in QEMU's last sampling (kvmotion.qemu.dirtyrate); None
    # until one is measured, and while it migrates.
    dirty_rate: Annotated[float, Field(ge=0, le=1e13)] | None = None


class HostLoad(Wire):
    cpus: Annotated[StrictInt, Field(ge=1, le=65536)]
    # CPUs' worth of time the host's processes may use: its cgroup's CPU limit if it has one (a lab
    # host's --host-cpu), else `cpus`. None from an agent that predates it.
    cpu_capacity: Annotated[float, Field(gt=0, le=65536)] | None = None
    memory_total: Count
    memory_available: Count
    vms: Annotated[tuple[VmLoad, ...], Field(max_length=MAX_VMS)] = ()


class ActiveMigration(Wire):
    id: Annotated[str, Field(pattern=MIGRATION_ID_PATTERN)]
    vm: Name
    role: MigrationRole
    peer: Name
    phase: Annotated[str, Field(pattern=r"^[a-z][a-z_]{0,31}$")]


class Heartbeat(Wire):
    """An agent's full report: what it observes, not what it wants. Sent when what it observes
    changed (its digest), when the center asks, and every `report_interval` seconds; between
    them a small `Alive` beat every `heartbeat_interval` seconds (Kubernetes' node Lease beside
    its NodeStatus)."""

    _what: ClassVar[str] = "heartbeat"
    version: StrictInt
    digest: Annotated[str, Field(pattern=SHA256_PATTERN)] | None = None  # report_digest of vms and migrations
    vms: Annotated[tuple[VmReport, ...], Field(max_length=MAX_VMS)] = ()
    load: HostLoad
    migrations: Annotated[tuple[ActiveMigration, ...], Field(max_length=MAX_MIGRATIONS)] = ()
    health: Annotated[tuple[HealthReport, ...], Field(max_length=64)] = ()  # its built-in health providers' word

    @field_validator("vms")
    @classmethod
    def _one_report_per_vm(cls, vms: tuple[VmReport, ...]) -> tuple[VmReport, ...]:
        seen: set[str] = set()
        for vm in vms:
            if vm.name in seen:
                raise ValueError(f"VM {vm.name} is reported twice")
            seen.add(vm.name)
        return vms


class Alive(Wire):
    """An agent's beat between full reports: it is alive, and what it observes is still what its
    full report with `digest` said."""

    _what: ClassVar[str] = "heartbeat"
    version: StrictInt
    seq: Annotated[StrictInt, Field(ge=0, le=1 << 62)]  # counts the agent's beats since it started
    digest: Annotated[str, Field(pattern=SHA256_PATTERN)]


def report_digest(vms: Sequence[VmReport], migrations: Sequence[ActiveMigration],
                  health: Sequence[HealthReport] = ()) -> str:
    """What an Alive beat stands for: the SHA-256 of the VMs, migrations and health severities a
    full report lists (a health provider's reason alone changing does not call for a report)."""
    text = "\n".join([*(f"{v.name} {v.state.value} {v.spec_hash or '-'}" for v in vms),
                      *(f"m {m.id} {m.vm} {m.role.value} {m.peer} {m.phase}" for m in migrations),
                      *(f"h {h.provider} {h.component} {h.severity.value}" for h in health)])
    return hashlib.sha256(text.encode()).hexdigest()


class HeartbeatAnswer(Wire):
    state: HostState
    interval: float  # seconds until the next heartbeat is due
    now: float  # the center's clock, for the agent to see skew
    settings: ClusterSettings | None = None  # the cluster's settings, for the agent's local cache
    report: bool = False  # the center wants the full report now (it does not know the digest, or the host was silent)


class HostFacts(Wire):
    """What placement needs of a host beyond its load, as its agent tells it (GET /v1/migration/facts)."""

    accel: str = ""
    cpu_models: tuple[str, ...] = ()  # CPU models this host's QEMU runs with every feature
    portgroups: tuple[str, ...] = ()
    datastores: tuple[str, ...] = ()  # datastores it reaches now
    link_bps: Annotated[StrictInt, Field(ge=1)] | None = None  # its migration link, when known
    updated: float = 0.0  # when the center learnt these


class HostView(Wire):
    name: Name
    address: str
    agent_url: str
    state: HostState
    joined: float
    last_heartbeat: float | None
    load: HostLoad | None
    migrations: tuple[ActiveMigration, ...] = ()
    vms: int = 0  # VMs last observed there
    cpu_demand: float | None = None  # CPUs its VMs kept busy, as its agent measured them (last full report)
    facts: HostFacts | None = None
    mode: HostMode = HostMode.NORMAL
    mode_reason: str = ""  # who or what put it there
    health: Severity = Severity.OK  # the worst its health providers say
    quarantined: bool = False  # placed on last; DRS moves VMs off


class JoinAnswer(Wire):
    host: HostView
    ca_cert: Pem
    host_cert: Pem
    qemu_cert: Pem
    settings: ClusterSettings


# ---- datastores, users, tokens, events -----------------------------------------------------------------
class DatastoreSpec(Wire):
    _what: ClassVar[str] = "datastore"
    name: Name
    nbd_url: NbdUrl
    control_url: ControlUrl


class DatastoreView(Wire):
    name: Name
    nbd_url: str
    control_url: str
    added: float


class DatastoreJoinAnswer(Wire):
    datastore: DatastoreView
    ca_cert: Pem
    cert: Pem


class UserAdd(Wire):
    _what: ClassVar[str] = "user"
    name: UserName
    role: Role
    password: Annotated[str, Field(min_length=12, max_length=1024)] | None = None  # none: the center makes one


class UserView(Wire):
    name: str
    role: Role
    created: float


class UserAdded(Wire):
    user: UserView
    password: str | None  # the one the center made, shown this once (None if the caller gave one)


class TokenCreate(Wire):
    _what: ClassVar[str] = "token request"
    ttl: Annotated[float, Field(ge=1, le=30 * 86400)] = 86400.0  # seconds
    uses: Annotated[StrictInt, Field(ge=1, le=100000)] | None = None  # None: any number within the TTL


class TokenView(Wire):
    id: str
    expires: float
    uses_left: int | None
    created: float
    created_by: str


class TokenCreated(Wire):
    token: str  # kvm1.<CA sha256>.<id>.<secret>: shown once, stored hashed
    info: TokenView


class Event(Wire):
    id: int
    at: float
    kind: EventKind
    object: str
    message: str
    who: str


class EventPage(Wire):
    events: tuple[Event, ...]
    next: int  # pass as `since` to get what came after


# ---- VMs, tasks, migrations --------------------------------------------------------------------------------
TASK_ID_PATTERN = r"^[0-9a-f]{16}$"
TaskId = Annotated[str, Field(pattern=TASK_ID_PATTERN)]


class PowerState(str, Enum):
    ON = "on"
    OFF = "off"


class TaskKind(str, Enum):
    CREATE = "create"
    START = "start"
    STOP = "stop"
    MIGRATE = "migrate"
    REHOME = "rehome"  # a powered-off VM defined on another host (maintenance)


class TaskState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class TaskProgress(Wire):
    phase: str = ""  # the migration's phase, or what the task waits for
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    transferred: Count = 0
    remaining: Count = 0
    message: Annotated[str, Field(max_length=500)] = ""


class TaskResult(Wire):
    host: str | None = None  # where the VM is now
    migration: str | None = None  # the source agent's migration id
    downtime_ms: float | None = None  # QEMU's: the source's part of the pause
    pause_ms: float | None = None  # the guest's downtime (source stopped -> destination resumed): predicted_downtime_ms foresaw it
    total_ms: float | None = None


class TaskView(Wire):
    id: str
    kind: TaskKind
    target: str  # the VM
    state: TaskState
    progress: TaskProgress = TaskProgress()
    created: float
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    result: TaskResult | None = None
    requested_by: str
    cancel_requested: bool = False
    source: str | None = None  # a migration's hosts
    destination: str | None = None
    why: str = ""  # what asked for it beside the user: maintenance, DRS, health
    predicted_s: float | None = None  # a migration's predicted duration and downtime, beside result's actual
    predicted_downtime_ms: float | None = None


class Candidate(Wire):
    """One host as placement saw it: refused with every reason, or eligible with a score (lower: less loaded)."""

    host: str
    reasons: tuple[str, ...] = ()
    score: float | None = None

    @property
    def eligible(self) -> bool:
        return not self.reasons


class Placement(Wire):
    chosen: str | None
    candidates: tuple[Candidate, ...]


class VmCreate(Wire):
    _what: ClassVar[str] = "VM"
    spec: VmSpec
    host: Name | None = None  # None: placement chooses


class VmView(Wire):
    name: str
    spec: VmSpec | None  # None: a VM the center only observed (created outside it)
    desired_host: str | None
    desired_power: PowerState | None
    observed_host: str | None
    observed_state: ObservedState
    updated: float


class VmCreated(Wire):
    vm: VmView
    task: TaskView
    placement: Placement | None = None


class MigrateRequest(Wire):
    _what: ClassVar[str] = "migration request"
    vm: Name
    destination: Name | None = None  # None: placement chooses
    max_downtime_ms: Annotated[StrictInt, Field(ge=1, le=60_000)] = 500
    bandwidth: Annotated[StrictInt, Field(ge=0, le=1 << 50)] = 0  # bytes/s; 0: the link's speed
    policy: Annotated[str, Field(pattern=r"^[a-z]{1,16}$")] = "balanced"


class TaskStarted(Wire):
    task: TaskView
    placement: Placement | None = None  # when the center chose the destination


# ---- join tokens ---------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"^kvm1\.([0-9a-f]{64})\.([0-9a-f]{12})\.([0-9a-f]{32})$")


@dataclass(frozen=True)
class TokenParts:
    """A join token, "kvm1.<CA sha256 hex>.<id>.<secret>": the joining host pins the center's CA with
    the first part (pinned_ca) before it sends the token; the center finds it by id, checks the secret."""

    ca_sha256: str
    id: str
    secret: str

    def __str__(self) -> str:
        return f"kvm1.{self.ca_sha256}.{self.id}.{self.secret}"


def parse_token(text: str) -> TokenParts:
    m = _TOKEN_RE.fullmatch(text.strip())
    if m is None:
        raise errors.InvalidInput("malformed join token: expected kvm1.<CA sha256>.<id>.<secret> "
                                  "(as `kvmotion center token create` prints it)")
    return TokenParts(*m.groups())


# ---- TLS for clients ----------------------------------------------------------------------------------------
def ca_sha256(pem: str) -> str:
    """SHA-256 of a certificate's DER, lowercase hex: what a join token and --ca-sha256 pin."""
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")
    except ValueError:
        raise errors.InvalidInput("not a PEM certificate") from None
    return hashlib.sha256(der).hexdigest()


def _context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def trusting(ca_pem: str, cert_pem: str | None = None, key_pem: str | None = None) -> ssl.SSLContext:
    """A client context that trusts only `ca_pem` (and checks the center's name), presenting the
    certificate and key when given. They are loaded from memory (a memfd), never written to disk."""
    ctx = _context()
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as exc:
        raise errors.InvalidInput(f"unusable CA certificate: {exc.reason or exc}") from None
    if cert_pem is not None and key_pem is not None:
        fd = os.memfd_create("kvmotion-credentials", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "w") as f:
                f.write(cert_pem.strip() + "\n" + key_pem.strip() + "\n")
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except ssl.SSLError as exc:
            raise errors.InvalidInput(f"unusable certificate or key: {exc.reason or exc}") from None
        finally:
            os.close(fd)
    return ctx


def _unverified() -> ssl.SSLContext:
    """Only for GET /v1/ca, whose answer is checked against a pin before anything is trusted."""
    ctx = _context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_ca(url: str, sha256: str | None, timeout: float = 15.0) -> CaInfo:
    """The center's CA certificate, fetched from `url` and checked against `sha256` (None: the
    caller decides from the answer's sha256, e.g. by asking its user)."""
    verify: ssl.SSLContext | bool = _unverified() if url.startswith("https:") else False
    with _http(url, verify, timeout) as http:
        info = _decode(CaInfo, _send(http, url, "GET", "/v1/ca"))
    actual = ca_sha256(info.ca_cert)
    if actual != info.sha256:
        raise errors.Unauthorized(f"the center at {url} sent a CA whose SHA-256 is not the one it claims")
    if sha256 is not None and actual != sha256.lower():
        raise errors.Unauthorized(f"the center at {url} has CA SHA-256 {actual}, not {sha256.lower()}: "
                                  "another center, or someone in between; nothing was sent")
    return info


@dataclass(frozen=True)
class Credentials:
    """What `kvmotion login` keeps: the center, and a user's certificate and key from its CA."""

    center: str
    user: str
    ca_cert: str
    cert: str
    key: str

    def ssl_context(self) -> ssl.SSLContext:
        return trusting(self.ca_cert, self.cert, self.key)

    def client(self, timeout: float = 30.0) -> CenterClient:
        return CenterClient(self.center, self.ssl_context() if self.center.startswith("https:") else None, timeout)


# ---- clients ------------------------------------------------------------------------------------------------
def _http(url: str, verify: ssl.SSLContext | bool, timeout: float) -> httpx.Client:
    return httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout)


def _error(response: httpx.Response, url: str) -> errors.KvmotionError:
    """The center's error answer as the same KvmotionError class, with its message."""
    try:
        err = response.json()["error"]
        kind, message = err["kind"], err["message"]
    except (ValueError, KeyError, TypeError):
        return errors.KvmotionError(f"the center at {url} answered HTTP {response.status_code}: {response.text[:200]!r}")
    cls = getattr(errors, str(kind), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KvmotionError)):
        cls = errors.KvmotionError
    return cls(str(message))


FOLLOW_READ_TIMEOUT = 60.0  # the center sends a keep-alive comment at least every 15 s


def _check_stream(response: httpx.Response, url: str) -> None:
    """A streamed answer's error (its body read by the caller first)."""
    if response.status_code >= 400:
        raise _error(response, url)


def _sse_event(line: str) -> Event | None:
    """One server-sent-events line: an event for a `data:` line, None for comments and blanks."""
    if not line.startswith("data:"):
        return None
    try:
        return Event.model_validate_json(line[5:].strip())
    except ValidationError:
        raise errors.KvmotionError("the center sent an event this client does not understand: "
                                   "are both the same kvmotion version?") from None


def _check(response: httpx.Response, url: str) -> httpx.Response:
    if response.status_code >= 400:
        raise _error(response, url)
    return response


def _send(http: httpx.Client, url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        return _check(http.request(method, path, **kw), url)
    except httpx.TransportError as exc:
        raise errors.Unreachable(f"the center at {url} is not reachable ({type(exc).__name__}: {exc or 'no answer'})") from exc


_adapters: dict[Any, TypeAdapter[Any]] = {}


def _decode(model: Any, response: httpx.Response) -> Any:
    adapter = _adapters.get(model)
    if adapter is None:
        adapter = _adapters[model] = TypeAdapter(model)
    try:
        return adapter.validate_json(response.content)
    except ValidationError as exc:
        raise errors.KvmotionError(f"the center answered {response.request.method} {response.request.url.path} "
                                   f"with a body this client does not understand ({exc.error_count()} problems): "
                                   "are both the same kvmotion version?") from None


@dataclass(frozen=True)
class Call:
    """One API call, built once for both clients."""

    method: str
    path: str
    answer: Any  # the model (or list[...]) of the answer; None: no body
    body: Wire | None = None
    params: Mapping[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.body is not None:
            out["content"] = self.body.model_dump_json()
            out["headers"] = {"content-type": "application/json"}
        if self.params:
            out["params"] = dict(self.params)
        return out


class _Calls:
    @staticmethod
    def ca() -> Call:
        return Call("GET", "/v1/ca", CaInfo)

    @staticmethod
    def join(request: JoinRequest) -> Call:
        return Call("POST", "/v1/join", JoinAnswer, request)

    @staticmethod
    def join_datastore(request: DatastoreJoinRequest) -> Call:
        return Call("POST", "/v1/datastores/join", DatastoreJoinAnswer, request)

    @staticmethod
    def login(request: LoginRequest) -> Call:
        return Call("POST", "/v1/login", LoginAnswer, request)

    @staticmethod
    def settings() -> Call:
        return Call("GET", "/v1/settings", ClusterSettings)

    @staticmethod
    def hosts() -> Call:
        return Call("GET", "/v1/hosts", list[HostView])

    @staticmethod
    def host(name: str) -> Call:
        return Call("GET", f"/v1/hosts/{name}", HostView)

    @staticmethod
    def remove_host(name: str) -> Call:
        return Call("DELETE", f"/v1/hosts/{name}", None)

    @staticmethod
    def heartbeat(name: str, beat: Heartbeat) -> Call:
        return Call("POST", f"/v1/hosts/{name}/heartbeat", HeartbeatAnswer, beat)

    @staticmethod
    def alive(name: str, beat: Alive) -> Call:
        return Call("POST", f"/v1/hosts/{name}/alive", HeartbeatAnswer, beat)

    @staticmethod
    def update_settings(update: SettingsUpdate) -> Call:
        return Call("PATCH", "/v1/settings", ClusterSettings, update)

    @staticmethod
    def datastores() -> Call:
        return Call("GET", "/v1/datastores", list[DatastoreView])

    @staticmethod
    def add_datastore(spec: DatastoreSpec) -> Call:
        return Call("POST", "/v1/datastores", DatastoreView, spec)

    @staticmethod
    def remove_datastore(name: str) -> Call:
        return Call("DELETE", f"/v1/datastores/{name}", None)

    @staticmethod
    def users() -> Call:
        return Call("GET", "/v1/users", list[UserView])

    @staticmethod
    def add_user(user: UserAdd) -> Call:
        return Call("POST", "/v1/users", UserAdded, user)

    @staticmethod
    def create_token(request: TokenCreate) -> Call:
        return Call("POST", "/v1/tokens", TokenCreated, request)

    @staticmethod
    def tokens() -> Call:
        return Call("GET", "/v1/tokens", list[TokenView])

    @staticmethod
    def delete_token(token_id: str) -> Call:
        return Call("DELETE", f"/v1/tokens/{token_id}", None)

    @staticmethod
    def events(since: int = 0, limit: int = 100) -> Call:
        return Call("GET", "/v1/events", EventPage, params={"since": since, "limit": limit})

    @staticmethod
    def vms() -> Call:
        return Call("GET", "/v1/vms", list[VmView])

    @staticmethod
    def vm(name: str) -> Call:
        return Call("GET", f"/v1/vms/{path_name(name, NAME_PATTERN, 'VM name')}", VmView)

    @staticmethod
    def create_vm(request: VmCreate) -> Call:
        return Call("POST", "/v1/vms", VmCreated, request)

    @staticmethod
    def power(name: str, action: str) -> Call:
        return Call("POST", f"/v1/vms/{path_name(name, NAME_PATTERN, 'VM name')}/{action}", TaskView)

    @staticmethod
    def migrate(request: MigrateRequest) -> Call:
        return Call("POST", "/v1/migrations", TaskStarted, request)

    @staticmethod
    def tasks(state: TaskState | None = None, limit: int = 100) -> Call:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state.value
        return Call("GET", "/v1/tasks", list[TaskView], params=params)

    @staticmethod
    def task(task_id: str) -> Call:
        return Call("GET", f"/v1/tasks/{path_name(task_id, TASK_ID_PATTERN, 'task id')}", TaskView)

    @staticmethod
    def cancel_task(task_id: str) -> Call:
        return Call("POST", f"/v1/tasks/{path_name(task_id, TASK_ID_PATTERN, 'task id')}/cancel", TaskView)


def path_name(name: str, pattern: str, what: str) -> str:
    """A name put into a URL path: refused here rather than sent as another path."""
    if not re.fullmatch(pattern, name):
        raise errors.InvalidInput(f"invalid {what} {name!r}")
    return name


class CenterClient:
    """Synchronous client of the center (the CLI). `ssl_context`: `trusting(...)` or
    `Credentials.ssl_context()`; None for an http:// (--insecure) center."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = _http(self.url, ssl_context if ssl_context is not None else False, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CenterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, call: Call) -> Any:
        response = _send(self._http, self.url, call.method, call.path, **call.kwargs())
        return None if call.answer is None else _decode(call.answer, response)

    def ca(self) -> CaInfo:
        return self.call(_Calls.ca())

    def join(self, request: JoinRequest) -> JoinAnswer:
        return self.call(_Calls.join(request))

    def join_datastore(self, request: DatastoreJoinRequest) -> DatastoreJoinAnswer:
        return self.call(_Calls.join_datastore(request))

    def login(self, request: LoginRequest) -> LoginAnswer:
        return self.call(_Calls.login(request))

    def settings(self) -> ClusterSettings:
        return self.call(_Calls.settings())

    def hosts(self) -> list[HostView]:
        return self.call(_Calls.hosts())

    def host(self, name: str) -> HostView:
        return self.call(_Calls.host(path_name(name, NAME_PATTERN, "host name")))

    def remove_host(self, name: str) -> None:
        self.call(_Calls.remove_host(path_name(name, NAME_PATTERN, "host name")))

    def heartbeat(self, name: str, beat: Heartbeat) -> HeartbeatAnswer:
        return self.call(_Calls.heartbeat(path_name(name, NAME_PATTERN, "host name"), beat))

    def alive(self, name: str, beat: Alive) -> HeartbeatAnswer:
        return self.call(_Calls.alive(path_name(name, NAME_PATTERN, "host name"), beat))

    def update_settings(self, update: SettingsUpdate) -> ClusterSettings:
        return self.call(_Calls.update_settings(update))

    def datastores(self) -> list[DatastoreView]:
        return self.call(_Calls.datastores())

    def add_datastore(self, spec: DatastoreSpec) -> DatastoreView:
        return self.call(_Calls.add_datastore(spec))

    def remove_datastore(self, name: str) -> None:
        self.call(_Calls.remove_datastore(path_name(name, NAME_PATTERN, "datastore name")))

    def users(self) -> list[UserView]:
        return self.call(_Calls.users())

    def add_user(self, user: UserAdd) -> UserAdded:
        return self.call(_Calls.add_user(user))

    def create_token(self, request: TokenCreate) -> TokenCreated:
        return self.call(_Calls.create_token(request))

    def tokens(self) -> list[TokenView]:
        return self.call(_Calls.tokens())

    def delete_token(self, token_id: str) -> None:
        self.call(_Calls.delete_token(path_name(token_id, TOKEN_ID_PATTERN, "token id")))

    def events(self, since: int = 0, limit: int = 100) -> EventPage:
        return self.call(_Calls.events(since, limit))

    def vms(self) -> list[VmView]:
        return self.call(_Calls.vms())

    def vm(self, name: str) -> VmView:
        return self.call(_Calls.vm(name))

    def create_vm(self, request: VmCreate) -> VmCreated:
        return self.call(_Calls.create_vm(request))

    def start_vm(self, name: str) -> TaskView:
        return self.call(_Calls.power(name, "start"))

    def stop_vm(self, name: str) -> TaskView:
        return self.call(_Calls.power(name, "stop"))

    def migrate(self, request: MigrateRequest) -> TaskStarted:
        return self.call(_Calls.migrate(request))

    def tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskView]:
        return self.call(_Calls.tasks(state, limit))

    def task(self, task_id: str) -> TaskView:
        return self.call(_Calls.task(task_id))

    def cancel_task(self, task_id: str) -> TaskView:
        return self.call(_Calls.cancel_task(task_id))

    def follow_events(self, since: int = 0) -> Iterator[Event]:
        """GET /v1/events?follow=1: events as the center records them (server-sent events), until closed."""
        try:
            with self._http.stream("GET", "/v1/events", params={"since": since, "follow": 1},
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=FOLLOW_READ_TIMEOUT)) as r:
                if r.status_code >= 400:
                    r.read()
                _check_stream(r, self.url)
                for line in r.iter_lines():
                    event = _sse_event(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise errors.Unreachable(f"the center at {self.url} is not reachable ({type(exc).__name__}: {exc or 'no answer'})") from exc


class AsyncCenterClient:
    """The same calls for asyncio code (agents' heartbeats, the lab)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0, *,
                 local_address: str | None = None, max_connections: int = 100) -> None:
        """`local_address`: the source address to connect from (a host's own); `max_connections`: at once."""
        self.url = url.rstrip("/")
        verify = ssl_context if ssl_context is not None else False
        transport = httpx.AsyncHTTPTransport(verify=verify, local_address=local_address,
                                             limits=httpx.Limits(max_connections=max_connections))
        self._http = httpx.AsyncClient(base_url=self.url, verify=verify, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCenterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, call: Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **call.kwargs())
        except httpx.TransportError as exc:
            raise errors.Unreachable(f"the center at {self.url} is not reachable "
                                     f"({type(exc).__name__}: {exc or 'no answer'})") from exc
        _check(response, self.url)
        return None if call.answer is None else _decode(call.answer, response)

    async def ca(self) -> CaInfo:
        return await self.call(_Calls.ca())

    async def join(self, request: JoinRequest) -> JoinAnswer:
        return await self.call(_Calls.join(request))

    async def login(self, request: LoginRequest) -> LoginAnswer:
        return await self.call(_Calls.login(request))

    async def settings(self) -> ClusterSettings:
        return await self.call(_Calls.settings())

    async def hosts(self) -> list[HostView]:
        return await self.call(_Calls.hosts())

    async def host(self, name: str) -> HostView:
        return await self.call(_Calls.host(path_name(name, NAME_PATTERN, "host name")))

    async def remove_host(self, name: str) -> None:
        await self.call(_Calls.remove_host(path_name(name, NAME_PATTERN, "host name")))

    async def heartbeat(self, name: str, beat: Heartbeat) -> HeartbeatAnswer:
        return await self.call(_Calls.heartbeat(path_name(name, NAME_PATTERN, "host name"), beat))

    async def alive(self, name: str, beat: Alive) -> HeartbeatAnswer:
        return await self.call(_Calls.alive(path_name(name, NAME_PATTERN, "host name"), beat))

    async def update_settings(self, update: SettingsUpdate) -> ClusterSettings:
        return await self.call(_Calls.update_settings(update))

    async def datastores(self) -> list[DatastoreView]:
        return await self.call(_Calls.datastores())

    async def add_datastore(self, spec: DatastoreSpec) -> DatastoreView:
        return await self.call(_Calls.add_datastore(spec))

    async def remove_datastore(self, name: str) -> None:
        await self.call(_Calls.remove_datastore(path_name(name, NAME_PATTERN, "datastore name")))

    async def users(self) -> list[UserView]:
        return await self.call(_Calls.users())

    async def add_user(self, user: UserAdd) -> UserAdded:
        return await self.call(_Calls.add_user(user))

    async def create_token(self, request: TokenCreate) -> TokenCreated:
        return await self.call(_Calls.create_token(request))

    async def tokens(self) -> list[TokenView]:
        return await self.call(_Calls.tokens())

    async def delete_token(self, token_id: str) -> None:
        await self.call(_Calls.delete_token(path_name(token_id, TOKEN_ID_PATTERN, "token id")))

    async def events(self, since: int = 0, limit: int = 100) -> EventPage:
        return await self.call(_Calls.events(since, limit))

    async def vms(self) -> list[VmView]:
        return await self.call(_Calls.vms())

    async def vm(self, name: str) -> VmView:
        return await self.call(_Calls.vm(name))

    async def create_vm(self, request: VmCreate) -> VmCreated:
        return await self.call(_Calls.create_vm(request))

    async def start_vm(self, name: str) -> TaskView:
        return await self.call(_Calls.power(name, "start"))

    async def stop_vm(self, name: str) -> TaskView:
        return await self.call(_Calls.power(name, "stop"))

    async def migrate(self, request: MigrateRequest) -> TaskStarted:
        return await self.call(_Calls.migrate(request))

    async def tasks(self, state: TaskState | None = None, limit: int = 100) -> list[TaskView]:
        return await self.call(_Calls.tasks(state, limit))

    async def task(self, task_id: str) -> TaskView:
        return await self.call(_Calls.task(task_id))

    async def cancel_task(self, task_id: str) -> TaskView:
        return await self.call(_Calls.cancel_task(task_id))

    async def follow_events(self, since: int = 0) -> AsyncIterator[Event]:
        """GET /v1/events?follow=1 as an async iterator of events."""
        try:
            async with self._http.stream("GET", "/v1/events", params={"since": since, "follow": 1},
                                         timeout=httpx.Timeout(self._http.timeout.connect, read=FOLLOW_READ_TIMEOUT)) as r:
                if r.status_code >= 400:
                    await r.aread()
                _check_stream(r, self.url)
                async for line in r.aiter_lines():
                    event = _sse_event(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise errors.Unreachable(f"the center at {self.url} is not reachable ({type(exc).__name__}: {exc or 'no answer'})") from exc
