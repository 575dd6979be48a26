"""The datastore's control API in-process (no sockets), with callers presenting certificates of a
test CA the way the TLS listener hands them over: who may do what, lease calls acting for the
caller's own host, the audit log, the error shape and DatastoreClient's mapping of it."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmotion.api.address import API_PREFIX
from kvmotion.api.datastore import DatastoreClient
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.serving import Security, secure
from kvmotion.core.errors import Conflict, Forbidden, InvalidInput, LeaseError, NotFound, Unauthorized, Unreachable
from kvmotion.storage.api import RENEW_SUFFIX, create_app
from kvmotion.storage.datastore import Datastore
from tests.certs import TestCA, as_caller

with warnings.catch_warnings():  # starlette's TestClient says it prefers httpx2 to our pinned httpx
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

DISK = "web1.img"
Caller = Callable[..., DatastoreClient]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "cluster")


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    return tmp_path / "ds1" / ".kvmotion" / "audit.log"


@pytest.fixture
def as_(ca: TestCA, tmp_path: Path, audit: Path) -> Caller:
    """as_(identity) -> a client presenting that identity's certificate (None: no certificate)."""
    root = tmp_path / "ds1"
    root.mkdir()
    served = ca.creds(Identity(Kind.DATASTORE, "ds1"))
    security = Security(tls_files=(served.dir / SERVER_CERT, served.dir / SERVER_KEY, served.dir / CA_CERT),
                        audit_log=audit, quiet=(RENEW_SUFFIX,))
    app = secure(create_app(Datastore("ds1", root, 30.0)), security, "datastore ds1")

    def client(who: Identity | None) -> DatastoreClient:
        pem = ca.creds(who).pem if who is not None else None
        return DatastoreClient("http://testserver", http=TestClient(as_caller(app, pem)))

    return client


def host(name: str) -> Identity:
    return Identity(Kind.HOST, name)


ADMIN = Identity(Kind.USER, "admin", Role.ADMIN)
OPERATOR = Identity(Kind.USER, "otto", Role.OPERATOR)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)


def test_disks_and_leases_roundtrip(as_: Caller) -> None:
    op, a, b = as_(OPERATOR), as_(host("host-a")), as_(host("host-b"))
    assert op.info().name == "ds1" and a.info().lease_ttl == 30.0
    created = op.create_disk(DISK, 8 << 20)
    assert created.size == 8 << 20 and created.holder is None
    lease = a.acquire(DISK, "web1")
    assert (lease.host, lease.vm, lease.generation) == ("host-a", "web1", 1)  # the caller's own host
    assert a.renew(DISK).generation == 1
    with pytest.raises(LeaseError, match="generation 1 now, not 7"):
        a.transfer(DISK, "host-a", "host-b", "web1", generation=7)
    moved = a.transfer(DISK, "host-a", "host-b", "web1", generation=1)
    assert (moved.host, moved.generation, moved.handed_over_by) == ("host-b", 2, "host-a")
    back = a.transfer(DISK, "host-b", "host-a", "web1")  # a rollback: host-a handed it over, host-b never renewed
    assert (back.host, back.generation) == ("host-a", 3)
    a.transfer(DISK, "host-a", "host-b", "web1")
    assert b.renew(DISK).handed_over_by is None  # host-b runs the VM now
    [disk] = as_(VIEWER).list_disks()
    assert (disk.name, disk.holder, disk.generation) == (DISK, "host-b", 4)
    b.release(DISK)
    assert op.disk(DISK).lease is None
    op.delete_disk(DISK)
    assert op.list_disks() == []


def test_a_host_cannot_touch_another_hosts_lease(as_: Caller) -> None:
    as_(OPERATOR).create_disk(DISK, 8 << 20)
    a, b = as_(host("host-a")), as_(host("host-b"))
    a.acquire(DISK, "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        b.renew(DISK)
    with pytest.raises(LeaseError, match="leased to host-a"):
        b.release(DISK)
    with pytest.raises(LeaseError, match="host-b did not hand it over"):
        b.transfer(DISK, "host-a", "host-b", "web1")
    with pytest.raises(Forbidden, match="host host-b may not move the lease"):
        b.transfer(DISK, "host-a", "host-c", "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        b.acquire(DISK, "web1")
    lease = as_(VIEWER).disk(DISK).lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 1)


def test_who_may_call_what(as_: Caller) -> None:
    with pytest.raises(Forbidden, match=r"user:vera \(viewer\) may not create disks"):
        as_(VIEWER).create_disk(DISK, 8 << 20)
    with pytest.raises(Forbidden, match="host:host-a may not create disks"):
        as_(host("host-a")).create_disk(DISK, 8 << 20)
    as_(OPERATOR).create_disk(DISK, 8 << 20)
    for user in (ADMIN, OPERATOR, VIEWER):
        with pytest.raises(Forbidden, match="may not change disk leases"):
            as_(user).acquire(DISK, "web1")
    qemu = as_(Identity(Kind.QEMU, "host-a"))  # a QEMU's certificate opens NBD exports, never an API
    with pytest.raises(Forbidden):
        qemu.acquire(DISK, "web1")
    with pytest.raises(Forbidden):
        qemu.list_disks()
    with pytest.raises(Forbidden, match="host:host-a may not delete disks"):
        as_(host("host-a")).delete_disk(DISK)
    with pytest.raises(Unauthorized, match="no client certificate"):
        as_(None).info()
    assert as_(VIEWER).disk(DISK).size == 8 << 20


def refused(client: DatastoreClient, path: str, body: object, says: str) -> None:
    """A hand-made body (the client itself sends only wire models) is refused: 422, one line, `says`."""
    r = client._http.request("POST", f"{API_PREFIX}{path}", json=body)
    assert r.status_code == 422 and r.json()["error"]["kind"] == "InvalidInput", r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and re.search(says, message), message


def test_lease_bodies_name_no_host(as_: Caller) -> None:
    """A body naming a host is refused: the certificate says who acts."""
    as_(OPERATOR).create_disk(DISK, 8 << 20)
    b = as_(host("host-b"))
    named = r"host: (is not a known field|Extra inputs are not permitted)"
    refused(b, f"/disks/{DISK}/acquire", {"host": "host-a", "vm": "web1"}, named)
    refused(b, f"/disks/{DISK}/renew", {"host": "host-a"}, named)
    refused(b, f"/disks/{DISK}/release", {"host": "host-a"}, named)
    refused(b, f"/disks/{DISK}/transfer", {"host": "host-a", "from_host": "host-a", "to_host": "host-b", "vm": "web1"},
            named)
    assert as_(VIEWER).disk(DISK).lease is None


def test_audit_log_has_every_mutating_call_but_successful_renewals(as_: Caller, audit: Path) -> None:
    as_(OPERATOR).create_disk(DISK, 8 << 20)
    a = as_(host("host-a"))
    a.acquire(DISK, "web1")
    a.renew(DISK)
    with pytest.raises(LeaseError):
        as_(host("host-b")).renew(DISK)
    with pytest.raises(Forbidden):
        as_(VIEWER).delete_disk(DISK)
    as_(VIEWER).list_disks()  # reads are not audited
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["who"], e["method"], e["path"], e["status"]) for e in entries] == [
        ("user:otto (operator)", "POST", "/v1/disks", 200),
        ("host:host-a", "POST", f"/v1/disks/{DISK}/acquire", 200),
        ("host:host-b", "POST", f"/v1/disks/{DISK}/renew", 409),
        ("user:vera (viewer)", "DELETE", f"/v1/disks/{DISK}", 403),
    ]


def test_errors_come_back_as_kvmotion_errors(as_: Caller) -> None:
    op, a = as_(OPERATOR), as_(host("host-a"))
    op.create_disk(DISK, 8 << 20)
    with pytest.raises(Conflict, match="already exists"):
        op.create_disk(DISK, 8 << 20)
    with pytest.raises(InvalidInput, match="multiple of 512"):
        op.create_disk("x.img", 1000)
    with pytest.raises(NotFound, match="no disk"):
        a.acquire("nope.img", "web1")
    a.acquire(DISK, "web1")
    with pytest.raises(LeaseError, match="cannot transfer"):
        a.transfer(DISK, "host-c", "host-a", "web1")
    with pytest.raises(LeaseError, match="release the lease first"):
        op.delete_disk(DISK)
    with pytest.raises(InvalidInput):  # checked before any request is sent
        op.disk("../etc")


def test_malformed_request_is_one_line_invalid_input(as_: Caller) -> None:
    refused(as_(OPERATOR), "/disks", {"name": "x.img"}, "size")


def test_insecure_datastore_takes_the_host_from_a_header(tmp_path: Path) -> None:
    """--insecure: no certificates, so lease calls claim a host (today's plain-text behaviour)."""
    root = tmp_path / "ds1"
    root.mkdir()
    app = secure(create_app(Datastore("ds1", root, 30.0)), Security(tls_files=None, audit_log=None, insecure=True),
                 "datastore ds1")
    http = TestClient(app)
    anyone = DatastoreClient("http://testserver", http=http)
    anyone.create_disk(DISK, 8 << 20)
    with pytest.raises(InvalidInput, match="Kvmotion-Host header"):
        anyone.acquire(DISK, "web1")
    claimed = DatastoreClient("http://testserver", http=TestClient(app), host="host-a")
    assert claimed.acquire(DISK, "web1").host == "host-a"


def test_https_needs_credentials_and_unreachable_datastore() -> None:
    from kvmotion.core.errors import SetupError

    with pytest.raises(SetupError, match="certificate"):
        DatastoreClient("https://127.0.0.1:9")
    client = DatastoreClient("http://127.0.0.1:9", timeout=1)  # discard port: nothing listens
    assert not client.reachable()
    with pytest.raises(Unreachable, match="unreachable"):
        client.list_disks()
