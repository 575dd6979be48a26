"""The center's state behind one narrow interface: `Store`, and `SqliteStore`, its embedded default.

Every method is one transaction: it reads what it decides on and writes all it changes (the row,
the rows it implies, the event that records it) or nothing. Methods take and return frozen rows
(the dataclasses below, or the wire models where they are the same thing) and a method that
records an event takes `who` (the identity that asked) and `at` (the caller's clock): the store
keeps no clock and makes no policy beyond what a transaction must check.

SqliteStore: one file, WAL (readers never wait for the writer), a busy timeout for writers, one
connection per thread (so it serves FastAPI's worker threads and asyncio code through
asyncio.to_thread alike), writes in BEGIN IMMEDIATE transactions (the write lock is taken first,
so two writers never deadlock upgrading a read lock). Its schema has a version, and an ordered list
of upgrade steps, each applied once in its own transaction when a store of an older version is
opened; a store written by a newer kvmotion is refused, never downgraded.

An etcd-backed store (several center replicas) implements the same protocol: each row a key
(/kvmotion/hosts/NAME, /kvmotion/vms/NAME, ...) holding the row's JSON; a method that decides on
what it reads (join, record_heartbeat, mark_not_responding, add_*) reads those keys with their
mod_revision and commits all its writes, the event included, in one etcd Txn whose compare clause
requires the revisions unchanged, re-reading and retrying when another replica won: what BEGIN
IMMEDIATE gives here. Events take their id from a counter key incremented in the same Txn;
schema_version is a key and upgrade steps rewrite keys in Txns; controllers may watch instead of poll.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from kvmotion.api.center import (
    ActiveMigration,
    ClusterSettings,
    DatastoreView,
    Event,
    EventKind,
    HostFacts,
    HostLoad,
    HostMode,
    HostState,
    HostView,
    ObservedState,
    PowerState,
    ReportedState,
    Severity,
    TaskKind,
    TaskProgress,
    TaskResult,
    TaskState,
    TaskView,
    VmReport,
)
from kvmotion.api.identity import Role
from kvmotion.api.operations import DrsConfig, HealthEntry, HealthReport, RuleSpec
from kvmotion.center.liveness import after_heartbeat
from kvmotion.core.errors import Conflict, InsufficientResources, NotFound, SetupError

BUSY_TIMEOUT_MS = 5000  # how long a writer waits for another's transaction
EVENTS_KEPT = 100_000  # older events are pruned


# ---- rows ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostRow:
    name: str
    address: str
    agent_url: str
    state: HostState
    joined: float
    last_heartbeat: float | None = None
    load: HostLoad | None = None
    migrations: tuple[ActiveMigration, ...] = ()
    vms: int = 0  # VMs last observed there (computed when read)
    cpu_demand: float | None = None  # CPUs busy, as the agent measured them (its last full report)
    facts: HostFacts | None = None
    mode: HostMode = HostMode.NORMAL
    mode_reason: str = ""
    health: Severity = Severity.OK  # the worst of its health entries (computed when read)

    @property
    def quarantined(self) -> bool:
        """Moderate health or worse: placed on last (severe also sends it into maintenance)."""
        return self.health is not Severity.OK

    def view(self) -> HostView:
        return HostView(name=self.name, address=self.address, agent_url=self.agent_url, state=self.state,
                        joined=self.joined, last_heartbeat=self.last_heartbeat, load=self.load,
                        migrations=self.migrations, vms=self.vms, cpu_demand=self.cpu_demand, facts=self.facts,
                        mode=self.mode, mode_reason=self.mode_reason, health=self.health,
                        quarantined=self.quarantined)


@dataclass(frozen=True)
class VmRow:
    name: str
    observed_state: ObservedState
    updated: float
    observed_host: str | None = None
    spec: str | None = None  # the VM spec's JSON (None: a VM the center only observed)
    desired_host: str | None = None
    desired_power: PowerState | None = None


@dataclass(frozen=True)
class MigrationRow:
    """The migration a migrate task drives: `agent_id` is the source agent's id for it, once it
    accepted it; `record` its last record there (JSON, as the agent sent it)."""

    id: str
    task_id: str
    vm: str
    source: str
    destination: str
    options: str = "{}"  # the request's options (MigrateRequest fields, JSON)
    agent_id: str | None = None
    record: str = "{}"


@dataclass(frozen=True)
class RuleRow:
    rule: RuleSpec
    created: float
    created_by: str


@dataclass(frozen=True)
class UserRow:
    name: str
    role: Role
    password_hash: str
    created: float


@dataclass(frozen=True)
class TokenRow:
    id: str
    secret_hash: str  # sha256 of the secret, hex
    expires: float
    uses_left: int | None  # None: any number of joins until it expires
    created: float
    created_by: str


@dataclass(frozen=True)
class SessionRow:
    """A browser session (kind "session") or a one-time sign-in token (kind "signin"): both known by
    the sha256 of their secret; `role` is the user's role now (read from users), not stored."""

    id_hash: str
    user: str
    kind: str
    csrf_hash: str
    created: float
    expires: float
    role: Role | None = None


class _Activity(BaseModel):
    """A host's last reported figures, as stored in hosts.load."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    load: HostLoad
    migrations: tuple[ActiveMigration, ...] = ()
    cpu_demand: float | None = None


# ---- the protocol ---------------------------------------------------------------------------------------
class Store(Protocol):
    def close(self) -> None: ...

    def schema_version(self) -> int: ...

    # first start: the admin user, the first join token and the settings, unless a user exists
    def bootstrap(self, admin: UserRow, token: TokenRow, settings: ClusterSettings, at: float) -> bool: ...

    def settings(self) -> ClusterSettings: ...

    def save_settings(self, settings: ClusterSettings) -> None: ...

    # the settings changed by an admin, with an event saying what changed
    def change_settings(self, settings: ClusterSettings, what: str, who: str, at: float) -> None: ...

    def add_user(self, user: UserRow, who: str) -> None: ...

    def user(self, name: str) -> UserRow | None: ...

    def users(self) -> list[UserRow]: ...

    def record_login(self, name: str, who: str, at: float) -> None: ...

    def add_token(self, token: TokenRow, who: str) -> None: ...

    # sessions and sign-in tokens: expired ones are dropped when another is added
    def add_session(self, session: SessionRow, who: str) -> None: ...

    def session(self, id_hash: str) -> SessionRow | None: ...

    def delete_session(self, id_hash: str) -> None: ...

    # a sign-in token spent (deleted) and, if it was unexpired, the session `make` builds for its user, at once
    def redeem_signin(self, token_hash: str, at: float, make: Callable[[str], SessionRow]) -> SessionRow | None: ...

    def token(self, token_id: str) -> TokenRow | None: ...

    def tokens(self) -> list[TokenRow]: ...

    def delete_token(self, token_id: str, who: str, at: float) -> None: ...

    # `verify` sees the token inside the transaction and raises to refuse: then nothing is written
    def join(self, token_id: str, verify: Callable[[TokenRow | None], None], host: HostRow, who: str) -> HostRow: ...

    def host(self, name: str) -> HostRow | None: ...

    def hosts(self) -> list[HostRow]: ...

    def remove_host(self, name: str, who: str, at: float) -> None: ...

    def record_heartbeat(self, name: str, at: float, vms: Sequence[VmReport], load: HostLoad,
                         migrations: Sequence[ActiveMigration], cpu_demand: float | None = None) -> HostRow: ...

    # a beat between full reports: the host's last heartbeat, unless it is not responding (then its
    # full report brings it back); its state, None if it is not responding. NotFound if it never joined.
    def record_alive(self, name: str, at: float) -> HostState | None: ...

    # record_alive for several hosts (host -> when) in one transaction; hosts gone meanwhile are skipped
    def record_alive_many(self, heard: Mapping[str, float]) -> None: ...

    def set_host_facts(self, name: str, facts: HostFacts) -> None: ...

    # only if the host is still connected with the heartbeat `seen`: a beat that came in between wins
    def mark_not_responding(self, name: str, seen: float | None, at: float) -> bool: ...

    def vm(self, name: str) -> VmRow | None: ...

    def vms(self) -> list[VmRow]: ...

    # every VM as a JSON array of VmView objects, by name (the store builds it: thousands of VMs, one string)
    def vm_list_json(self) -> str: ...

    # a VM the center creates: its row and its create task together (Conflict: the name is taken)
    def create_vm(self, vm: VmRow, task: TaskView, who: str) -> None: ...

    # Conflict if the VM is unknown or has an unfinished task; `migration` for a migrate task
    # `room`: the migration's destination's free memory as placement saw it; refused
    # (InsufficientResources) when the reservations written so far leave too little of it
    def add_task(self, task: TaskView, who: str, migration: MigrationRow | None = None,
                 room: int | None = None) -> TaskView: ...

    def task(self, task_id: str) -> TaskView | None: ...

    def open_task(self, vm: str) -> TaskView | None: ...  # the VM's queued or running task

    # destination host -> (memory bytes, vCPUs) of the VMs queued or running migrations take there
    def reservations(self) -> dict[str, tuple[int, int]]: ...

    # newest first; `open_only`: queued and running, oldest first (the dispatcher's view)
    def tasks(self, state: TaskState | None = None, limit: int = 100, open_only: bool = False) -> list[TaskView]: ...

    def migration(self, task_id: str) -> MigrationRow | None: ...

    # the newest migrations whose task is done, with the source's last record (what predictions learn from)
    def finished_migrations(self, limit: int = 500) -> list[MigrationRow]: ...
    # (kind, state) -> how many tasks (for metrics: tasks are kept, so the ended ones only grow)
    def task_counts(self) -> dict[tuple[TaskKind, TaskState], int]: ...

    # (total_ms, downtime_ms) of every migrate task that ended done, oldest first (None: not reported)
    def migration_times(self) -> list[tuple[float | None, float | None]]: ...

    # queued -> running; False if it is no longer queued (cancelled meanwhile)
    def start_task(self, task_id: str, at: float, progress: TaskProgress) -> bool: ...

    def update_task(self, task_id: str, progress: TaskProgress, *, agent_id: str | None = None,
                    record: str | None = None) -> None: ...

    # several tasks' progress in one transaction (the dispatcher's waiting reasons of a tick)
    def update_progress(self, progress: Mapping[str, TaskProgress]) -> None: ...

    # the end, once: False if it had ended already. A done task moves the VM's desired (and observed) host/power.
    def end_task(self, task_id: str, state: TaskState, at: float, *, error: str | None = None,
                 result: TaskResult | None = None, desired_host: str | None = None,
                 desired_power: PowerState | None = None, observed_host: str | None = None,
                 observed_state: ObservedState | None = None) -> bool: ...

    # queued: cancelled at once; running: flagged for the dispatcher
    def request_cancel(self, task_id: str, who: str, at: float) -> TaskView: ...

    def add_datastore(self, datastore: DatastoreView, who: str) -> None: ...

    # a datastore joining with a token (see `join`): the token spent and the datastore recorded together
    def join_datastore(self, token_id: str, verify: Callable[[TokenRow | None], None], datastore: DatastoreView,
                       who: str) -> None: ...

    def datastores(self) -> list[DatastoreView]: ...

    def remove_datastore(self, name: str, who: str, at: float) -> None: ...

    def add_event(self, at: float, kind: EventKind, object: str, message: str, who: str) -> Event: ...

    def events(self, since: int = 0, limit: int = 100) -> list[Event]: ...

    def newest_events(self, limit: int) -> list[Event]: ...  # the last `limit`, oldest first

    # ---- maintenance, health, rules, DRS (kvmotion.center.operations) ----
    # the host's mode; entering maintenance records the VMs it holds (their homes, for a move back)
    def set_host_mode(self, name: str, mode: HostMode, reason: str, who: str, at: float,
                      homes: Sequence[str] = ()) -> HostRow: ...

    def homes(self, host: str) -> list[str]: ...  # the VMs `host` held when it last entered maintenance

    def clear_homes(self, host: str) -> None: ...

    # one provider's word on one component; an event when the host's worst severity changes
    def report_health(self, host: str, report: HealthReport, who: str, at: float) -> list[HealthEntry]: ...

    def health(self, host: str | None = None) -> list[HealthEntry]: ...

    def add_rule(self, rule: RuleSpec, who: str, at: float) -> None: ...

    def rules(self) -> list[RuleRow]: ...

    def remove_rule(self, name: str, who: str, at: float) -> None: ...

    def drs_config(self) -> DrsConfig: ...

    def save_drs_config(self, config: DrsConfig, who: str, at: float) -> None: ...


# ---- the schema and its upgrades --------------------------------------------------------------------------
# Step N takes a store from version N-1 to N. Steps are never edited once released: a change is a new step.
UPGRADES: tuple[tuple[str, ...], ...] = (
    (  # 1: inventory, identities, events, settings
        """CREATE TABLE hosts (name TEXT PRIMARY KEY, address TEXT NOT NULL, agent_url TEXT NOT NULL,
            state TEXT NOT NULL, joined REAL NOT NULL, last_heartbeat REAL, facts TEXT NOT NULL DEFAULT '{}',
            load TEXT) STRICT""",
        """CREATE TABLE datastores (name TEXT PRIMARY KEY, nbd_url TEXT NOT NULL, control_url TEXT NOT NULL,
            added REAL NOT NULL) STRICT""",
        """CREATE TABLE portgroups (host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
            name TEXT NOT NULL, bridge TEXT NOT NULL, PRIMARY KEY (host, name)) STRICT""",
        """CREATE TABLE vms (name TEXT PRIMARY KEY, spec TEXT, desired_host TEXT, desired_power TEXT,
            observed_host TEXT, observed_state TEXT NOT NULL, updated REAL NOT NULL) STRICT""",
        "CREATE INDEX vms_observed_host ON vms (observed_host)",
        """CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,
            object TEXT NOT NULL, message TEXT NOT NULL, who TEXT NOT NULL) STRICT""",
        """CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
            created REAL NOT NULL) STRICT""",
        """CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, expires REAL NOT NULL,
            uses_left INTEGER, created REAL NOT NULL, created_by TEXT NOT NULL) STRICT""",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT",
    ),
    (  # 2: tasks and the migrations they drive
        """CREATE TABLE tasks (id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
            progress TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, started REAL, ended REAL, error TEXT,
            result TEXT, requested_by TEXT NOT NULL) STRICT""",
        "CREATE INDEX tasks_state ON tasks (state)",
        """CREATE TABLE migrations (id TEXT PRIMARY KEY, task_id TEXT REFERENCES tasks(id), vm TEXT NOT NULL,
            source TEXT NOT NULL, destination TEXT NOT NULL, record TEXT NOT NULL DEFAULT '{}') STRICT""",
        "CREATE INDEX migrations_vm ON migrations (vm)",
    ),
    (  # 3: what the dispatcher needs to cancel and to find a migration again after a restart
        "ALTER TABLE tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_target ON tasks (target)",
        "ALTER TABLE migrations ADD COLUMN agent_id TEXT",
        "ALTER TABLE migrations ADD COLUMN options TEXT NOT NULL DEFAULT '{}'",
        "CREATE INDEX migrations_task ON migrations (task_id)",
    ),
    (  # 4: maintenance, health, rules, DRS; why a task was asked for and what it was predicted to cost
        "ALTER TABLE hosts ADD COLUMN mode TEXT NOT NULL DEFAULT 'normal'",
        "ALTER TABLE hosts ADD COLUMN mode_reason TEXT NOT NULL DEFAULT ''",
        # maintenance was a host state before: it is a mode now, beside connected / not responding
        "UPDATE hosts SET mode = 'maintenance', state = 'not_responding' WHERE state = 'maintenance'",
        """CREATE TABLE homes (vm TEXT PRIMARY KEY, host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
            since REAL NOT NULL) STRICT""",
        """CREATE TABLE health (host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE, provider TEXT NOT NULL,
            component TEXT NOT NULL, severity TEXT NOT NULL, rank INTEGER NOT NULL, reason TEXT NOT NULL,
            at REAL NOT NULL, PRIMARY KEY (host, provider, component)) STRICT""",
        """CREATE TABLE rules (name TEXT PRIMARY KEY, spec TEXT NOT NULL, created REAL NOT NULL,
            created_by TEXT NOT NULL) STRICT""",
        "ALTER TABLE tasks ADD COLUMN why TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN predicted_s REAL",
        "ALTER TABLE tasks ADD COLUMN predicted_downtime_ms REAL",
    ),
    (  # 5: browser sessions and one-time sign-in tokens, hashed
        """CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            kind TEXT NOT NULL, csrf_hash TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL) STRICT""",
    ),
    (  # 6: what a migration reserves on its destination, kept beside it (placement sums it at every request)
        "ALTER TABLE migrations ADD COLUMN memory INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE migrations ADD COLUMN vcpus INTEGER NOT NULL DEFAULT 0",
        """UPDATE migrations SET memory = coalesce((SELECT json_extract(v.spec, '$.memory') FROM vms v
            WHERE v.name = migrations.vm), 0), vcpus = coalesce((SELECT json_extract(v.spec, '$.vcpus') FROM vms v
            WHERE v.name = migrations.vm), 0)""",
        "CREATE INDEX tasks_open ON tasks (state, created) WHERE state IN ('queued', 'running')",
    ),
)
SCHEMA_VERSION = len(UPGRADES)


@functools.lru_cache(maxsize=4096)
def _activity(raw: str) -> _Activity:
    """A host's stored load, parsed once per report (a full report, each VM's figures in it, comes
    every 20 s; the hosts are read at every placement and liveness tick)."""
    return _Activity.model_validate_json(raw)


def _host(row: sqlite3.Row) -> HostRow:
    activity = _activity(row["load"]) if row["load"] else None
    facts = HostFacts.model_validate_json(row["facts"]) if row["facts"] not in (None, "", "{}") else None
    return HostRow(name=row["name"], address=row["address"], agent_url=row["agent_url"], state=HostState(row["state"]),
                   joined=row["joined"], last_heartbeat=row["last_heartbeat"],
                   load=activity.load if activity else None, migrations=activity.migrations if activity else (),
                   vms=row["vms"], cpu_demand=activity.cpu_demand if activity else None, facts=facts,
                   mode=HostMode(row["mode"]), mode_reason=row["mode_reason"], health=_SEVERITIES[row["health"] or 0])


_SEVERITIES = tuple(Severity)  # by rank


_TASKS = ("SELECT t.*, m.source AS m_source, m.destination AS m_destination FROM tasks t "
          "LEFT JOIN migrations m ON m.task_id = t.id")


def _session(row: sqlite3.Row) -> SessionRow:
    return SessionRow(id_hash=row["id_hash"], user=row["user"], kind=row["kind"], csrf_hash=row["csrf_hash"],
                      created=row["created"], expires=row["expires"], role=Role(row["role"]))


def _task(row: sqlite3.Row) -> TaskView:
    return TaskView.model_construct(
        id=row["id"], kind=TaskKind(row["kind"]), target=row["target"], state=TaskState(row["state"]),
        progress=TaskProgress.model_validate_json(row["progress"]) if row["progress"] != "{}" else TaskProgress(),
        created=row["created"], started=row["started"], ended=row["ended"], error=row["error"],
        result=TaskResult.model_validate_json(row["result"]) if row["result"] else None,
        requested_by=row["requested_by"], cancel_requested=bool(row["cancel_requested"]),
        source=row["m_source"], destination=row["m_destination"], why=row["why"], predicted_s=row["predicted_s"],
        predicted_downtime_ms=row["predicted_downtime_ms"])


def _migration(row: sqlite3.Row) -> MigrationRow:
    return MigrationRow(id=row["id"], task_id=row["task_id"], vm=row["vm"], source=row["source"],
                        destination=row["destination"], options=row["options"], agent_id=row["agent_id"],
                        record=row["record"])


def _vm(row: sqlite3.Row) -> VmRow:
    return VmRow(name=row["name"], observed_state=ObservedState(row["observed_state"]), updated=row["updated"],
                 observed_host=row["observed_host"], spec=row["spec"], desired_host=row["desired_host"],
                 desired_power=PowerState(row["desired_power"]) if row["desired_power"] else None)


def _user(row: sqlite3.Row) -> UserRow:
    return UserRow(name=row["name"], role=Role(row["role"]), password_hash=row["password_hash"], created=row["created"])


def _token(row: sqlite3.Row) -> TokenRow:
    return TokenRow(id=row["id"], secret_hash=row["secret_hash"], expires=row["expires"], uses_left=row["uses_left"],
                    created=row["created"], created_by=row["created_by"])


def _event(row: sqlite3.Row) -> Event:
    return Event(id=row["id"], at=row["at"], kind=EventKind(row["kind"]), object=row["object"],
                 message=row["message"], who=row["who"])


_HOSTS = ("SELECT h.*, (SELECT count(*) FROM vms v WHERE v.observed_host = h.name) AS vms, "
          "(SELECT max(rank) FROM health e WHERE e.host = h.name) AS health FROM hosts h")


def _health(row: sqlite3.Row) -> HealthEntry:
    return HealthEntry(host=row["host"], provider=row["provider"], component=row["component"],
                       severity=Severity(row["severity"]), reason=row["reason"], at=row["at"])


class SqliteStore:
    """The Store in one SQLite file (see the module's docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writer = threading.Lock()  # one write transaction of this process at a time
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:  # the store holds password and token hashes: 0600 (SQLite gives its -wal and -shm the same mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise SetupError(f"cannot open the center's store {self.path}: {exc.strerror}") from None
        self._upgrade()

    # ---- connections and transactions ----
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise SetupError(f"the center's store {self.path} is closed")
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                    raise SetupError(f"cannot use write-ahead logging for {self.path}: is it on a network file system?")
                conn.execute("PRAGMA synchronous = NORMAL")  # _write(durable=True) asks for FULL
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as exc:
                raise SetupError(f"{self.path} is not a usable center store: {exc}") from None
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it, or (on any exception) nothing. This process's writers
        queue on a lock first: SQLite's busy handler polls with sleeps of up to 100 ms, so threads
        contending for its write lock would wait far longer than the transactions take.
        `durable`: on disk when this returns (synchronous FULL, an fsync). Not durable: what agents
        report again and task progress, at the rate they come; a power cut may lose the last
        seconds of those (write-ahead log, synchronous NORMAL), never leave the store inconsistent."""
        conn = self._conn()
        with self._writer:
            if durable:
                conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself on a few errors (a full disk)
                    conn.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # ---- schema ----
    def _upgrade(self) -> None:
        try:
            with self._write() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL) STRICT")
                version = self._version(conn)
        except sqlite3.DatabaseError as exc:
            raise SetupError(f"{self.path} is not a usable center store: {exc}") from None
        if version > SCHEMA_VERSION:
            raise SetupError(f"{self.path} has schema version {version}, written by a newer kvmotion (this one knows "
                             f"up to {SCHEMA_VERSION}): upgrade kvmotion")
        for step in range(version, SCHEMA_VERSION):
            with self._write() as conn:
                if self._version(conn) != step:
                    continue  # another process applied it meanwhile
                for statement in UPGRADES[step]:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (step + 1,))

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return row[0] or 0

    def schema_version(self) -> int:
        return self._version(self._conn())

    # ---- events ----
    def _add_event(self, conn: sqlite3.Connection, at: float, kind: EventKind, obj: str, message: str, who: str) -> Event:
        cur = conn.execute("INSERT INTO events (at, kind, object, message, who) VALUES (?, ?, ?, ?, ?)",
                           (at, kind.value, obj, message, who))
        event_id = cur.lastrowid or 0
        if event_id % 1000 == 0:
            conn.execute("DELETE FROM events WHERE id <= ?", (event_id - EVENTS_KEPT,))
        return Event(id=event_id, at=at, kind=kind, object=obj, message=message, who=who)

    def add_event(self, at: float, kind: EventKind, object: str, message: str, who: str) -> Event:
        with self._write() as conn:
            return self._add_event(conn, at, kind, object, message, who)

    def events(self, since: int = 0, limit: int = 100) -> list[Event]:
        rows = self._conn().execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since, limit))
        return [_event(r) for r in rows]

    def newest_events(self, limit: int) -> list[Event]:
        rows = self._conn().execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_event(r) for r in reversed(rows)]

    # ---- first start, settings ----
    def bootstrap(self, admin: UserRow, token: TokenRow, settings: ClusterSettings, at: float) -> bool:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return False
            self._save_settings(conn, settings)
            self._insert_user(conn, admin)
            self._insert_token(conn, token)
            self._add_event(conn, at, EventKind.CENTER_INITIALIZED, "center",
                            f"center initialized: user {admin.name} (admin), join token {token.id}", "center")
            return True

    def settings(self) -> ClusterSettings:
        rows = self._conn().execute("SELECT key, value FROM settings").fetchall()
        known = ClusterSettings.model_fields
        values = {r["key"]: json.loads(r["value"]) for r in rows if r["key"] in known}
        try:
            return ClusterSettings.model_validate(values)
        except ValidationError as exc:
            raise SetupError(f"the cluster settings in {self.path} are damaged: {exc.errors()[0]['msg']}") from None

    @staticmethod
    def _save_settings(conn: sqlite3.Connection, settings: ClusterSettings) -> None:
        for key, value in settings.model_dump(mode="json").items():
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                         "excluded.value", (key, json.dumps(value)))

    def save_settings(self, settings: ClusterSettings) -> None:
        with self._write() as conn:
            self._save_settings(conn, settings)

    def change_settings(self, settings: ClusterSettings, what: str, who: str, at: float) -> None:
        with self._write() as conn:
            self._save_settings(conn, settings)
            self._add_event(conn, at, EventKind.SETTINGS_CHANGED, "settings", f"settings changed: {what}", who)

    # ---- users ----
    @staticmethod
    def _insert_user(conn: sqlite3.Connection, user: UserRow) -> None:
        try:
            conn.execute("INSERT INTO users (name, role, password_hash, created) VALUES (?, ?, ?, ?)",
                         (user.name, user.role.value, user.password_hash, user.created))
        except sqlite3.IntegrityError:
            raise Conflict(f"user {user.name} exists already") from None

    def add_user(self, user: UserRow, who: str) -> None:
        with self._write() as conn:
            self._insert_user(conn, user)
            self._add_event(conn, user.created, EventKind.USER_ADDED, f"user:{user.name}",
                            f"user {user.name} added with role {user.role.value}", who)

    def user(self, name: str) -> UserRow | None:
        row = self._conn().execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        return _user(row) if row else None

    def users(self) -> list[UserRow]:
        return [_user(r) for r in self._conn().execute("SELECT * FROM users ORDER BY name")]

    def record_login(self, name: str, who: str, at: float) -> None:
        with self._write() as conn:
            self._add_event(conn, at, EventKind.USER_LOGGED_IN, f"user:{name}", f"user {name} logged in", who)

    # ---- browser sessions ----
    @staticmethod
    def _insert_session(conn: sqlite3.Connection, session: SessionRow) -> None:
        conn.execute("DELETE FROM sessions WHERE expires < ?", (session.created,))
        conn.execute("INSERT INTO sessions (id_hash, user, kind, csrf_hash, created, expires) VALUES (?, ?, ?, ?, ?, ?)",
                     (session.id_hash, session.user, session.kind, session.csrf_hash, session.created,
                      session.expires))

    def _session_event(self, conn: sqlite3.Connection, session: SessionRow, who: str) -> None:
        if session.kind == "session":
            self._add_event(conn, session.created, EventKind.USER_LOGGED_IN, f"user:{session.user}",
                            f"user {session.user} signed in to the web client", who)

    def add_session(self, session: SessionRow, who: str) -> None:
        with self._write() as conn:
            self._insert_session(conn, session)
            self._session_event(conn, session, who)

    def session(self, id_hash: str) -> SessionRow | None:
        row = self._conn().execute("SELECT s.*, u.role FROM sessions s JOIN users u ON u.name = s.user "
                                   "WHERE s.id_hash = ?", (id_hash,)).fetchone()
        return _session(row) if row else None

    def delete_session(self, id_hash: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))

    def redeem_signin(self, token_hash: str, at: float, make: Callable[[str], SessionRow]) -> SessionRow | None:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM sessions WHERE id_hash = ? AND kind = 'signin'", (token_hash,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM sessions WHERE id_hash = ?", (token_hash,))
            if row["expires"] <= at:
                return None
            session = make(row["user"])
            self._insert_session(conn, session)
            self._session_event(conn, session, f"user:{session.user}")
            return session

    # ---- join tokens ----
    @staticmethod
    def _insert_token(conn: sqlite3.Connection, token: TokenRow) -> None:
        try:
            conn.execute("INSERT INTO join_tokens (id, secret_hash, expires, uses_left, created, created_by) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (token.id, token.secret_hash, token.expires, token.uses_left,
                                                       token.created, token.created_by))
        except sqlite3.IntegrityError:
            raise Conflict(f"join token {token.id} exists already") from None

    def add_token(self, token: TokenRow, who: str) -> None:
        with self._write() as conn:
            # Tokens expired a week ago are no help even for telling a late joiner why it was refused.
            conn.execute("DELETE FROM join_tokens WHERE expires < ?", (token.created - 7 * 86400,))
            self._insert_token(conn, token)
            uses = "any number of joins" if token.uses_left is None else f"{token.uses_left} join(s)"
            self._add_event(conn, token.created, EventKind.TOKEN_CREATED, f"token:{token.id}",
                            f"join token {token.id} created for {uses}", who)

    def token(self, token_id: str) -> TokenRow | None:
        row = self._conn().execute("SELECT * FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
        return _token(row) if row else None

    def tokens(self) -> list[TokenRow]:
        return [_token(r) for r in self._conn().execute("SELECT * FROM join_tokens ORDER BY created")]

    def delete_token(self, token_id: str, who: str, at: float) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM join_tokens WHERE id = ?", (token_id,)).rowcount == 0:
                raise NotFound(f"no join token {token_id}")
            self._add_event(conn, at, EventKind.TOKEN_DELETED, f"token:{token_id}", f"join token {token_id} deleted", who)

    # ---- hosts ----
    def join(self, token_id: str, verify: Callable[[TokenRow | None], None], host: HostRow, who: str) -> HostRow:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
            verify(_token(row) if row else None)
            if conn.execute("SELECT 1 FROM hosts WHERE name = ?", (host.name,)).fetchone():
                raise Conflict(f"host {host.name} has joined already: remove it first (DELETE /v1/hosts/{host.name})")
            conn.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ? AND uses_left IS NOT NULL",
                         (token_id,))
            conn.execute("INSERT INTO hosts (name, address, agent_url, state, joined, last_heartbeat) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (host.name, host.address, host.agent_url, host.state.value,
                                                       host.joined, host.last_heartbeat))
            self._add_event(conn, host.joined, EventKind.HOST_JOINED, f"host:{host.name}",
                            f"host {host.name} joined with token {token_id}; its agent: {host.agent_url}", who)
            return _host(conn.execute(_HOSTS + " WHERE h.name = ?", (host.name,)).fetchone())

    def host(self, name: str) -> HostRow | None:
        row = self._conn().execute(_HOSTS + " WHERE h.name = ?", (name,)).fetchone()
        return _host(row) if row else None

    def hosts(self) -> list[HostRow]:
        return [_host(r) for r in self._conn().execute(_HOSTS + " ORDER BY h.name")]

    def remove_host(self, name: str, who: str, at: float) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM hosts WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no host {name} has joined")
            conn.execute("UPDATE vms SET observed_state = ?, updated = ? WHERE observed_host = ?",
                         (ObservedState.UNKNOWN.value, at, name))
            self._add_event(conn, at, EventKind.HOST_REMOVED, f"host:{name}",
                            f"host {name} removed; the VMs last seen there are unknown", who)

    def record_heartbeat(self, name: str, at: float, vms: Sequence[VmReport], load: HostLoad,
                         migrations: Sequence[ActiveMigration], cpu_demand: float | None = None) -> HostRow:
        """The host's figures and state (liveness.after_heartbeat), and what it reports of its VMs:
        a VM it runs is observed there; a VM observed there that it no longer reports is absent (a
        migration's destination reports it once it runs there). Shadows of incoming migrations are
        not the VM's home and change nothing. Only rows whose observation changed are written."""
        activity = _Activity(load=load, migrations=tuple(migrations), cpu_demand=cpu_demand).model_dump_json()
        with self._write(durable=False) as conn:
            row = conn.execute("SELECT state, last_heartbeat FROM hosts WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"host {name} has not joined this center: join it with `kvmotion host join`")
            before = HostState(row["state"])
            after = after_heartbeat(before)
            conn.execute("UPDATE hosts SET state = ?, last_heartbeat = ?, load = ? WHERE name = ?",
                         (after.value, at, activity, name))
            if after is not before:
                since = "with its first heartbeat" if row["last_heartbeat"] is None \
                    else f"{at - row['last_heartbeat']:.1f} s after its last heartbeat"
                self._add_event(conn, at, EventKind.HOST_CONNECTED, f"host:{name}",
                                f"host {name} is connected, {since}", f"host:{name}")
            observed = {r["name"]: r["observed_state"] for r in
                        conn.execute("SELECT name, observed_state FROM vms WHERE observed_host = ?", (name,))}
            reported = {vm.name: vm.state.value for vm in vms if vm.state is not ReportedState.INCOMING}
            for vm, state in reported.items():
                if observed.get(vm) != state:
                    conn.execute("INSERT INTO vms (name, observed_host, observed_state, updated) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT (name) DO UPDATE SET observed_host = excluded.observed_host, "
                                 "observed_state = excluded.observed_state, updated = excluded.updated",
                                 (vm, name, state, at))
            for vm, state in observed.items():
                if vm not in reported and state != ObservedState.ABSENT.value:
                    conn.execute("UPDATE vms SET observed_state = ?, updated = ? WHERE name = ?",
                                 (ObservedState.ABSENT.value, at, vm))
            return _host(conn.execute(_HOSTS + " WHERE h.name = ?", (name,)).fetchone())

    def record_alive(self, name: str, at: float) -> HostState | None:
        with self._write(durable=False) as conn:
            row = conn.execute("UPDATE hosts SET last_heartbeat = ? WHERE name = ? AND state != ? RETURNING state",
                               (at, name, HostState.NOT_RESPONDING.value)).fetchone()
            if row is not None:
                return HostState(row["state"])
            if conn.execute("SELECT 1 FROM hosts WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"host {name} has not joined this center: join it with `kvmotion host join`")
            return None

    def record_alive_many(self, heard: Mapping[str, float]) -> None:
        with self._write(durable=False) as conn:
            conn.executemany("UPDATE hosts SET last_heartbeat = ? WHERE name = ? AND state != ? "
                             "AND (last_heartbeat IS NULL OR last_heartbeat < ?)",
                             [(at, name, HostState.NOT_RESPONDING.value, at) for name, at in heard.items()])

    def mark_not_responding(self, name: str, seen: float | None, at: float) -> bool:
        with self._write() as conn:
            changed = conn.execute("UPDATE hosts SET state = ? WHERE name = ? AND state = ? AND last_heartbeat IS ?",
                                   (HostState.NOT_RESPONDING.value, name, HostState.CONNECTED.value, seen)).rowcount
            if not changed:
                return False
            conn.execute("UPDATE vms SET observed_state = ?, updated = ? WHERE observed_host = ?",
                         (ObservedState.UNKNOWN.value, at, name))
            last = f"last heartbeat {at - seen:.1f} s ago" if seen is not None else "no heartbeat yet"
            self._add_event(conn, at, EventKind.HOST_NOT_RESPONDING, f"host:{name}",
                            f"host {name} is not responding ({last}); its VMs are unknown", "center")
            return True

    def set_host_facts(self, name: str, facts: HostFacts) -> None:
        with self._write() as conn:
            if conn.execute("UPDATE hosts SET facts = ? WHERE name = ?", (facts.model_dump_json(), name)).rowcount == 0:
                raise NotFound(f"no host {name} has joined")

    # ---- VMs ----
    def vm(self, name: str) -> VmRow | None:
        row = self._conn().execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
        return _vm(row) if row else None

    def vms(self) -> list[VmRow]:
        return [_vm(r) for r in self._conn().execute("SELECT * FROM vms ORDER BY name")]

    def vm_list_json(self) -> str:
        row = self._conn().execute(
            "SELECT json_group_array(json_object('name', name, 'spec', json(spec), 'desired_host', desired_host, "
            "'desired_power', desired_power, 'observed_host', observed_host, 'observed_state', observed_state, "
            "'updated', updated)) FROM (SELECT * FROM vms ORDER BY name)").fetchone()
        return row[0]

    def create_vm(self, vm: VmRow, task: TaskView, who: str) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT observed_host, spec FROM vms WHERE name = ?", (vm.name,)).fetchone()
            if row is not None:
                where = f" (observed on {row['observed_host']})" if row["observed_host"] else ""
                raise Conflict(f"VM {vm.name} exists already{where}: VM names are unique in the cluster")
            conn.execute("INSERT INTO vms (name, spec, desired_host, desired_power, observed_host, observed_state, "
                         "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (vm.name, vm.spec, vm.desired_host, vm.desired_power.value if vm.desired_power else None,
                          vm.observed_host, vm.observed_state.value, vm.updated))
            self._add_event(conn, vm.updated, EventKind.VM_CREATED, f"vm:{vm.name}",
                            f"VM {vm.name} defined for host {vm.desired_host}", who)
            self._insert_task(conn, task, None, who)

    # ---- tasks and migrations ----
    def _insert_task(self, conn: sqlite3.Connection, task: TaskView, migration: MigrationRow | None, who: str) -> None:
        conn.execute("INSERT INTO tasks (id, kind, target, state, progress, created, requested_by, why, predicted_s, "
                     "predicted_downtime_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (task.id, task.kind.value, task.target, task.state.value, task.progress.model_dump_json(),
                      task.created, task.requested_by, task.why, task.predicted_s, task.predicted_downtime_ms))
        if migration is not None:
            conn.execute("INSERT INTO migrations (id, task_id, vm, source, destination, options, record, memory, vcpus) "
                         "SELECT ?, ?, ?, ?, ?, ?, ?, coalesce(json_extract(spec, '$.memory'), 0), "
                         "coalesce(json_extract(spec, '$.vcpus'), 0) FROM vms WHERE name = ?",
                         (migration.id, task.id, migration.vm, migration.source, migration.destination,
                          migration.options, migration.record, migration.vm))
        what = f"{task.kind.value} {task.target}"
        if migration is not None:
            what += f" from {migration.source} to {migration.destination}"
        if task.why:
            what += f" ({task.why})"
        self._add_event(conn, task.created, EventKind.TASK_QUEUED, f"task:{task.id}", f"task {task.id} queued: {what}",
                        who)

    def add_task(self, task: TaskView, who: str, migration: MigrationRow | None = None,
                 room: int | None = None) -> TaskView:
        with self._write() as conn:
            vm = conn.execute("SELECT coalesce(json_extract(spec, '$.memory'), 0) AS memory FROM vms WHERE name = ?",
                              (task.target,)).fetchone()
            if vm is None:
                raise NotFound(f"no VM {task.target} in the cluster")
            busy = conn.execute("SELECT id, kind FROM tasks WHERE target = ? AND state IN ('queued', 'running') "
                                "LIMIT 1", (task.target,)).fetchone()
            if busy is not None:
                doing = "already migrating" if busy["kind"] == TaskKind.MIGRATE.value else f"busy ({busy['kind']})"
                raise Conflict(f"VM {task.target} is {doing}: task {busy['id']}; wait for it or cancel it")
            if migration is not None and room is not None:
                # Checked in the write transaction: moves placed at the same moment see each other.
                reserved = conn.execute(
                    "SELECT coalesce(sum(m.memory), 0) AS memory FROM tasks t JOIN migrations m ON m.task_id = t.id "
                    "WHERE m.destination = ? AND t.state IN ('queued', 'running')", (migration.destination,)).fetchone()
                if reserved["memory"] + vm["memory"] > room:
                    raise InsufficientResources(f"{migration.destination} has no room left for VM {task.target}: "
                                                f"other moves took it meanwhile")
            self._insert_task(conn, task, migration, who)
            return _task(conn.execute(_TASKS + " WHERE t.id = ?", (task.id,)).fetchone())

    def task(self, task_id: str) -> TaskView | None:
        row = self._conn().execute(_TASKS + " WHERE t.id = ?", (task_id,)).fetchone()
        return _task(row) if row else None

    def open_task(self, vm: str) -> TaskView | None:
        row = self._conn().execute(_TASKS + " WHERE t.target = ? AND t.state IN ('queued', 'running') LIMIT 1",
                                   (vm,)).fetchone()
        return _task(row) if row else None

    def reservations(self) -> dict[str, tuple[int, int]]:
        rows = self._conn().execute(
            "SELECT m.destination, sum(m.memory) AS memory, sum(m.vcpus) AS vcpus FROM tasks t "
            "JOIN migrations m ON m.task_id = t.id WHERE t.state IN ('queued', 'running') GROUP BY m.destination")
        return {r["destination"]: (int(r["memory"] or 0), int(r["vcpus"] or 0)) for r in rows}

    def tasks(self, state: TaskState | None = None, limit: int = 100, open_only: bool = False) -> list[TaskView]:
        if open_only:
            rows = self._conn().execute(_TASKS + " WHERE t.state IN ('queued', 'running') ORDER BY t.created, t.rowid "
                                        "LIMIT ?", (limit,))
        elif state is not None:
            rows = self._conn().execute(_TASKS + " WHERE t.state = ? ORDER BY t.created DESC, t.id LIMIT ?",
                                        (state.value, limit))
        else:
            rows = self._conn().execute(_TASKS + " ORDER BY t.created DESC, t.id LIMIT ?", (limit,))
        return [_task(r) for r in rows]

    def migration(self, task_id: str) -> MigrationRow | None:
        row = self._conn().execute("SELECT * FROM migrations WHERE task_id = ?", (task_id,)).fetchone()
        return _migration(row) if row else None

    def finished_migrations(self, limit: int = 500) -> list[MigrationRow]:
        rows = self._conn().execute("SELECT m.* FROM migrations m JOIN tasks t ON t.id = m.task_id WHERE t.state = "
                                    "'done' AND t.kind = 'migrate' AND m.record != '{}' ORDER BY t.ended DESC LIMIT ?",
                                    (limit,))
        return [_migration(r) for r in rows]
    def task_counts(self) -> dict[tuple[TaskKind, TaskState], int]:
        rows = self._conn().execute("SELECT kind, state, count(*) AS n FROM tasks GROUP BY kind, state")
        return {(TaskKind(r["kind"]), TaskState(r["state"])): r["n"] for r in rows}

    def migration_times(self) -> list[tuple[float | None, float | None]]:
        rows = self._conn().execute(
            "SELECT json_extract(result, '$.total_ms') AS total, json_extract(result, '$.downtime_ms') AS downtime "
            "FROM tasks WHERE state = 'done' AND kind = 'migrate' AND result IS NOT NULL ORDER BY ended")
        return [(r["total"], r["downtime"]) for r in rows]

    def start_task(self, task_id: str, at: float, progress: TaskProgress) -> bool:
        with self._write(durable=False) as conn:
            row = conn.execute("SELECT kind, target FROM tasks WHERE id = ? AND state = 'queued'", (task_id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE tasks SET state = 'running', started = ?, progress = ? WHERE id = ?",
                         (at, progress.model_dump_json(), task_id))
            self._add_event(conn, at, EventKind.TASK_STARTED, f"task:{task_id}",
                            f"task {task_id} started: {row['kind']} {row['target']}", "center")
            return True

    def update_task(self, task_id: str, progress: TaskProgress, *, agent_id: str | None = None,
                    record: str | None = None) -> None:
        with self._write(durable=False) as conn:
            conn.execute("UPDATE tasks SET progress = ? WHERE id = ?", (progress.model_dump_json(), task_id))
            if agent_id is not None:
                conn.execute("UPDATE migrations SET agent_id = ? WHERE task_id = ?", (agent_id, task_id))
            if record is not None:
                conn.execute("UPDATE migrations SET record = ? WHERE task_id = ?", (record, task_id))

    def update_progress(self, progress: Mapping[str, TaskProgress]) -> None:
        with self._write(durable=False) as conn:
            conn.executemany("UPDATE tasks SET progress = ? WHERE id = ?",
                             [(p.model_dump_json(), task_id) for task_id, p in progress.items()])

    def end_task(self, task_id: str, state: TaskState, at: float, *, error: str | None = None,
                 result: TaskResult | None = None, desired_host: str | None = None,
                 desired_power: PowerState | None = None, observed_host: str | None = None,
                 observed_state: ObservedState | None = None) -> bool:
        if not state.terminal:
            raise ValueError(f"{state.value} is no end of a task")
        with self._write() as conn:
            row = conn.execute("SELECT kind, target, started FROM tasks WHERE id = ? AND state IN ('queued', 'running')",
                               (task_id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE tasks SET state = ?, ended = ?, error = ?, result = ? WHERE id = ?",
                         (state.value, at, error, result.model_dump_json() if result else None, task_id))
            if state is TaskState.DONE:  # what it was doing last ("starting") is over
                conn.execute("UPDATE tasks SET progress = json_set(progress, '$.phase', 'done', '$.fraction', 1.0, "
                             "'$.message', '') WHERE id = ?", (task_id,))
            if state is TaskState.DONE and desired_host is not None:
                conn.execute("UPDATE vms SET desired_host = ?, updated = ? WHERE name = ?",
                             (desired_host, at, row["target"]))
            if state is TaskState.DONE and observed_host is not None and observed_state is not None:
                # what the agent that did it said (a migration's record): heartbeats confirm it later
                conn.execute("UPDATE vms SET observed_host = ?, observed_state = ?, updated = ? WHERE name = ?",
                             (observed_host, observed_state.value, at, row["target"]))
            if state is TaskState.DONE and desired_power is not None:
                conn.execute("UPDATE vms SET desired_power = ?, updated = ? WHERE name = ?",
                             (desired_power.value, at, row["target"]))
            took = f" after {at - row['started']:.1f} s" if row["started"] is not None else ""
            self._add_event(conn, at, EventKind.TASK_ENDED, f"task:{task_id}",
                            f"task {task_id} ({row['kind']} {row['target']}) {state.value}{took}"
                            + (f": {error}" if error else ""), "center")
            return True

    def request_cancel(self, task_id: str, who: str, at: float) -> TaskView:
        with self._write() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise NotFound(f"no task {task_id}")
            state = TaskState(row["state"])
            if state.terminal:
                raise Conflict(f"task {task_id} has ended already ({state.value})")
            if state is TaskState.QUEUED:
                conn.execute("UPDATE tasks SET state = 'cancelled', ended = ?, error = ?, cancel_requested = 1 "
                             "WHERE id = ?", (at, f"cancelled by {who} before it started", task_id))
                self._add_event(conn, at, EventKind.TASK_ENDED, f"task:{task_id}",
                                f"task {task_id} cancelled before it started", who)
            else:
                conn.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
                self._add_event(conn, at, EventKind.TASK_CANCEL_REQUESTED, f"task:{task_id}",
                                f"cancel of running task {task_id} requested", who)
            return _task(conn.execute(_TASKS + " WHERE t.id = ?", (task_id,)).fetchone())

    # ---- datastores ----
    def add_datastore(self, datastore: DatastoreView, who: str) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO datastores (name, nbd_url, control_url, added) VALUES (?, ?, ?, ?)",
                             (datastore.name, datastore.nbd_url, datastore.control_url, datastore.added))
            except sqlite3.IntegrityError:
                raise Conflict(f"datastore {datastore.name} exists already") from None
            self._add_event(conn, datastore.added, EventKind.DATASTORE_ADDED, f"datastore:{datastore.name}",
                            f"datastore {datastore.name} added: {datastore.nbd_url}, control {datastore.control_url}",
                            who)

    def join_datastore(self, token_id: str, verify: Callable[[TokenRow | None], None], datastore: DatastoreView,
                       who: str) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
            verify(_token(row) if row else None)
            try:
                conn.execute("INSERT INTO datastores (name, nbd_url, control_url, added) VALUES (?, ?, ?, ?)",
                             (datastore.name, datastore.nbd_url, datastore.control_url, datastore.added))
            except sqlite3.IntegrityError:
                raise Conflict(f"datastore {datastore.name} exists already: remove it first "
                               f"(`kvmotion datastore rm {datastore.name}`)") from None
            conn.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ? AND uses_left IS NOT NULL",
                         (token_id,))
            self._add_event(conn, datastore.added, EventKind.DATASTORE_ADDED, f"datastore:{datastore.name}",
                            f"datastore {datastore.name} joined with token {token_id}: {datastore.nbd_url}, "
                            f"control {datastore.control_url}", who)

    def datastores(self) -> list[DatastoreView]:
        return [DatastoreView(name=r["name"], nbd_url=r["nbd_url"], control_url=r["control_url"], added=r["added"])
                for r in self._conn().execute("SELECT * FROM datastores ORDER BY name")]

    def remove_datastore(self, name: str, who: str, at: float) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM datastores WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no datastore {name}")
            self._add_event(conn, at, EventKind.DATASTORE_REMOVED, f"datastore:{name}", f"datastore {name} removed", who)

    # ---- maintenance, health, rules, DRS ----
    def set_host_mode(self, name: str, mode: HostMode, reason: str, who: str, at: float,
                      homes: Sequence[str] = ()) -> HostRow:
        with self._write() as conn:
            row = conn.execute("SELECT mode FROM hosts WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no host {name} has joined")
            conn.execute("UPDATE hosts SET mode = ?, mode_reason = ? WHERE name = ?", (mode.value, reason, name))
            if homes:
                conn.execute("DELETE FROM homes WHERE host = ?", (name,))
                conn.executemany("INSERT INTO homes (vm, host, since) VALUES (?, ?, ?) ON CONFLICT (vm) DO UPDATE "
                                 "SET host = excluded.host, since = excluded.since", [(vm, name, at) for vm in homes])
            if row["mode"] != mode.value:
                why = f" ({reason})" if reason else ""
                self._add_event(conn, at, EventKind.HOST_MODE, f"host:{name}",
                                f"host {name}: {row['mode'].replace('_', ' ')} -> {mode.value.replace('_', ' ')}{why}",
                                who)
            return _host(conn.execute(_HOSTS + " WHERE h.name = ?", (name,)).fetchone())

    def homes(self, host: str) -> list[str]:
        return [r["vm"] for r in self._conn().execute("SELECT vm FROM homes WHERE host = ? ORDER BY vm", (host,))]

    def clear_homes(self, host: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM homes WHERE host = ?", (host,))

    def report_health(self, host: str, report: HealthReport, who: str, at: float) -> list[HealthEntry]:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM hosts WHERE name = ?", (host,)).fetchone() is None:
                raise NotFound(f"no host {host} has joined")
            before = conn.execute("SELECT max(rank) FROM health WHERE host = ?", (host,)).fetchone()[0] or 0
            old = conn.execute("SELECT severity FROM health WHERE host = ? AND provider = ? AND component = ?",
                               (host, report.provider, report.component)).fetchone()
            if report.severity is Severity.OK:  # recovered: nothing to keep
                conn.execute("DELETE FROM health WHERE host = ? AND provider = ? AND component = ?",
                             (host, report.provider, report.component))
            else:
                conn.execute("INSERT INTO health (host, provider, component, severity, rank, reason, at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, provider, component) DO UPDATE SET "
                             "severity = excluded.severity, rank = excluded.rank, reason = excluded.reason, "
                             "at = excluded.at", (host, report.provider, report.component, report.severity.value,
                                                  report.severity.rank, report.reason, at))
            after = conn.execute("SELECT max(rank) FROM health WHERE host = ?", (host,)).fetchone()[0] or 0
            if (old["severity"] if old else Severity.OK.value) != report.severity.value:
                why = f": {report.reason}" if report.reason else ""
                overall = f"; host {host} is now {_SEVERITIES[after].value}" if after != before else ""
                self._add_event(conn, at, EventKind.HOST_HEALTH, f"host:{host}",
                                f"{report.provider} says {report.component} of {host} is "
                                f"{report.severity.value}{why}{overall}", who)
            return [_health(r) for r in conn.execute("SELECT * FROM health WHERE host = ? ORDER BY provider, "
                                                     "component", (host,))]

    def health(self, host: str | None = None) -> list[HealthEntry]:
        if host is None:
            rows = self._conn().execute("SELECT * FROM health ORDER BY host, provider, component")
        else:
            rows = self._conn().execute("SELECT * FROM health WHERE host = ? ORDER BY provider, component", (host,))
        return [_health(r) for r in rows]

    def add_rule(self, rule: RuleSpec, who: str, at: float) -> None:
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO rules (name, spec, created, created_by) VALUES (?, ?, ?, ?)",
                             (rule.name, rule.model_dump_json(), at, who))
            except sqlite3.IntegrityError:
                raise Conflict(f"rule {rule.name} exists already") from None
            target = f" on {rule.host}" if rule.host else ""
            self._add_event(conn, at, EventKind.RULE_ADDED, f"rule:{rule.name}",
                            f"rule {rule.name} added: {rule.kind.value} {', '.join(rule.vms)}{target} "
                            f"({rule.strength.value})", who)

    def rules(self) -> list[RuleRow]:
        return [RuleRow(rule=RuleSpec.model_validate_json(r["spec"]), created=r["created"], created_by=r["created_by"])
                for r in self._conn().execute("SELECT * FROM rules ORDER BY name")]

    def remove_rule(self, name: str, who: str, at: float) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM rules WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no rule {name}")
            self._add_event(conn, at, EventKind.RULE_REMOVED, f"rule:{name}", f"rule {name} removed", who)

    def drs_config(self) -> DrsConfig:
        row = self._conn().execute("SELECT value FROM settings WHERE key = 'drs'").fetchone()
        try:
            return DrsConfig.model_validate_json(row["value"]) if row else DrsConfig()
        except ValidationError as exc:
            raise SetupError(f"the DRS configuration in {self.path} is damaged: {exc.errors()[0]['msg']}") from None

    def save_drs_config(self, config: DrsConfig, who: str, at: float) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES ('drs', ?) ON CONFLICT (key) DO UPDATE SET "
                         "value = excluded.value", (config.model_dump_json(),))
            self._add_event(conn, at, EventKind.DRS_CONFIGURED, "drs",
                            f"DRS: automation {config.automation.value}, threshold {config.threshold}, "
                            f"every {config.interval:g} s", who)
