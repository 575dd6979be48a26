"""The CLI through the center (a login config exists): vm, migrate, task, events, host ls against
the center's app in process, its dispatcher driving fake agents; errors are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kvmotion.api.center import CenterClient
from kvmotion.api.operations import Automation, DrsConfig
from kvmotion.api.serving import Security, secure
from kvmotion.center.app import create_app
from kvmotion.center.dispatcher import Dispatcher
from kvmotion.center.heartbeat import HeartbeatController
from kvmotion.cli import centerops, main
from tests.certs import as_caller
from tests.unit.test_center_api import Cluster
from tests.unit.test_center_tasks import OPERATOR, FakeAgents, add_host


def in_process(http: TestClient) -> CenterClient:
    """A CenterClient whose HTTP goes to the center's app in process (`http`)."""
    center = CenterClient("http://testserver")
    center._http.close()
    center._http = http
    return center


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Cluster(tmp_path)
    for name, free in (("host-a", 8 << 30), ("host-b", 12 << 30)):
        add_host(c.store, name, free=free)
    agents = FakeAgents()
    app = create_app(c.center, HeartbeatController(c.store, clock=c.clock, interval=0.05),
                     Dispatcher(c.store, agents, interval=0.02, poll=0.02, call_timeout=5))
    secured = secure(app, Security(tls_files=None, audit_log=c.data / "audit.log", optional_client_cert=True), "center")
    config = tmp_path / "config"
    config.write_text("{}")  # only its existence matters here: the client is the in-process one
    monkeypatch.setenv("KVMOTION_CONFIG", str(config))
    monkeypatch.setattr(centerops, "FOLLOW_POLL", 0.02)
    with TestClient(as_caller(secured, c.ca.creds(OPERATOR).pem)) as http:
        monkeypatch.setattr(centerops, "client", lambda: in_process(http))
        monkeypatch.setattr(CenterClient, "close", lambda self: None)  # the TestClient outlives each command
        yield c, agents
    c.store.close()


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["kvmotion", *args])
    with pytest.raises(SystemExit) as exit_:
        main.main()
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_vm_migrate_task_events_and_hosts_through_the_center(cli, capsys, monkeypatch) -> None:
    cluster, agents = cli
    code, out, err = run(capsys, monkeypatch, "vm", "create", "web1", "--memory", "1G", "--disk", "ds1/web1.img")
    assert code == 0, err
    assert "VM web1: placed on host-b" in out and "host-b: chosen" in out and "done: create web1 on host-b" in out
    assert agents.calls == ["create web1 on host-b"]
    code, out, err = run(capsys, monkeypatch, "vm", "start", "web1")
    assert code == 0 and "done: start web1 on host-b" in out, err
    code, out, _ = run(capsys, monkeypatch, "vm", "ls")
    assert code == 0 and "web1" in out and "host-b" in out
    code, out, err = run(capsys, monkeypatch, "migrate", "web1")
    assert code == 0, err
    assert "migrating web1: host-b -> host-a" in out and "host-b: VM web1 is already on host-b" in out
    assert "done: migrate web1 on host-a" in out and "downtime 45 ms" in out  # the guest's, not QEMU's 40
    code, out, _ = run(capsys, monkeypatch, "task", "ls")
    assert code == 0 and out.count("done") >= 3
    task_id = cluster.store.tasks(limit=1)[0].id
    code, out, _ = run(capsys, monkeypatch, "task", "show", task_id, "--json")
    assert code == 0 and '"state": "done"' in out
    code, out, _ = run(capsys, monkeypatch, "events")
    assert code == 0 and "task_ended" in out
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, monkeypatch, "host", "ls", "--json")
    assert code == 0 and '"name":"host-a"' in out and '"state":"connected"' in out


def test_one_line_errors_through_the_center(cli, capsys, monkeypatch) -> None:
    cases = [
        (("migrate", "nope"), 2, "kvmotion: error: migration of nope refused: unknown VM nope: no such VM in the cluster"),
        (("task", "show", "xyz"), 2, "kvmotion: error: invalid task id 'xyz'"),
        (("task", "cancel", "0123456789abcdef"), 3, "kvmotion: error: no task 0123456789abcdef"),
        (("vm", "start", "nope"), 3, "kvmotion: error: no VM nope in the cluster"),
        (("task", "ls", "--state", "bogus"), 2, "kvmotion: error: Invalid value for '--state'"),
    ]
    for args, want_code, want in cases:
        code, out, err = run(capsys, monkeypatch, *args)
        lines = err.strip().splitlines()
        assert code == want_code and out == "" and len(lines) == 1 and lines[0].startswith(want), (args, err)


def test_vm_create_without_a_host_under_manual_drs(cli, capsys, monkeypatch) -> None:
    cluster, agents = cli
    cluster.store.save_drs_config(DrsConfig(automation=Automation.MANUAL), "user:admin", cluster.clock())
    code, out, err = run(capsys, monkeypatch, "vm", "create", "web1", "--memory", "1G", "--disk", "ds1/web1.img")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("kvmotion: error: DRS automation is manual: the center recommends host-b for VM web1 (")
    assert "create it with --host host-b" in err and agents.calls == [] and cluster.store.vm("web1") is None
    code, out, err = run(capsys, monkeypatch, "vm", "create", "web1", "--memory", "1G", "--disk", "ds1/web1.img",
                         "--host", "host-b")
    assert code == 0 and "done: create web1 on host-b" in out, err
