"""The center's SQLite store: create, reopen, upgrade from an older schema, concurrent writers,
failed transactions that leave nothing behind, and what heartbeats and silence change."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from kvmotion.api.center import (
    ActiveMigration,
    ClusterSettings,
    DatastoreView,
    EventKind,
    HostLoad,
    HostMode,
    HostState,
    MigrationRole,
    ObservedState,
    ReportedState,
    VmReport,
)
from kvmotion.api.identity import Role
from kvmotion.center import store as store_mod
from kvmotion.center.store import (
    SCHEMA_VERSION,
    HostRow,
    SqliteStore,
    TokenRow,
    UserRow,
)
from kvmotion.core.errors import Conflict, NotFound, SetupError, Unauthorized

LOAD = HostLoad(cpus=4, memory_total=8 << 30, memory_available=6 << 30)


def _host(name: str, at: float = 100.0) -> HostRow:
    return HostRow(name=name, address="10.0.0.1", agent_url="https://10.0.0.1:7701", state=HostState.NOT_RESPONDING,
                   joined=at)


def _token(token_id: str = "0123456789ab", uses: int | None = 2) -> TokenRow:
    return TokenRow(id=token_id, secret_hash="ab" * 32, expires=1e12, uses_left=uses, created=1.0, created_by="test")


def _admit(token: TokenRow | None) -> None:
    if token is None:
        raise Unauthorized("no such token")


def _joined(store: SqliteStore, name: str, token_id: str = "0123456789ab") -> HostRow:
    if store.token(token_id) is None:
        store.add_token(_token(token_id, None), "test")
    return store.join(token_id, _admit, _host(name), f"host:{name}")


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "center.db")
    yield s
    s.close()


def test_create(tmp_path: Path) -> None:
    path = tmp_path / "center.db"
    s = SqliteStore(path)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 6
        assert s.settings() == ClusterSettings()
        assert s.users() == [] and s.hosts() == [] and s.events() == []
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        s.close()


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "center.db"
    s = SqliteStore(path)
    admin = UserRow(name="admin", role=Role.ADMIN, password_hash="scrypt$x", created=5.0)
    assert s.bootstrap(admin, _token(), ClusterSettings(encrypted=False, cpu_baseline="Haswell-v4"), at=5.0)
    s.add_datastore(DatastoreView(name="ds1", nbd_url="nbds://10.0.0.9:10809", control_url="https://10.0.0.9:10810",
                                  added=6.0), "user:admin (admin)")
    _joined(s, "host-a")
    s.close()
    with pytest.raises(SetupError, match="closed"):
        s.users()

    again = SqliteStore(path)
    try:
        assert again.users() == [admin]
        assert again.settings() == ClusterSettings(encrypted=False, cpu_baseline="Haswell-v4")
        assert [d.name for d in again.datastores()] == ["ds1"]
        assert [h.name for h in again.hosts()] == ["host-a"]
        assert [e.kind for e in again.events()] == [EventKind.CENTER_INITIALIZED, EventKind.DATASTORE_ADDED,
                                                    EventKind.HOST_JOINED]
        assert again.token("0123456789ab").uses_left == 1  # the bootstrap token, spent once
        # A second bootstrap finds the admin and does nothing.
        assert not again.bootstrap(UserRow("admin", Role.ADMIN, "other", 9.0), _token("ffffffffffff"), ClusterSettings(), 9.0)
        assert again.users() == [admin] and again.token("ffffffffffff") is None
    finally:
        again.close()


# The schema of version 1 as it was released, written by hand: an upgrade must keep its rows.
V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
INSERT INTO schema_version VALUES (1);
CREATE TABLE hosts (name TEXT PRIMARY KEY, address TEXT NOT NULL, agent_url TEXT NOT NULL, state TEXT NOT NULL,
    joined REAL NOT NULL, last_heartbeat REAL, facts TEXT NOT NULL DEFAULT '{}', load TEXT) STRICT;
CREATE TABLE datastores (name TEXT PRIMARY KEY, nbd_url TEXT NOT NULL, control_url TEXT NOT NULL, added REAL NOT NULL) STRICT;
CREATE TABLE portgroups (host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE, name TEXT NOT NULL,
    bridge TEXT NOT NULL, PRIMARY KEY (host, name)) STRICT;
CREATE TABLE vms (name TEXT PRIMARY KEY, spec TEXT, desired_host TEXT, desired_power TEXT, observed_host TEXT,
    observed_state TEXT NOT NULL, updated REAL NOT NULL) STRICT;
CREATE INDEX vms_observed_host ON vms (observed_host);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, object TEXT NOT NULL,
    message TEXT NOT NULL, who TEXT NOT NULL) STRICT;
CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL, created REAL NOT NULL) STRICT;
CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, expires REAL NOT NULL, uses_left INTEGER,
    created REAL NOT NULL, created_by TEXT NOT NULL) STRICT;
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
INSERT INTO hosts (name, address, agent_url, state, joined, last_heartbeat) VALUES
    ('host-a', '10.0.0.1', 'https://10.0.0.1:7701', 'connected', 10.0, 20.0),
    ('host-m', '10.0.0.2', 'https://10.0.0.2:7701', 'maintenance', 10.0, 20.0);
INSERT INTO vms (name, observed_host, observed_state, updated) VALUES ('web1', 'host-a', 'running', 20.0);
INSERT INTO users VALUES ('admin', 'admin', 'scrypt$old', 1.0);
INSERT INTO settings VALUES ('encrypted', 'false'), ('not_responding_after', '15.0');
INSERT INTO events (at, kind, object, message, who) VALUES (1.0, 'center_initialized', 'center', 'made', 'center');
"""


def test_upgrade_to_6_keeps_what_open_migrations_reserve(tmp_path: Path) -> None:
    """Step 6 moves a migration's reservation beside it: one queued before the upgrade still counts."""
    path = tmp_path / "center.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT")
        conn.execute("INSERT INTO schema_version VALUES (5)")
        for step in store_mod.UPGRADES[:5]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT INTO vms (name, spec, observed_state, updated) VALUES "
                     "('web1', '{\"memory\": 536870912, \"vcpus\": 2}', 'running', 1.0), "
                     "('web2', '{\"memory\": 268435456, \"vcpus\": 1}', 'running', 1.0)")
        for task, vm, state in (("t1", "web1", "queued"), ("t2", "web2", "done")):
            conn.execute("INSERT INTO tasks (id, kind, target, state, created, requested_by) "
                         "VALUES (?, 'migrate', ?, ?, 3.0, 'user:admin')", (task, vm, state))
            conn.execute("INSERT INTO migrations (id, task_id, vm, source, destination) "
                         "VALUES (?, ?, ?, 'host-a', 'host-b')", (task, task, vm))
    s = SqliteStore(path)
    try:
        assert s.schema_version() == 6
        assert s.reservations() == {"host-b": (512 << 20, 2)}  # the ended one reserves nothing
    finally:
        s.close()


def test_upgrade_from_version_1(tmp_path: Path) -> None:
    path = tmp_path / "center.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.close()

    s = SqliteStore(path)
    try:
        assert s.schema_version() == 6
        host = s.host("host-a")
        assert host is not None and host.state is HostState.CONNECTED and host.last_heartbeat == 20.0 and host.vms == 1
        assert host.mode is HostMode.NORMAL and s.rules() == [] and s.health() == [] and s.session("0" * 64) is None
        old = s.host("host-m")  # maintenance was a state: now a mode, its state known again at its next beat
        assert old is not None and old.mode is HostMode.MAINTENANCE and old.state is HostState.NOT_RESPONDING
        assert s.vm("web1").observed_state is ObservedState.RUNNING
        assert s.user("admin").password_hash == "scrypt$old"
        assert s.settings() == ClusterSettings(encrypted=False, not_responding_after=15.0)
        # New events continue after the old ones; version 2's tables exist and take rows.
        event = s.add_event(2.0, EventKind.HOST_REMOVED, "host:x", "test", "test")
        assert event.id == 2
        with sqlite3.connect(path) as raw:
            raw.execute("INSERT INTO tasks (id, kind, target, state, created, requested_by) "
                        "VALUES ('t1', 'migrate', 'web1', 'queued', 3.0, 'user:admin')")
            raw.execute("INSERT INTO migrations (id, task_id, vm, source, destination) "
                        "VALUES ('0123456789ab', 't1', 'web1', 'host-a', 'host-b')")
    finally:
        s.close()
    assert SqliteStore(path).schema_version() == 6  # reopening applies nothing twice


def test_newer_or_foreign_files_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT")
        conn.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(SetupError, match="schema version 99, written by a newer kvmotion"):
        SqliteStore(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is no database" * 100)
    with pytest.raises(SetupError, match="not a usable center store"):
        SqliteStore(garbage)


def test_concurrent_writers(tmp_path: Path) -> None:
    """Threads of one store and a second store on the same file (another process, as far as SQLite
    sees) write at once: every write lands, event ids are unique, nothing waits past the timeout."""
    path = tmp_path / "center.db"
    first, second = SqliteStore(path), SqliteStore(path)
    errors: list[BaseException] = []
    per_thread = 25

    def writer(store: SqliteStore, n: int) -> None:
        try:
            for i in range(per_thread):
                store.add_datastore(DatastoreView(name=f"ds-{n}-{i}", nbd_url="nbd://10.0.0.9", control_url="http://10.0.0.9:1",
                                                  added=float(i)), f"writer {n}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(first if n % 2 else second, n)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert len(first.datastores()) == 8 * per_thread
        ids = [e.id for e in second.events(limit=1000)]
        assert len(ids) == len(set(ids)) == 8 * per_thread
    finally:
        first.close()
        second.close()


def test_used_from_asyncio_through_to_thread(store: SqliteStore) -> None:
    _joined(store, "host-a")

    async def beats() -> list[HostRow]:
        return await asyncio.gather(*(asyncio.to_thread(store.record_heartbeat, "host-a", 200.0 + i, (), LOAD, ())
                                      for i in range(20)))

    rows = asyncio.run(beats())
    assert {r.state for r in rows} == {HostState.CONNECTED}
    assert store.host("host-a").last_heartbeat in {200.0 + i for i in range(20)}
    assert [e.kind for e in store.events()].count(EventKind.HOST_CONNECTED) == 1


def test_a_refused_join_writes_nothing(store: SqliteStore) -> None:
    store.add_token(_token(uses=1), "test")
    before = store.events()

    def refuse(token: TokenRow | None) -> None:
        raise Unauthorized("refused")

    with pytest.raises(Unauthorized):
        store.join("0123456789ab", refuse, _host("host-a"), "host:host-a")
    assert store.hosts() == [] and store.token("0123456789ab").uses_left == 1 and store.events() == before

    store.join("0123456789ab", _admit, _host("host-a"), "host:host-a")
    assert store.token("0123456789ab").uses_left == 0
    store.add_token(_token("bbbbbbbbbbbb", uses=1), "test")
    with pytest.raises(Conflict, match="host host-a has joined already"):  # the name is taken: the token is kept
        store.join("bbbbbbbbbbbb", _admit, _host("host-a"), "host:host-a")
    assert store.token("bbbbbbbbbbbb").uses_left == 1


def test_a_transaction_failing_half_way_is_undone(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat of a not-responding host changes the host, its VMs and adds an event: when the
    event fails to be written, neither the host nor its VMs changed."""
    _joined(store, "host-a")
    store.record_heartbeat("host-a", 200.0, (VmReport(name="web1", state=ReportedState.RUNNING),), LOAD, ())
    assert store.mark_not_responding("host-a", 200.0, 215.0)
    snapshot = (store.host("host-a"), store.vms(), store.events())

    def broken(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SqliteStore, "_add_event", broken)
    with pytest.raises(sqlite3.OperationalError):
        store.record_heartbeat("host-a", 230.0, (VmReport(name="web2", state=ReportedState.RUNNING),), LOAD, ())
    assert (store.host("host-a"), store.vms(), store.events()) == snapshot
    monkeypatch.undo()
    assert store.record_heartbeat("host-a", 231.0, (), LOAD, ()).state is HostState.CONNECTED  # the store still works


def test_heartbeats_observe_vms(store: SqliteStore) -> None:
    _joined(store, "host-a")
    _joined(store, "host-b")
    migration = ActiveMigration(id="0123456789ab", vm="web2", role=MigrationRole.SOURCE, peer="host-b", phase="precopy")
    row = store.record_heartbeat("host-a", 200.0, (VmReport(name="web1", state=ReportedState.RUNNING),
                                                   VmReport(name="web2", state=ReportedState.MIGRATING)), LOAD, (migration,))
    assert row.state is HostState.CONNECTED and row.vms == 2 and row.load == LOAD and row.migrations == (migration,)
    # The destination's shadow changes nothing; once web2 runs there, it is observed there.
    store.record_heartbeat("host-b", 201.0, (VmReport(name="web2", state=ReportedState.INCOMING),), LOAD, ())
    assert store.vm("web2").observed_host == "host-a"
    store.record_heartbeat("host-b", 202.0, (VmReport(name="web2", state=ReportedState.RUNNING),), LOAD, ())
    assert (store.vm("web2").observed_host, store.vm("web2").observed_state) == ("host-b", ObservedState.RUNNING)
    # host-a no longer reports web1: absent, not deleted; web2 is host-b's and stays so.
    store.record_heartbeat("host-a", 203.0, (), LOAD, ())
    assert store.vm("web1").observed_state is ObservedState.ABSENT
    assert store.vm("web2").observed_state is ObservedState.RUNNING
    with pytest.raises(NotFound, match="host host-c has not joined"):
        store.record_heartbeat("host-c", 204.0, (), LOAD, ())


def test_silence_and_return(store: SqliteStore) -> None:
    _joined(store, "host-a")
    store.record_heartbeat("host-a", 200.0, (VmReport(name="web1", state=ReportedState.RUNNING),), LOAD, ())
    assert not store.mark_not_responding("host-a", 199.0, 215.0)  # a beat came in since the decision
    assert store.mark_not_responding("host-a", 200.0, 215.0)
    assert not store.mark_not_responding("host-a", 200.0, 216.0)  # once
    assert store.host("host-a").state is HostState.NOT_RESPONDING
    assert store.vm("web1").observed_state is ObservedState.UNKNOWN and store.vm("web1").observed_host == "host-a"
    store.record_heartbeat("host-a", 230.0, (VmReport(name="web1", state=ReportedState.RUNNING),), LOAD, ())
    assert store.host("host-a").state is HostState.CONNECTED
    assert store.vm("web1").observed_state is ObservedState.RUNNING
    kinds = [(e.kind, e.message) for e in store.events() if e.object == "host:host-a"]
    assert kinds[-2:] == [
        (EventKind.HOST_NOT_RESPONDING, "host host-a is not responding (last heartbeat 15.0 s ago); its VMs are unknown"),
        (EventKind.HOST_CONNECTED, "host host-a is connected, 30.0 s after its last heartbeat"),
    ]


def test_removing_a_host_keeps_its_vms_unknown(store: SqliteStore) -> None:
    _joined(store, "host-a")
    store.record_heartbeat("host-a", 200.0, (VmReport(name="web1", state=ReportedState.RUNNING),), LOAD, ())
    store.remove_host("host-a", "user:admin (admin)", 210.0)
    assert store.hosts() == [] and store.vm("web1").observed_state is ObservedState.UNKNOWN
    with pytest.raises(NotFound):
        store.remove_host("host-a", "user:admin (admin)", 211.0)


def test_events_since_and_pruning(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "EVENTS_KEPT", 1500)
    for i in range(2000):
        store.add_event(float(i), EventKind.HOST_REMOVED, f"host:h{i}", "test", "test")
    page = store.events(since=0, limit=10)
    assert [e.id for e in page] == list(range(501, 511))  # pruned at the 2000th up to 2000 - 1500
    assert [e.id for e in store.events(since=1995)] == [1996, 1997, 1998, 1999, 2000]
    assert store.events(since=2000) == []
