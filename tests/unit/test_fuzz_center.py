"""The center's whole API fuzzed from its OpenAPI document (tests/fuzz.py): no 5xx, one-line
errors, nothing written outside the center's data folder, no process started; a viewer is refused
every change and the admin's reads (users, tokens).

In process, secured as `center serve` serves it, callers presenting certificates of the center's
own CA. The admin calls every route but the heartbeats (full and Alive), which host-a (joined
before the run) sends for itself. Half of the generated bodies carry what gets past the first refusals: a join token
that may join any number of hosts, an address and two good CSRs, the admin's password and a CSR, the
protocol version of a heartbeat, a datastore's URLs. Passwords are hashed at a low scrypt cost to keep the run short.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kvmotion.api.center import PROTOCOL_VERSION, ClusterSettings, DatastoreSpec, JoinRequest
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import init_ca, new_key_and_csr
from kvmotion.api.serving import Security, secure
from kvmotion.center.app import QUIET_SUFFIXES, create_app
from kvmotion.center.service import Center
from kvmotion.center.store import SqliteStore
from tests.certs import TestCA
from tests.fuzz import FuzzReport, changes_refused, fuzz, label_of

ADMIN = Identity(Kind.USER, "admin", Role.ADMIN)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
HOST = Identity(Kind.HOST, "host-a")
HEARTBEAT = "POST /v1/hosts/{name}/heartbeat"
ALIVE = "POST /v1/hosts/{name}/alive"
PUBLIC = frozenset({"POST /v1/join", "POST /v1/datastores/join", "POST /v1/login", "POST /v1/sessions"})
# Any user may sign itself out and ask for its own one-time sign-in link to the web client.
OWN_SESSION = frozenset({"DELETE /v1/sessions/current", "POST /v1/sessions/signin"})
ADMIN_READS = frozenset({"GET /v1/users", "GET /v1/tokens"})
ADMIN_EXAMPLES = 110  # per operation and generation mode
MIN_ADMIN_REQUESTS = 2000
DATASTORE = {"nbd_url": "nbds://127.0.0.1:10809", "control_url": "https://127.0.0.1:10810"}


# SQLite writes its files from C, out of sight of the harness's audit hook: every database the run
# opens is recorded here instead (the store opens one connection per worker thread as it needs them).
_databases: list[str] | None = None


def _on_audit(event: str, args: tuple) -> None:
    if event == "sqlite3.connect" and _databases is not None:
        _databases.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_on_audit)


class WithDefault:
    """`app` as reached by a client with `pem` when the fuzz harness presents none (its schema load)."""

    def __init__(self, app, pem: str) -> None:  # type: ignore[no-untyped-def]
        self.app, self.pem = app, pem

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] in ("http", "websocket"):
            tls = scope.setdefault("extensions", {}).setdefault("tls", {})
            tls.setdefault("client_cert_chain", [self.pem])
        await self.app(scope, receive, send)


class CenterUnderTest:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        ca = init_ca(self.data / "ca")
        self.store = SqliteStore(self.data / "center.db")
        center = Center(self.store, ca, password_cost=10)
        first = center.bootstrap(ClusterSettings())
        assert first is not None
        self.password, self.token = first.admin_password, first.token
        self.ca = TestCA(self.data)
        self.join_fields = {"token": self.token, "host_csr": new_key_and_csr()[1], "qemu_csr": new_key_and_csr()[1]}
        center.join(JoinRequest(name="host-a", address="127.0.0.1", **self.join_fields))
        center.add_datastore(DatastoreSpec(name="ds1", **DATASTORE), ADMIN)
        self.token_id = center.tokens()[0].id
        self.unsecured = create_app(center)
        self.app = secure(self.unsecured, Security(tls_files=None, audit_log=self.data / "audit.log",
                                                   quiet=QUIET_SUFFIXES, optional_client_cert=True), "center")

    def pem(self, who: Identity) -> str:
        return self.ca.creds(who).pem

    def fuzz(self, examples: int, caller, expect=None) -> FuzzReport:  # type: ignore[no-untyped-def]
        return fuzz(WithDefault(self.app, self.pem(ADMIN)), roots=[self.data], examples=examples, caller=caller,
                    expect=expect, known={"name": ["host-a", "ds1"], "token_id": [self.token_id]},
                    bodies={"POST /v1/join": {**self.join_fields, "address": "127.0.0.2"},
                            "POST /v1/datastores/join": {"token": self.token, "name": "ds2", "address": "127.0.0.3",
                                                         "csr": new_key_and_csr()[1]},
                            "POST /v1/login": {"user": "admin", "password": self.password, "csr": new_key_and_csr()[1]},
                            "POST /v1/sessions": {"user": "admin", "password": self.password},
                            "POST /v1/datastores": DATASTORE,
                            HEARTBEAT: {"version": PROTOCOL_VERSION, "vms": [], "migrations": [], "health": [],
                                        "load": {"cpus": 1, "memory_total": 1 << 30, "memory_available": 1 << 29}},
                            ALIVE: {"version": PROTOCOL_VERSION, "seq": 1, "digest": "0" * 64}})


@pytest.fixture
def center(tmp_path: Path):
    c = CenterUnderTest(tmp_path)
    yield c
    c.store.close()


def test_admin_fuzz(center: CenterUnderTest) -> None:
    global _databases
    admin, host = center.pem(ADMIN), center.pem(HOST)

    def expect(case, response) -> str | None:  # type: ignore[no-untyped-def]
        if response.status_code != 403:
            return None
        if case.operation.path.endswith(QUIET_SUFFIXES) and case.path_parameters.get("name") != HOST.name:
            return None  # host-a sending another host's heartbeat: refused, as it must be
        return "the admin (or host-a for its own heartbeat) refused"

    _databases = []
    try:
        report = center.fuzz(ADMIN_EXAMPLES, caller=lambda label: host if label in (HEARTBEAT, ALIVE) else admin, expect=expect)
        opened = set(_databases)
    finally:
        _databases = None
    assert opened == {os.path.realpath(center.data / "center.db")}
    print(report.summary(), report.table(), sep="\n")
    report.assert_clean(min_requests=MIN_ADMIN_REQUESTS)
    document = center.unsecured.openapi()["paths"]
    assert len(report.per_operation) == sum(len(methods) for methods in document.values())  # every one was called
    ok = {op for (op, status), n in report.by_operation_status.items() if 200 <= status < 300}
    assert {"POST /v1/join", "POST /v1/datastores/join", "POST /v1/login", "POST /v1/sessions", HEARTBEAT, ALIVE,
            "PATCH /v1/settings", "POST /v1/users", "POST /v1/tokens", "POST /v1/datastores",
            "DELETE /v1/datastores/{name}"} <= ok  # past the first refusals


def test_viewer_changes_refused_fuzz(center: CenterUnderTest) -> None:
    refused = changes_refused(PUBLIC | OWN_SESSION)

    def expect(case, response) -> str | None:  # type: ignore[no-untyped-def]
        if label_of(case.operation) in ADMIN_READS:
            return None if response.status_code == 403 else "an admin's read not refused"
        return refused(case, response)

    report = center.fuzz(15, caller=lambda label: center.pem(VIEWER), expect=expect)
    print(report.summary(), report.table(), sep="\n")
    report.assert_clean(min_requests=300)
    assert report.statuses[403]
