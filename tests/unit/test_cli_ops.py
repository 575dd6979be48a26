"""`host maintenance`, `host health`, `rule` and `drs` through the center (in process): what they
print, and one-line errors."""

from __future__ import annotations

import json

from tests.unit.test_center_operations import running
from tests.unit.test_cli_center import cli, in_process, run  # noqa: F401 (the fixture)


def test_maintenance_health_rules_and_drs_commands(cli, capsys, monkeypatch) -> None:  # noqa: F811
    cluster, _agents = cli
    running(cluster, "host-a", "web1", "db1", "db2")
    code, out, err = run(capsys, monkeypatch, "host", "maintenance", "enter", "host-a", "--dry-run")
    assert code == 0, err
    assert "web1" in out and "host-b" in out and "dry run, nothing changed; host is normal" in out
    code, out, err = run(capsys, monkeypatch, "host", "maintenance", "enter", "host-a", "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and sorted(m["vm"] for m in plan["moves"]) == ["db1", "db2", "web1"]

    code, out, err = run(capsys, monkeypatch, "rule", "add", "keep-apart", "db1", "db2", "--name", "dbs")
    assert code == 0, err
    assert "rule dbs: keep-apart db1, db2 (must); violated now: " in out
    code, out, err = run(capsys, monkeypatch, "rule", "ls", "--json")
    assert code == 0 and json.loads(out)[0]["rule"]["name"] == "dbs"

    code, out, err = run(capsys, monkeypatch, "drs", "recommend")
    assert code == 0, err
    assert "imbalance" in out and "mandatory" in out  # the keep-apart rule is broken: a mandatory move

    code, out, err = run(capsys, monkeypatch, "host", "health", "report", "host-b", "--severity", "moderate",
                         "--component", "fan", "--reason", "fan 2 slow")
    assert code == 0, err
    assert "host-b: moderate (quarantined: new VMs only when no other host can take them)" in out
    code, out, err = run(capsys, monkeypatch, "host", "health", "host-b")  # `show` by default
    assert code == 0 and "fan 2 slow" in out

    code, out, err = run(capsys, monkeypatch, "drs", "config", "--automation", "full")
    assert code != 0
    assert err.startswith("kvmotion: error: ") and "may not" in err and err.count("\n") == 1  # operators do not

    code, out, err = run(capsys, monkeypatch, "host", "maintenance", "exit", "host-a")
    assert code != 0 and err == "kvmotion: error: host host-a is not in maintenance\n"
    code, out, err = run(capsys, monkeypatch, "host", "health", "report", "host-b", "--severity", "awful",
                         "--component", "fan")
    assert code == 2 and err.startswith("kvmotion: error: ") and "awful" in err
    code, out, err = run(capsys, monkeypatch, "rule", "add", "keep-apart", "db1", "--must", "--should")
    assert code != 0 and err.count("\n") == 1


def test_center_user_add_and_ls(cli, capsys, monkeypatch) -> None:  # noqa: F811
    from types import SimpleNamespace

    from kvmotion.cli import center as center_cli
    from kvmotion.cli import centerops
    monkeypatch.setattr(center_cli, "load_credentials", lambda: SimpleNamespace(client=centerops.client))
    code, out, err = run(capsys, monkeypatch, "center", "user", "add", "alice", "--role", "viewer")
    # the fixture's caller is an operator: adding users is an admin's
    assert code != 0 and "may not" in err and err.count("\n") == 1
    cluster, _ = cli
    monkeypatch.setattr(center_cli, "load_credentials", lambda: SimpleNamespace(client=lambda: _as_admin(cluster)))
    code, out, err = run(capsys, monkeypatch, "center", "user", "add", "alice", "--role", "viewer")
    assert code == 0, err
    assert err == "user alice added with role viewer\n" and len(out.strip()) >= 12  # the password, once
    code, out, err = run(capsys, monkeypatch, "center", "user", "ls", "--json")
    assert code == 0 and {u["name"]: u["role"] for u in json.loads(out)}["alice"] == "viewer"
    code, out, err = run(capsys, monkeypatch, "center", "user", "add", "alice", "--role", "viewer")
    assert code != 0 and "exists already" in err


def _as_admin(cluster):  # type: ignore[no-untyped-def]
    from tests.unit.test_center_api import ADMIN
    return in_process(cluster.client(ADMIN))
