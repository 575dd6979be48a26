"""The center's HTTP API in process (TestClient, certificates presented as the TLS listener
presents them): join, login, who may do what, heartbeats and silence, events, the audit log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from kvmotion.api.center import (
    PROTOCOL_VERSION,
    ClusterSettings,
    EventKind,
)
from kvmotion.api.identity import Identity, Kind, Role, identity_of
from kvmotion.api.pki import init_ca, new_key_and_csr
from kvmotion.api.serving import Security, secure
from kvmotion.center.app import QUIET_SUFFIXES, create_app
from kvmotion.center.heartbeat import HeartbeatController
from kvmotion.center.service import Center
from kvmotion.center.store import SqliteStore
from tests.certs import TestCA, as_caller

T0 = 1_800_000_000.0
ADMIN = Identity(Kind.USER, "admin", Role.ADMIN)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
LOAD = {"cpus": 2, "memory_total": 1 << 30, "memory_available": 1 << 29}
D1, D2 = "a" * 64, "b" * 64  # report digests


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Cluster:
    """A center over a data folder in `root`, its clock injected; certificates from its own CA."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.clock = Clock(T0)
        ca = init_ca(self.data / "ca")
        self.store = SqliteStore(self.data / "center.db")
        self.center = Center(self.store, ca, clock=self.clock, password_cost=10)
        first = self.center.bootstrap(ClusterSettings())
        assert first is not None
        self.admin_password, self.token = first.admin_password, first.token
        self.app = create_app(self.center, HeartbeatController(self.store, clock=self.clock, interval=0.01))
        self.secured = secure(self.app, Security(tls_files=None, audit_log=self.data / "audit.log", quiet=QUIET_SUFFIXES,
                                                 optional_client_cert=True), "center")
        self.ca = TestCA(self.data)  # issues from the center's CA (data/ca)

    def client(self, who: Identity | None) -> TestClient:
        pem = self.ca.creds(who).pem if who is not None else None
        return TestClient(as_caller(self.secured, pem))

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in (self.data / "audit.log").read_text().splitlines()]


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.store.close()


def join_body(token: str, name: str = "host-a", address: str = "10.0.0.1") -> tuple[dict, bytes, bytes]:
    host_key, host_csr = new_key_and_csr()
    qemu_key, qemu_csr = new_key_and_csr()
    body = {"token": token, "name": name, "address": address, "host_csr": host_csr, "qemu_csr": qemu_csr}
    return body, host_key, qemu_key


def state(cluster: Cluster) -> tuple:
    """Everything a refused call must leave as it was."""
    s = cluster.store
    return s.hosts(), s.tokens(), s.events(limit=1000), s.users(), s.datastores()


def test_join_with_a_good_token(cluster: Cluster) -> None:
    body, host_key, qemu_key = join_body(cluster.token)
    r = cluster.client(None).post("/v1/join", json=body)
    assert r.status_code == 201, r.text
    answer = r.json()
    ca = x509.load_pem_x509_certificate(answer["ca_cert"].encode())
    assert ca == cluster.center.ca.cert
    for field, kind, key in (("host_cert", Kind.HOST, host_key), ("qemu_cert", Kind.QEMU, qemu_key)):
        cert = x509.load_pem_x509_certificate(answer[field].encode())
        cert.verify_directly_issued_by(ca)
        assert identity_of(cert) == Identity(kind, "host-a")
        assert cert.public_key() == serialization.load_pem_private_key(key, None).public_key()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert answer["host"]["name"] == "host-a" and answer["host"]["state"] == "not_responding"
    assert answer["host"]["agent_url"] == "https://10.0.0.1:7701"
    assert answer["settings"] == ClusterSettings().model_dump()
    assert [h.name for h in cluster.store.hosts()] == ["host-a"]
    assert cluster.store.events()[-1].kind is EventKind.HOST_JOINED
    assert cluster.audit()[-1] | {"at": 0, "ms": 0} == {"at": 0, "ms": 0, "client": "testclient", "method": "POST",
                                                        "path": "/v1/join", "status": 201, "who": "joining host:host-a"}
    # The name is taken now: a second join is refused and issues nothing.
    again, _, _ = join_body(cluster.token)
    before = state(cluster)
    r = cluster.client(None).post("/v1/join", json=again)
    assert r.status_code == 409 and "host host-a has joined already" in r.json()["error"]["message"]
    assert state(cluster) == before


def _token(cluster: Cluster, **request: object) -> str:
    r = cluster.client(ADMIN).post("/v1/tokens", json=request)
    assert r.status_code == 201, r.text
    return r.json()["token"]


@pytest.mark.parametrize("case", ["expired", "forged", "used up", "another CA", "malformed", "unknown"])
def test_bad_tokens_are_refused_and_nothing_is_issued(cluster: Cluster, case: str) -> None:
    token = _token(cluster, ttl=3600, uses=1)
    prefix, ca_hash, token_id, secret = token.split(".")
    if case == "expired":
        cluster.clock.now += 3600
    elif case == "forged":
        token = ".".join((prefix, ca_hash, token_id, "0" * 32))
    elif case == "used up":
        assert cluster.client(None).post("/v1/join", json=join_body(token, "host-z")[0]).status_code == 201
    elif case == "another CA":
        token = ".".join((prefix, "0" * 64, token_id, secret))
    elif case == "malformed":
        token = token[:-1]
    elif case == "unknown":
        token = ".".join((prefix, ca_hash, "0" * 12, secret))
    before = state(cluster)
    r = cluster.client(None).post("/v1/join", json=join_body(token)[0])
    says = {"expired": "expired at", "forged": "is forged", "used up": "is used up", "another CA": "another cluster",
            "malformed": "malformed join token", "unknown": "unknown join token"}[case]
    assert r.status_code == (422 if case == "malformed" else 401)
    message = r.json()["error"]["message"]
    assert says in message and "\n" not in message and secret not in message
    assert "host_cert" not in r.text and "BEGIN CERTIFICATE" not in r.text
    assert state(cluster) == before
    assert cluster.store.host("host-a") is None


def test_join_needs_two_keys_and_good_csrs(cluster: Cluster) -> None:
    body, _, _ = join_body(cluster.token)
    before = state(cluster)
    same = cluster.client(None).post("/v1/join", json={**body, "qemu_csr": body["host_csr"]})
    assert same.status_code == 422 and "QEMU needs a key of its own" in same.json()["error"]["message"]
    bad = cluster.client(None).post("/v1/join", json={**body, "host_csr": "not a csr"})
    assert bad.json()["error"]["message"] == "invalid host CSR: not a PEM certificate signing request"
    for address, says in (("10.0.0.300", "address: invalid IP address"), ("0.0.0.0", "0.0.0.0 is no address peers can reach"),
                          ("fe80::1%eth0", "is no address peers can reach"), ("::", ":: is no address peers can reach")):
        r = cluster.client(None).post("/v1/join", json={**body, "address": address})
        assert r.status_code == 422 and says in r.json()["error"]["message"], r.text
    assert state(cluster) == before


def test_datastore_join_signs_its_csr_and_records_it(cluster: Cluster) -> None:
    key, csr = new_key_and_csr()
    body = {"token": cluster.token, "name": "ds1", "address": "10.0.0.9", "csr": csr}
    r = cluster.client(None).post("/v1/datastores/join", json=body)
    assert r.status_code == 201, r.text
    answer = r.json()
    cert = x509.load_pem_x509_certificate(answer["cert"].encode())
    cert.verify_directly_issued_by(cluster.center.ca.cert)
    assert x509.load_pem_x509_certificate(answer["ca_cert"].encode()) == cluster.center.ca.cert
    assert identity_of(cert) == Identity(Kind.DATASTORE, "ds1")
    assert cert.public_key() == serialization.load_pem_private_key(key, None).public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.9"]
    assert (answer["datastore"]["nbd_url"], answer["datastore"]["control_url"]) == ("nbds://10.0.0.9:10809",
                                                                                  "https://10.0.0.9:10810")
    assert [(d.name, d.nbd_url) for d in cluster.store.datastores()] == [("ds1", "nbds://10.0.0.9:10809")]
    event = cluster.store.events()[-1]
    assert event.kind is EventKind.DATASTORE_ADDED and "joined with token" in event.message
    assert cluster.audit()[-1]["who"] == "joining datastore:ds1"
    # The name is taken now; a bad token and a bad CSR: refused, nothing issued or changed.
    before = state(cluster)
    again = cluster.client(None).post("/v1/datastores/join", json={**body, "csr": new_key_and_csr()[1]})
    assert again.status_code == 409 and "datastore ds1 exists already" in again.json()["error"]["message"]
    prefix, ca_hash, token_id, _secret = cluster.token.split(".")
    forged = ".".join((prefix, ca_hash, token_id, "0" * 32))
    r = cluster.client(None).post("/v1/datastores/join", json={**body, "name": "ds2", "token": forged})
    assert r.status_code == 401 and "is forged" in r.json()["error"]["message"] and "BEGIN CERTIFICATE" not in r.text
    bad = cluster.client(None).post("/v1/datastores/join", json={**body, "name": "ds2", "csr": "not a csr"})
    assert bad.json()["error"]["message"] == "invalid datastore CSR: not a PEM certificate signing request"
    assert state(cluster) == before


def test_datastore_join_spends_the_token(cluster: Cluster) -> None:
    token = _token(cluster, ttl=3600, uses=1)
    body = {"token": token, "name": "ds1", "address": "10.0.0.9", "nbd_port": 20000, "csr": new_key_and_csr()[1]}
    r = cluster.client(None).post("/v1/datastores/join", json=body)
    assert r.status_code == 201 and r.json()["datastore"]["control_url"] == "https://10.0.0.9:20001", r.text
    before = state(cluster)
    r = cluster.client(None).post("/v1/join", json=join_body(token)[0])
    assert r.status_code == 401 and "is used up" in r.json()["error"]["message"]
    assert state(cluster) == before


def test_login_gives_the_stored_role(cluster: Cluster) -> None:
    r = cluster.client(ADMIN).post("/v1/users", json={"name": "otto", "role": "operator"})
    assert r.status_code == 201
    password = r.json()["password"]
    assert password and r.json()["user"]["role"] == "operator"
    key, csr = new_key_and_csr()
    r = cluster.client(None).post("/v1/login", json={"user": "otto", "password": password, "csr": csr})
    assert r.status_code == 200, r.text
    cert = x509.load_pem_x509_certificate(r.json()["cert"].encode())
    cert.verify_directly_issued_by(cluster.center.ca.cert)
    assert identity_of(cert) == Identity(Kind.USER, "otto", Role.OPERATOR)
    assert cert.public_key() == serialization.load_pem_private_key(key, None).public_key()
    assert r.json()["expires"] == cert.not_valid_after_utc.timestamp()
    # The admin printed at the first start logs in too.
    admin = cluster.client(None).post("/v1/login", json={"user": "admin", "password": cluster.admin_password, "csr": csr})
    assert identity_of(x509.load_pem_x509_certificate(admin.json()["cert"].encode())) == ADMIN
    before = state(cluster)
    for user, pw in (("otto", password + "x"), ("nobody", password)):
        r = cluster.client(None).post("/v1/login", json={"user": user, "password": pw, "csr": csr})
        assert (r.status_code, r.json()["error"]) == (401, {"kind": "Unauthorized", "message": "wrong user name or password"})
    assert state(cluster) == before
    with_password = cluster.client(ADMIN).post("/v1/users", json={"name": "pat", "role": "viewer", "password": "x" * 12})
    assert with_password.json()["password"] is None  # the admin's own choice is not echoed
    short = cluster.client(ADMIN).post("/v1/users", json={"name": "sam", "role": "viewer", "password": "short"})
    assert short.status_code == 422
    taken = cluster.client(ADMIN).post("/v1/users", json={"name": "otto", "role": "viewer"})
    assert taken.status_code == 409


def test_who_may_do_what(cluster: Cluster) -> None:
    ds = {"name": "ds1", "nbd_url": "nbds://10.0.0.9:10809", "control_url": "https://10.0.0.9:10810"}
    viewer, admin, host = cluster.client(VIEWER), cluster.client(ADMIN), cluster.client(Identity(Kind.HOST, "host-a"))
    before = state(cluster)
    r = viewer.post("/v1/datastores", json=ds)
    assert r.status_code == 403
    assert r.json()["error"]["message"] == ("user:vera (viewer) may not manage the cluster: allowed for users with role "
                                            "admin or higher")
    assert host.post("/v1/datastores", json=ds).status_code == 403
    assert viewer.post("/v1/tokens", json={}).status_code == 403
    assert viewer.get("/v1/users").status_code == 403 and viewer.get("/v1/tokens").status_code == 403
    assert state(cluster) == before
    assert admin.post("/v1/datastores", json=ds).status_code == 201
    assert admin.post("/v1/datastores", json=ds).status_code == 409
    assert [d["name"] for d in viewer.get("/v1/datastores").json()] == ["ds1"]
    assert [d["name"] for d in host.get("/v1/datastores").json()] == ["ds1"]  # hosts read the inventory
    assert viewer.delete("/v1/datastores/ds1").status_code == 403
    assert admin.delete("/v1/datastores/ds1").status_code == 204
    assert admin.delete("/v1/datastores/ds1").status_code == 404
    assert admin.post("/v1/datastores", json={**ds, "nbd_url": "http://x"}).status_code == 422
    assert viewer.get("/v1/settings").json() == ClusterSettings().model_dump()
    qemu = cluster.client(Identity(Kind.QEMU, "host-a"))
    assert qemu.get("/v1/hosts").status_code == 403  # QEMU's identity opens no API
    # No certificate: only the CA, join and login answer.
    anonymous = cluster.client(None)
    assert anonymous.get("/v1/ca").status_code == 200
    for method, path in (("GET", "/v1/hosts"), ("GET", "/v1/events"), ("GET", "/v1/settings"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("POST", "/v1/tokens"), ("POST", "/v1/hosts/host-a/heartbeat")):
        r = anonymous.request(method, path, json={})
        assert r.status_code == 401 and r.json()["error"]["kind"] == "Unauthorized", (method, path)
    assert viewer.get("/openapi.json").json()["info"]["title"] == "kvmotion center"
    mutating = [(e["who"], e["method"], e["path"], e["status"]) for e in cluster.audit()]
    assert ("user:vera (viewer)", "POST", "/v1/datastores", 403) in mutating
    assert ("user:admin (admin)", "DELETE", "/v1/datastores/ds1", 204) in mutating
    assert all(e["method"] != "GET" for e in cluster.audit())


def _beat(vms: tuple[tuple[str, str], ...] = (), version: int = PROTOCOL_VERSION) -> dict:
    return {"version": version, "vms": [{"name": n, "state": s} for n, s in vms], "load": LOAD}


def test_a_host_heartbeats_only_for_itself(cluster: Cluster) -> None:
    for name in ("host-a", "host-b"):
        assert cluster.client(None).post("/v1/join", json=join_body(cluster.token, name)[0]).status_code == 201
    host_a, host_b = cluster.client(Identity(Kind.HOST, "host-a")), cluster.client(Identity(Kind.HOST, "host-b"))
    before = state(cluster)
    r = host_b.post("/v1/hosts/host-a/heartbeat", json=_beat())
    assert r.status_code == 403
    assert r.json()["error"]["message"] == "host:host-b may not send host host-a's heartbeats: a host reports only for itself"
    assert cluster.client(ADMIN).post("/v1/hosts/host-a/heartbeat", json=_beat()).status_code == 403
    assert state(cluster) == before
    r = host_a.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"),)))
    assert r.status_code == 200 and r.json() == {"state": "connected", "interval": 2.0, "now": T0, "report": False,
                                                 "settings": cluster.client(VIEWER).get("/v1/settings").json()}
    assert cluster.client(VIEWER).get("/v1/hosts/host-a").json()["vms"] == 1
    assert host_a.post("/v1/hosts/host-a/heartbeat", json=_beat(version=2)).status_code == 409
    twice = host_a.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"), ("web1", "stopped"))))
    assert twice.status_code == 422 and "VM web1 is reported twice" in twice.json()["error"]["message"]
    gone = cluster.client(Identity(Kind.HOST, "host-c")).post("/v1/hosts/host-c/heartbeat", json=_beat())
    assert gone.status_code == 404 and "has not joined" in gone.json()["error"]["message"]
    # Successful heartbeats stay out of the audit log; refused ones are in it.
    beats = [(e["who"], e["status"]) for e in cluster.audit() if e["path"].endswith("/heartbeat")]
    assert ("host:host-b", 403) in beats and ("host:host-a", 200) not in beats


def _alive(digest: str = D1, version: int = PROTOCOL_VERSION, seq: int = 1) -> dict:
    return {"version": version, "seq": seq, "digest": digest}


def test_alive_beats_between_full_reports(cluster: Cluster) -> None:
    """An Alive beat keeps a host connected while its digest is the one of its last full report;
    otherwise (never reported, another digest, not responding) the center asks for the report and
    changes nothing."""
    for name in ("host-a", "host-b"):
        assert cluster.client(None).post("/v1/join", json=join_body(cluster.token, name)[0]).status_code == 201
    host_a, host_b = cluster.client(Identity(Kind.HOST, "host-a")), cluster.client(Identity(Kind.HOST, "host-b"))
    viewer = cluster.client(VIEWER)
    before = state(cluster)
    r = host_a.post("/v1/hosts/host-a/alive", json=_alive())
    assert r.status_code == 200 and r.json()["report"] is True and r.json()["state"] == "not_responding"
    assert host_b.post("/v1/hosts/host-a/alive", json=_alive()).status_code == 403
    assert host_a.post("/v1/hosts/host-a/alive", json=_alive(version=2)).status_code == 409
    bad = host_a.post("/v1/hosts/host-a/alive", json=_alive(digest="x"))
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("invalid heartbeat")
    assert state(cluster) == before
    assert host_a.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"),)) | {"digest": D1}).json()["state"] \
        == "connected"
    cluster.clock.now = T0 + 1  # within the settings' cache: answered from memory
    r = host_a.post("/v1/hosts/host-a/alive", json=_alive(seq=2))
    assert r.status_code == 200 and r.json()["report"] is False and r.json()["state"] == "connected"
    assert viewer.get("/v1/hosts/host-a").json()["last_heartbeat"] == T0  # the store learns it at the next tick
    assert cluster.app.state.controller.tick_sync() == []
    assert viewer.get("/v1/hosts/host-a").json()["last_heartbeat"] == T0 + 1
    cluster.clock.now = T0 + 8  # the settings read again: through the store
    r = host_a.post("/v1/hosts/host-a/alive", json=_alive(seq=2))
    assert r.status_code == 200 and r.json()["report"] is False and r.json()["state"] == "connected"
    assert viewer.get("/v1/hosts/host-a").json()["last_heartbeat"] == T0 + 8
    cluster.clock.now = T0 + 9
    assert host_a.post("/v1/hosts/host-a/alive", json=_alive(D2, seq=3)).json()["report"] is True  # something changed
    assert viewer.get("/v1/hosts/host-a").json()["last_heartbeat"] == T0 + 8
    # Not responding: Alive does not bring it back (its VMs are unknown); the full report does.
    cluster.clock.now = T0 + 18.5
    assert cluster.app.state.controller.tick_sync() == ["host-a"]
    cluster.clock.now = T0 + 19
    r = host_a.post("/v1/hosts/host-a/alive", json=_alive(seq=4))
    assert r.json()["report"] is True and r.json()["state"] == "not_responding"
    assert cluster.store.vm("web1").observed_state.value == "unknown"
    host_a.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"),)) | {"digest": D1})
    assert cluster.store.vm("web1").observed_state.value == "running"
    assert host_a.post("/v1/hosts/host-a/alive", json=_alive(seq=5)).json() | {"settings": None} == {
        "state": "connected", "interval": 2.0, "now": T0 + 19, "report": False, "settings": None}
    gone = cluster.client(Identity(Kind.HOST, "host-c")).post("/v1/hosts/host-c/alive", json=_alive())
    assert gone.status_code == 404 and "has not joined" in gone.json()["error"]["message"]
    assert not [e for e in cluster.audit() if e["path"].endswith("/alive") and e["status"] == 200]
    assert ("host:host-b", 403) in [(e["who"], e["status"]) for e in cluster.audit() if e["path"].endswith("/alive")]


def test_admin_changes_settings(cluster: Cluster) -> None:
    admin, viewer = cluster.client(ADMIN), cluster.client(VIEWER)
    before = state(cluster)
    r = viewer.patch("/v1/settings", json={"migration_budget_slow": 1})
    assert r.status_code == 403
    for body, says in (({}, "no setting to change: name at least one"),
                       ({"migration_budget_slow": 0}, "migration_budget_slow"),
                       ({"cluster_migrations": "many"}, "cluster_migrations"),
                       ({"encrypted": False}, "encrypted")):  # not changed at run time
        r = admin.patch("/v1/settings", json=body)
        assert r.status_code == 422 and says in r.json()["error"]["message"], (body, r.text)
        assert "\n" not in r.json()["error"]["message"]
    assert state(cluster) == before and viewer.get("/v1/settings").json() == ClusterSettings().model_dump()
    r = admin.patch("/v1/settings", json={"migration_budget_slow": 1, "cluster_migrations": 3})
    assert r.status_code == 200, r.text
    want = ClusterSettings(migration_budget_slow=1, cluster_migrations=3).model_dump()
    assert r.json() == want and viewer.get("/v1/settings").json() == want
    assert cluster.store.settings() == ClusterSettings(migration_budget_slow=1, cluster_migrations=3)
    event = cluster.store.events(limit=1000)[-1]
    assert event.kind is EventKind.SETTINGS_CHANGED and event.who == "user:admin (admin)"
    assert event.message == "settings changed: migration_budget_slow 4 -> 1, cluster_migrations 32 -> 3"
    assert ("user:admin (admin)", "PATCH", "/v1/settings", 200) in [
        (e["who"], e["method"], e["path"], e["status"]) for e in cluster.audit()]


def test_the_hosts_view_shows_each_vms_load_and_the_capacity(cluster: Cluster) -> None:
    assert cluster.client(None).post("/v1/join", json=join_body(cluster.token, "host-a")[0]).status_code == 201
    load = {**LOAD, "cpu_capacity": 0.5,
            "vms": [{"name": "web1", "cpu_demand": 0.17, "cpu_ready": 0.8}]}
    beat = {**_beat((("web1", "running"),)), "load": load}
    assert cluster.client(Identity(Kind.HOST, "host-a")).post("/v1/hosts/host-a/heartbeat", json=beat).status_code == 200
    view = cluster.client(VIEWER).get("/v1/hosts/host-a").json()
    assert view["load"]["cpu_capacity"] == 0.5
    assert [(v["name"], v["cpu_ready"]) for v in view["load"]["vms"]] == [("web1", 0.8)]  # what DRS weighs
    assert view["cpu_demand"] == 0.17


def test_not_responding_after_eight_seconds_of_silence(cluster: Cluster) -> None:
    assert cluster.client(None).post("/v1/join", json=join_body(cluster.token)[0]).status_code == 201
    host, viewer = cluster.client(Identity(Kind.HOST, "host-a")), cluster.client(VIEWER)
    with TestClient(as_caller(cluster.secured, cluster.ca.creds(VIEWER).pem)) as running:  # the lifespan: the loop runs
        host.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"),)))
        cluster.clock.now = T0 + 7.9
        time.sleep(0.1)
        assert running.get("/v1/hosts/host-a").json()["state"] == "connected"
        cluster.clock.now = T0 + 8.1
        _until(lambda: running.get("/v1/hosts/host-a").json()["state"] == "not_responding")
        assert cluster.store.vm("web1").observed_state.value == "unknown"
        host.post("/v1/hosts/host-a/heartbeat", json=_beat((("web1", "running"),)))
        assert running.get("/v1/hosts/host-a").json()["state"] == "connected"
    page = viewer.get("/v1/events", params={"since": 0, "limit": 1000}).json()
    kinds = [e["kind"] for e in page["events"] if e["object"] == "host:host-a"]
    assert kinds == ["host_joined", "host_connected", "host_not_responding", "host_connected"]
    assert viewer.get("/v1/events", params={"since": page["next"]}).json() == {"events": [], "next": page["next"]}
    first_two = viewer.get("/v1/events", params={"limit": 2}).json()
    assert len(first_two["events"]) == 2 and first_two["next"] == first_two["events"][-1]["id"]


def test_tokens_and_hosts_admin(cluster: Cluster) -> None:
    admin = cluster.client(ADMIN)
    made = admin.post("/v1/tokens", json={"ttl": 600, "uses": 3}).json()
    assert made["info"]["uses_left"] == 3 and made["info"]["expires"] == T0 + 600
    assert made["info"]["created_by"] == "user:admin (admin)"
    listed = admin.get("/v1/tokens").json()
    assert [t["id"] for t in listed] == [cluster.token.split(".")[2], made["info"]["id"]]
    assert all("secret" not in json.dumps(t) for t in listed) and made["token"].split(".")[3] not in json.dumps(listed)
    assert admin.delete(f"/v1/tokens/{made['info']['id']}").status_code == 204
    r = cluster.client(None).post("/v1/join", json=join_body(made["token"])[0])
    assert r.status_code == 401 and "unknown join token" in r.json()["error"]["message"]
    assert admin.post("/v1/tokens", json={"ttl": 0.5}).status_code == 422
    assert cluster.client(None).post("/v1/join", json=join_body(cluster.token)[0]).status_code == 201
    assert admin.delete("/v1/hosts/host-a").status_code == 204
    assert cluster.client(None).post("/v1/join", json=join_body(cluster.token)[0]).status_code == 201  # joins again
    assert [u["name"] for u in admin.get("/v1/users").json()] == ["admin"]


def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
