"""The admin's CLI through the center: join tokens (create, ls, revoke) and cluster settings (show,
set), against the center's app in process; bad input is one line and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kvmotion.api.center import CenterClient, ClusterSettings
from kvmotion.api.serving import Security, secure
from kvmotion.center.app import create_app
from kvmotion.cli import centerops
from tests.certs import as_caller
from tests.unit.test_center_api import ADMIN, T0, Cluster, join_body
from tests.unit.test_cli_center import in_process, run


@pytest.fixture
def admin_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Cluster(tmp_path)
    secured = secure(create_app(c.center), Security(tls_files=None, audit_log=c.data / "audit.log",
                                                    optional_client_cert=True), "center")
    with TestClient(as_caller(secured, c.ca.creds(ADMIN).pem)) as http:
        monkeypatch.setattr(centerops, "client", lambda: in_process(http))
        monkeypatch.setattr(CenterClient, "close", lambda self: None)  # the TestClient outlives each command
        yield c
    c.store.close()


def test_tokens_created_listed_and_revoked(admin_cli: Cluster, capsys, monkeypatch) -> None:
    code, out, err = run(capsys, monkeypatch, "center", "token", "create", "--ttl", "1h", "--uses", "2")
    assert code == 0, err
    token = out.strip()
    token_id = token.split(".")[2]
    assert f"join token {token_id}: valid until" in err and "for 2 join(s)" in err
    code, out, _ = run(capsys, monkeypatch, "center", "token", "ls", "--json")
    listed = json.loads(out)
    assert code == 0 and [t["id"] for t in listed] == [admin_cli.token.split(".")[2], token_id]
    assert listed[1]["uses_left"] == 2 and listed[1]["expires"] == T0 + 3600 and token.split(".")[3] not in out
    code, out, _ = run(capsys, monkeypatch, "center", "token", "ls")
    assert code == 0 and token_id in out and "user:admin" in out
    code, _, err = run(capsys, monkeypatch, "center", "token", "revoke", token_id)
    assert code == 0 and f"join token {token_id} revoked" in err
    assert [t.id for t in admin_cli.store.tokens()] == [admin_cli.token.split(".")[2]]
    r = admin_cli.client(None).post("/v1/join", json=join_body(token)[0])
    assert r.status_code == 401 and "unknown join token" in r.json()["error"]["message"]
    # A token that expires within seconds (tests of expiry use them).
    code, out, err = run(capsys, monkeypatch, "center", "token", "create", "--ttl", "2s")
    assert code == 0 and admin_cli.store.token(out.strip().split(".")[2]).expires == T0 + 2, err


def test_token_bad_input_is_one_line(admin_cli: Cluster, capsys, monkeypatch) -> None:
    before = admin_cli.store.tokens()
    for args, want in ((("create", "--ttl", "800h"), "kvmotion: error: invalid token request: ttl"),
                       (("create", "--ttl", "soon"), "kvmotion: error: invalid duration 'soon'"),
                       (("create", "--uses", "0"), "kvmotion: error: invalid token request: uses"),
                       (("revoke", "0123456789ab"), "kvmotion: error: no join token 0123456789ab"),
                       (("revoke", "nope"), "kvmotion: error: invalid token id 'nope'")):
        code, out, err = run(capsys, monkeypatch, "center", "token", *args)
        lines = err.strip().splitlines()
        assert code != 0 and out == "" and len(lines) == 1 and lines[0].startswith(want), (args, err)
    assert admin_cli.store.tokens() == before


def test_cluster_settings_shown_and_set(admin_cli: Cluster, capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "cluster", "settings", "--json")
    assert code == 0 and ClusterSettings.model_validate_json(out) == ClusterSettings()
    code, out, err = run(capsys, monkeypatch, "cluster", "settings", "--migration-budget-slow", "1",
                         "--migration-budget-fast", "2", "--cluster-migrations", "5", "--report-interval", "10s")
    assert code == 0, err
    want = ClusterSettings(migration_budget_slow=1, migration_budget_fast=2, cluster_migrations=5, report_interval=10.0)
    assert "migration_budget_slow: 1" in out and "cluster_migrations: 5" in out
    assert admin_cli.store.settings() == want
    for args, want_line in ((("--migration-budget-slow", "0"), "kvmotion: error: invalid settings update: migration_budget_slow"),
                            (("--cluster-migrations", "x"), "kvmotion: error: Invalid value for '--cluster-migrations'"),
                            (("--heartbeat-interval", "1h"), "kvmotion: error: invalid settings update: heartbeat_interval")):
        code, out, err = run(capsys, monkeypatch, "cluster", "settings", *args)
        lines = err.strip().splitlines()
        assert code != 0 and out == "" and len(lines) == 1 and lines[0].startswith(want_line), (args, err)
    assert admin_cli.store.settings() == want
