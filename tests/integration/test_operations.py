"""What live migration is for, on real VMs through the center and the CLI: placement rules with DRS's
mandatory moves, a host's maintenance (dry run, evacuation, no new VMs, move-back) and host health
(moderate quarantines and DRS recommends moving off, severe evacuates, ok clears).

One three-host lab is shared by the tests of this module (they run in file order, each starting
from where the one before left the VMs); guests are 256 MiB and boot one at a time. DRS under real
CPU load is the demo's (tests/integration/test_demo.py): not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from kvmotion.api.center import CenterClient, HostMode, TaskState
from kvmotion.api.userconfig import load_credentials
from tests.integration.lab_fixture import MigrationLab, lab_factory, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

HOSTS = ("host-a", "host-b", "host-c")
VM1, VM2 = "op1", "op2"  # booted on host-a, kept apart by a rule, then moved about by the operations
MOVE_TIMEOUT = 120.0  # seconds for the center's migration tasks of one step (idle 256 MiB guests)


@pytest.fixture(scope="module")
def olab(request, tmp_path_factory):
    failures = request.session.testsfailed
    factory = lab_factory(lambda: tmp_path_factory.mktemp("lab-logs") if request.session.testsfailed > failures else None)
    make = next(factory)
    try:
        yield make(hosts=3)
    finally:
        factory.close()  # tears the lab down, whatever happened (and keeps its logs if a test failed)


@pytest.fixture(scope="module")
def center(olab: MigrationLab):
    """The admin's own client of the center, for polling tasks and modes (the tests act through the CLI)."""
    with load_credentials(olab.cluster.admin_config).client() as client:
        yield client


# ---- helpers ----
def _where(lab: MigrationLab) -> dict[str, str]:
    """The running VMs' hosts, as `kvmotion vm ls` (the center's view) shows them."""
    return {v["name"]: v["observed_host"] for v in lab.cli_json("vm", "ls")  # type: ignore[union-attr]
            if v["observed_state"] == "running"}


def _wait_where(lab: MigrationLab, what: str, ok: Callable[[dict[str, str]], bool], timeout: float = 30.0) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        w = _where(lab)
        return w if ok(w) else None

    return wait_until(what, probe, timeout, 0.5)


def _host(lab: MigrationLab, name: str) -> dict:
    return next(h for h in lab.cli_json("host", "ls") if h["name"] == name)  # type: ignore[union-attr]


def _error(r) -> str:
    """The one-line error of a failed CLI call."""
    assert r.returncode != 0, f"expected a refusal, got: {r.stdout}"
    assert r.stderr.startswith("kvmotion: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def _wait_tasks(center: CenterClient, ids: Iterable[str], timeout: float = MOVE_TIMEOUT) -> list:
    """The tasks once all have ended; each must be done."""
    ids = list(ids)

    def probe() -> list | None:
        tasks = [center.task(i) for i in ids]
        return tasks if all(t.state.terminal for t in tasks) else None

    tasks = wait_until(f"tasks {ids} end", probe, timeout, 0.5)
    for t in tasks:
        assert t.state is TaskState.DONE, f"task {t.id} ({t.kind.value} {t.target}) {t.state.value}: {t.error}"
    return tasks


def _nic(lab: MigrationLab, k: int) -> str:
    return f"pg={lab.topo.portgroup},mac={lab.mac(k)},ip={lab.topo.vm_ip(k)}/{lab.topo.vm_prefix}"


def _create_placed(lab: MigrationLab, vm: str, k: int) -> tuple[str, str]:
    """`kvmotion vm create VM` with no --host: the host placement chose, and what it printed."""
    out = lab.cli_ok("vm", "create", vm, "--memory", "256M", "--nic", _nic(lab, k), "--workload", "echo").stdout
    chosen = [line.split("placed on ", 1)[1].strip() for line in out.splitlines() if f"VM {vm}: placed on " in line]
    assert len(chosen) == 1 and chosen[0] in HOSTS, out
    return chosen[0], out


def _candidate_line(out: str, host: str) -> str:
    return next((line.strip() for line in out.splitlines() if line.strip().startswith(f"{host}:")), "")


# ---- 1: rules ----
def test_rules_give_mandatory_moves(olab: MigrationLab, center: CenterClient) -> None:
    lab = olab
    for k, vm in enumerate((VM1, VM2), start=1):  # one boot at a time
        lab.create_vm(vm, "host-a", k=k)
    _wait_where(lab, "the center sees both VMs on host-a", lambda w: w.get(VM1) == w.get(VM2) == "host-a")

    # Bad input: one line, a non-zero exit, no rule made.
    assert "nosuch" in _error(lab.cli("rule", "add", "keep-apart", VM1, "nosuch"))
    assert "two VMs or more" in _error(lab.cli("rule", "add", "keep-apart", VM1))
    assert "nosuch" in _error(lab.cli("rule", "add", "vm-host", VM1, "nosuch", "--must"))
    assert lab.cli_json("rule", "ls") == []

    out = lab.cli_ok("rule", "add", "keep-apart", VM1, VM2, "--name", "apart").stdout
    assert f"rule apart: keep-apart {VM1}, {VM2} (must); violated now:" in out and "share host-a" in out, out
    assert "exists already" in _error(lab.cli("rule", "add", "keep-apart", VM1, VM2, "--name", "apart"))
    rules = lab.cli_json("rule", "ls")
    assert [r["rule"]["name"] for r in rules] == ["apart"] and rules[0]["violations"], rules  # type: ignore[index]

    status = lab.cli_json("drs", "recommend")
    # (filtered by the rule: an agent's own health provider may quarantine a busy host, a mandatory move too)
    mandatory = [r for r in status["recommendations"] if r["mandatory"] and "keep-apart rule apart" in r["why"]]  # type: ignore[index]
    assert len(mandatory) == 1, status
    rec = mandatory[0]
    assert rec["move"]["vm"] in (VM1, VM2) and rec["move"]["source"] == "host-a" and rec["move"]["destination"] != "host-a"
    assert "mandatory" in lab.cli_ok("drs", "recommend").stdout  # the table says so too

    applied = lab.cli_json("drs", "apply", rec["id"])
    assert [t["target"] for t in applied["tasks"]] == [rec["move"]["vm"]] and not applied["skipped"], applied  # type: ignore[index]
    (task,) = _wait_tasks(center, [t["id"] for t in applied["tasks"]])  # type: ignore[index]
    assert task.requested_by.startswith("user:admin") and "keep-apart rule apart" in task.why, task
    moved, stayed = rec["move"]["vm"], ({VM1, VM2} - {rec["move"]["vm"]}).pop()
    where = _wait_where(lab, "the center sees the VMs apart",
                        lambda w: w.get(moved) == rec["move"]["destination"] and w.get(stayed) == "host-a")
    assert lab.running_hosts(moved) == [where[moved]] and lab.running_hosts(stayed) == ["host-a"]  # the agents agree
    assert lab.cli_json("rule", "ls")[0]["violations"] == []  # type: ignore[index]

    # A vm-host --must rule the VM breaks: a mandatory move to that host (not applied: it would be
    # one more migration, and the rule's planning is the same as keep-apart's).
    free = next(h for h in HOSTS if h not in where.values())
    out = lab.cli_ok("rule", "add", "vm-host", stayed, free, "--must", "--name", "pin").stdout
    assert f"rule pin: vm-host {stayed} on {free} (must); violated now:" in out, out
    status = lab.cli_json("drs", "recommend")
    pins = [r for r in status["recommendations"] if r["mandatory"] and "pin" in r["why"]]  # type: ignore[index]
    assert [(r["move"]["vm"], r["move"]["source"], r["move"]["destination"]) for r in pins] == [(stayed, "host-a", free)], status

    assert lab.cli_ok("rule", "rm", "pin").stdout.strip() == "rule pin removed"
    lab.cli_ok("rule", "rm", "apart")
    assert "no rule apart" in _error(lab.cli("rule", "rm", "apart"))
    assert lab.cli_json("rule", "ls") == []
    assert not [r for r in lab.cli_json("drs", "recommend")["recommendations"] if " rule " in r["why"]]  # type: ignore[index]


# ---- 2: maintenance ----
def test_maintenance_dry_run_enter_and_move_back(olab: MigrationLab, center: CenterClient) -> None:
    lab = olab
    before = _where(lab)
    host = before[VM1]
    held = sorted(vm for vm, h in before.items() if h == host)
    tasks_before = {t.id for t in center.tasks(limit=200)}

    out = lab.cli_ok("host", "maintenance", "enter", host, "--dry-run").stdout
    assert "dry run, nothing changed; host is normal" in out and all(vm in out for vm in held), out
    plan = lab.cli_json("host", "maintenance", "enter", host, "--dry-run")["plan"]  # type: ignore[index]
    assert sorted(m["vm"] for m in plan["moves"]) == held and not plan["unmovable"], plan
    for m in plan["moves"]:
        assert m["source"] == host and m["destination"] in HOSTS and m["destination"] != host, m
        assert m["predicted_s"] is not None and m["predicted_s"] > 0, m
        assert m["predicted_downtime_ms"] is not None and m["predicted_downtime_ms"] >= 0, m
    assert _host(lab, host)["mode"] == "normal" and _where(lab) == before
    assert {t.id for t in center.tasks(limit=200)} == tasks_before  # nothing queued

    out = lab.cli_ok("host", "maintenance", "enter", host).stdout
    assert f"{len(held)} migration(s) queued" in out, out
    wait_until(f"{host} in maintenance", lambda: center.host(host).mode is HostMode.MAINTENANCE, MOVE_TIMEOUT, 0.5)
    where = _wait_where(lab, f"the center sees {host} empty", lambda w: set(held) <= set(w) and host not in w.values())
    assert all(lab.running_hosts(vm) == [where[vm]] for vm in held)
    shown = _host(lab, host)
    assert shown["mode"] == "maintenance" and shown["mode_reason"].startswith("asked by user:admin"), shown

    # No new VM there: named, it is refused (nothing made); placed by the center, it goes elsewhere.
    refused = _error(lab.cli("vm", "create", "opbad", "--host", host, "--memory", "256M", "--nic", _nic(lab, 5)))
    assert f"host {host} is in maintenance: it takes no VM (opbad)" in refused, refused
    assert "opbad" not in {v["name"] for v in lab.cli_json("vm", "ls")}  # type: ignore[union-attr]
    placed, out = _create_placed(lab, "opnew", 3)
    assert placed != host and "in maintenance" in _candidate_line(out, host), out
    lab.cli_ok("vm", "start", "opnew", timeout=90)
    lab.wait_ready(placed, "opnew")
    _wait_where(lab, "the center sees opnew running", lambda w: w.get("opnew") == placed)
    lab.cli_ok("vm", "stop", "opnew", timeout=90)  # its CPU back for the moves below

    answer = lab.cli_json("host", "maintenance", "exit", host, "--move-back")
    assert answer["mode"] == "normal" and sorted(m["vm"] for m in answer["plan"]["moves"]) == held, answer  # type: ignore[index]
    assert all(t["destination"] == host for t in answer["tasks"]), answer  # type: ignore[index]
    _wait_tasks(center, [t["id"] for t in answer["tasks"]])  # type: ignore[index]
    _wait_where(lab, f"the center sees {', '.join(held)} back on {host}", lambda w: all(w.get(vm) == host for vm in held))
    assert all(lab.running_hosts(vm) == [host] for vm in held)
    assert _host(lab, host)["mode"] == "normal"


# ---- 3: host health ----
def _report(lab: MigrationLab, host: str, severity: str, reason: str) -> str:
    return lab.cli_ok("host", "health", "report", host, "--severity", severity, "--component", "psu",
                      "--reason", reason).stdout


def _mode(lab: MigrationLab, host: str) -> tuple[str, str, bool]:
    shown = _host(lab, host)
    return shown["mode"], shown["health"], shown["quarantined"]


def test_health_moderate_quarantines_severe_evacuates_ok_clears(olab: MigrationLab, center: CenterClient) -> None:
    lab = olab
    before = _where(lab)
    host = before[VM2]
    held = sorted(vm for vm, h in before.items() if h == host)

    # Moderate: quarantined; DRS (manual) recommends moving its VMs off, and moves nothing itself;
    # a new VM is placed elsewhere.
    out = _report(lab, host, "moderate", "PSU 1 degraded")
    assert out.startswith(f"{host}: moderate (quarantined"), out
    assert _mode(lab, host) == ("normal", "moderate", True)
    status = lab.cli_json("drs", "recommend")
    off = sorted(r["move"]["vm"] for r in status["recommendations"]  # type: ignore[index]
                 if r["mandatory"] and r["move"]["source"] == host and "quarantine" in r["why"] and r["move"]["vm"] in before)
    assert off == held, status  # (a powered-off VM homed there may be re-homed too)
    placed, out = _create_placed(lab, "opq", 4)
    assert placed != host, out  # defined only: placement is what is checked
    assert _where(lab) == before

    # Severe: it enters maintenance (health's reason) and its VMs are evacuated.
    reason = "PSU 1 failed, PSU 2 carries the host alone"
    assert _report(lab, host, "severe", reason).startswith(f"{host}: severe")
    wait_until(f"{host} in maintenance", lambda: center.host(host).mode is HostMode.MAINTENANCE, MOVE_TIMEOUT, 0.5)
    where = _wait_where(lab, f"the center sees {host} empty", lambda w: set(held) <= set(w) and host not in w.values())
    assert all(lab.running_hosts(vm) == [where[vm]] for vm in held)
    shown = _host(lab, host)
    assert shown["mode"] == "maintenance" and shown["health"] == "severe", shown
    assert shown["mode_reason"].startswith("health: ") and "psu" in shown["mode_reason"] and reason in shown["mode_reason"], shown
    health = lab.cli_json("host", "health", host)
    assert [(e["component"], e["severity"]) for e in health["entries"] if e["provider"] == "external"] == [  # type: ignore[index]
        ("psu", "severe")], health

    # Better, then ok: out of the maintenance health caused, into quarantine, then back to normal.
    assert _report(lab, host, "moderate", "PSU 1 degraded").startswith(f"{host}: moderate (quarantined")
    assert _mode(lab, host) == ("normal", "moderate", True)
    out = _report(lab, host, "ok", "PSU 1 replaced")
    assert out.strip().splitlines()[0] == f"{host}: ok", out
    assert _mode(lab, host) == ("normal", "ok", False)
    assert all(_where(lab).get(vm) == where[vm] for vm in held)  # the VMs that left stay where they went
