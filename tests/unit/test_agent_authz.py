"""The agent API's routes under each identity (in-process, as the TLS listener presents them)."""

from __future__ import annotations

import json
import warnings
from functools import partial

import pytest

with warnings.catch_warnings():  # starlette's TestClient warns about its httpx backend
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.serving import Security, secure
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
from kvmotion.migration.api import migration_router
from kvmotion.qemu.accel import Accel, AccelChoice
from tests.certs import TestCA, as_caller
from tests.joinedroot import make_root, serve_in_test

SPEC = {"name": "web1", "memory": 256 << 20}
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
OPERATOR = Identity(Kind.USER, "otto", Role.OPERATOR)
PEER = Identity(Kind.HOST, "host-b")


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """The agent's app (both routers) with authentication on (no TLS in-process: tests/certs.as_caller presents
    the certificate), auditing to tmp_path/audit.log."""
    serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a"))  # joined, no peers yet
    config = HostConfig(name="host-a", state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                        portgroups={"vm-net": "br0"}, accel=AccelChoice(Accel.TCG, "test"))
    router = partial(migration_router, listen_ip="127.0.0.1", limit=4)
    security = Security(tls_files=None, audit_log=tmp_path / "audit.log")
    return secure(create_app(config, extra_routers=(router,)), security, "agent host-a"), config


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "ca-root")


def _client(app, ca: TestCA, who: Identity | None) -> TestClient:
    return TestClient(as_caller(app, ca.creds(who).pem if who else None), base_url="https://agent")


def test_each_identity_gets_what_its_role_allows(agent, ca):
    app, config = agent
    viewer, operator, host = (_client(app, ca, who) for who in (VIEWER, OPERATOR, PEER))
    qemu = _client(app, ca, Identity(Kind.QEMU, "host-a"))
    nobody = _client(app, ca, None)

    assert viewer.get("/v1/vms").json() == []
    assert host.get("/v1/vms").json() == []  # peers read
    r = viewer.post("/v1/vms", json=SPEC)
    assert r.status_code == 403 and r.json()["error"]["kind"] == "Forbidden"
    assert host.post("/v1/vms", json=SPEC).status_code == 403  # a host certificate is no user
    assert qemu.get("/v1/vms").status_code == 403  # QEMU's identity opens no API
    r = nobody.get("/v1/vms")
    assert r.status_code == 401 and r.json()["error"]["kind"] == "Unauthorized"
    assert not list(config.state_dir.rglob("*.json"))  # nothing was created

    assert operator.post("/v1/vms", json=SPEC).status_code == 201
    assert [v["name"] for v in viewer.get("/v1/vms").json()] == ["web1"]
    for path in ("/v1/vms/web1/start", "/v1/vms/web1/stop"):
        assert viewer.post(path).status_code == 403
        assert host.post(path).status_code == 403
    assert viewer.delete("/v1/vms/web1").status_code == 403
    assert operator.delete("/v1/vms/web1").status_code == 204


def test_console_needs_an_operator(agent, ca):
    app, _ = agent
    for who in (VIEWER, PEER):
        with pytest.raises(WebSocketDisconnect) as refused:
            with TestClient(as_caller(app, ca.creds(who).pem)).websocket_connect("/v1/vms/web1/console"):
                pass
        assert refused.value.code == 1008
    with TestClient(as_caller(app, ca.creds(OPERATOR).pem)).websocket_connect("/v1/vms/web1/console") as ws:
        assert "no VM named web1" in ws.receive_text()  # let in; there is no such VM


def test_audit_log_names_who_did_what(agent, ca, tmp_path):
    app, _ = agent
    _client(app, ca, OPERATOR).post("/v1/vms", json=SPEC)
    _client(app, ca, VIEWER).delete("/v1/vms/web1")
    _client(app, ca, VIEWER).get("/v1/vms")  # reads are not audited
    entries = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["who"], e["method"], e["path"], e["status"]) for e in entries] == [
        ("user:otto (operator)", "POST", "/v1/vms", 201),
        ("user:vera (viewer)", "DELETE", "/v1/vms/web1", 403),
    ]


def test_a_refused_caller_gets_403_whatever_its_body(agent, ca):
    """Found by the fuzz test: FastAPI reads a JSON body before it solves the dependencies that
    check the caller, so a viewer's unparsable body was answered 422; the check comes first now."""
    app, config = agent
    broken = {"content": b'{"name": "web1",', "headers": {"content-type": "application/json"}}
    for who, path in ((VIEWER, "/v1/vms"), (PEER, "/v1/vms"), (VIEWER, "/v1/migrations"),
                      (OPERATOR, "/v1/incoming")):
        r = _client(app, ca, who).post(path, **broken)
        assert r.status_code == 403 and r.json()["error"]["kind"] == "Forbidden", (who, path, r.text)
    r = _client(app, ca, None).post("/v1/vms", **broken)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "Unauthorized"
    # Who may call the route still learns what is wrong with its body.
    r = _client(app, ca, OPERATOR).post("/v1/vms", **broken)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("invalid VM spec: not valid JSON")
    r = _client(app, ca, PEER).post("/v1/incoming", **broken)
    assert r.status_code == 422 and r.json()["error"]["kind"] == "InvalidInput"
    assert not list(config.state_dir.rglob("*.json"))


def test_the_center_may_do_what_an_admin_may(agent, ca):
    """center:NAME (the control plane) passes every route a user may call, as an admin would; a
    host's certificate still opens no user route, and the host-to-host routes stay the hosts'."""
    app, _ = agent
    center = _client(app, ca, Identity(Kind.CENTER, "center"))
    assert center.post("/v1/vms", json=SPEC).status_code == 201  # an operator's route
    assert center.get("/v1/vms/web1").json()["name"] == "web1"  # a viewer's
    assert center.post("/v1/migrations/check", json={"vm": "web1", "destination": "host-b"}).status_code != 403
    assert _client(app, ca, PEER).delete("/v1/vms/web1").status_code == 403  # another host: no
    r = center.post("/v1/incoming", json={})
    assert r.status_code == 403 and "center:center may not send this host migrations" in r.json()["error"]["message"]
    assert center.delete("/v1/vms/web1").status_code == 204
    with TestClient(as_caller(app, ca.creds(Identity(Kind.CENTER, "center")).pem)).websocket_connect(
            "/v1/vms/web1/console") as ws:
        assert "no VM named web1" in ws.receive_text()  # let in (an operator's)
