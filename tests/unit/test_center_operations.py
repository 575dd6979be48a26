"""Maintenance, health, rules and DRS at the center: the routes (in process, as users of each role),
the controller's tick, and the dispatcher carrying the moves out with fake agents."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmotion.api.agent import VmState
from kvmotion.api.center import EventKind, HostLoad, HostMode, ReportedState, Severity, TaskKind, TaskState, VmLoad, VmReport
from kvmotion.center import planning
from kvmotion.center.operations import Operations
from kvmotion.center.store import SqliteStore
from kvmotion.center.tasks import Tasks
from tests.unit.test_center_api import ADMIN, VIEWER, Cluster
from tests.unit.test_center_tasks import GIB, OPERATOR, FakeAgents, add_host, dispatcher, load, run_vm


class Agents(FakeAgents):
    async def delete_vm(self, host, name):
        self.calls.append(f"delete {name} on {host.name}")
        self.vms.pop((host.name, name), None)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    for name in ("host-a", "host-b", "host-c"):
        add_host(c.store, name, free=12 * GIB)
    yield c
    c.store.close()


def ops(c: Cluster) -> Operations:
    return Operations(c.store, Tasks(c.store, c.clock), c.clock)


def beat(store: SqliteStore, host: str, vms: dict[str, float], at: float, dirty: dict[str, float] | None = None) -> None:
    """host reports `vms` running, each with that CPU demand (cores) and the `dirty` rates measured."""
    reports = tuple(VmReport(name=n, state=ReportedState.RUNNING) for n in vms)
    loads = tuple(VmLoad(name=n, cpu_demand=d, cpu_ready=0.0, memory=GIB, dirty_rate=(dirty or {}).get(n))
                  for n, d in vms.items())
    base = load(12 * GIB)
    store.record_heartbeat(host, at, reports, HostLoad(cpus=base.cpus, memory_total=base.memory_total,
                                                       memory_available=base.memory_available, vms=loads), ())


def running(c: Cluster, host: str, *vms: str, demand: float = 0.1) -> None:
    """VMs created through the center, all reported running on `host` by one heartbeat."""
    for vm in vms:
        run_vm(c.store, vm, host)
    beat(c.store, host, dict.fromkeys(vms, demand), c.clock() + 1)


async def drive(store: SqliteStore, agents: Agents, done, timeout: float = 10.0) -> None:
    """The dispatcher, until `done()` (each migration the fake agents finish lands the VM on its destination)."""
    stop = asyncio.Event()
    d = dispatcher(store, agents)
    async with asyncio.TaskGroup() as group:
        group.create_task(d.run(stop))
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await asyncio.sleep(0.01)
        finally:
            stop.set()


def test_maintenance_dry_run_plans_and_changes_nothing(cluster: Cluster) -> None:
    running(cluster, "host-a", "web1", "web2")
    before = len(cluster.store.events())
    r = cluster.client(OPERATOR).post("/v1/hosts/host-a/maintenance", json={"dry_run": True})
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert sorted(m["vm"] for m in plan["moves"]) == ["web1", "web2"]
    assert all(m["destination"] in ("host-b", "host-c") and m["why"] and m["predicted_s"] > 0 for m in plan["moves"])
    assert [m["order"] for m in plan["moves"]] == [1, 2]
    assert r.json()["mode"] == "normal" and r.json()["tasks"] == []
    assert cluster.store.host("host-a").mode is HostMode.NORMAL and cluster.store.tasks(open_only=True) == []
    assert len(cluster.store.events()) == before


def test_maintenance_enter_evacuates_then_settles_and_move_back(cluster: Cluster) -> None:
    running(cluster, "host-a", "web1", "web2")
    r = cluster.client(OPERATOR).post("/v1/hosts/host-a/maintenance", json={})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "entering_maintenance" and len(r.json()["tasks"]) == 2
    # No new VM goes there meanwhile, named or placed.
    created = cluster.client(OPERATOR).post("/v1/vms", json={"spec": {"name": "new1", "memory": GIB}, "host": "host-a"})
    assert created.status_code == 422 and "entering maintenance" in created.json()["error"]["message"]
    placed = cluster.client(OPERATOR).post("/v1/vms", json={"spec": {"name": "new2", "memory": GIB}})
    assert placed.status_code == 201 and placed.json()["vm"]["desired_host"] != "host-a"
    o = ops(cluster)
    o.tick_sync()  # VMs still run there: still entering
    assert cluster.store.host("host-a").mode is HostMode.ENTERING_MAINTENANCE
    agents = Agents()
    asyncio.run(drive(cluster.store, agents, lambda: not cluster.store.tasks(open_only=True)))
    moved = {t.target: t for t in cluster.store.tasks(state=TaskState.DONE) if t.kind is TaskKind.MIGRATE}
    assert set(moved) == {"web1", "web2"} and all(t.why and t.predicted_s for t in moved.values())
    beat(cluster.store, "host-a", {}, cluster.clock() + 1)  # host-a no longer runs them
    o.tick_sync()
    assert cluster.store.host("host-a").mode is HostMode.MAINTENANCE
    created = cluster.client(OPERATOR).post("/v1/vms", json={"spec": {"name": "new3", "memory": GIB}, "host": "host-a"})
    assert created.status_code == 422
    assert created.json()["error"]["message"].startswith("host host-a is in maintenance: it takes no VM (new3); ")
    kinds = [e.message for e in cluster.store.events() if e.kind is EventKind.HOST_MODE]
    assert kinds[-2:] == [f"host host-a: normal -> entering maintenance (asked by {OPERATOR})",
                          f"host host-a: entering maintenance -> maintenance (asked by {OPERATOR})"]
    # Exit with move-back: each VM back to host-a.
    r = cluster.client(OPERATOR).post("/v1/hosts/host-a/maintenance/exit", json={"move_back": True})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "normal"
    assert sorted((m["vm"], m["destination"]) for m in r.json()["plan"]["moves"]) == [("web1", "host-a"),
                                                                                       ("web2", "host-a")]
    assert cluster.store.homes("host-a") == []


def test_maintenance_lists_what_cannot_move(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    cluster.client(ADMIN).post("/v1/rules", json={"name": "pin", "kind": "vm-host", "vms": ["web1"],
                                                  "host": "host-a", "strength": "must"}).raise_for_status()
    r = cluster.client(OPERATOR).post("/v1/hosts/host-a/maintenance", json={})
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["moves"] == [] and r.json()["plan"]["unmovable"][0]["vm"] == "web1"
    assert "pin" in r.json()["plan"]["unmovable"][0]["reason"]
    ops(cluster).tick_sync()
    assert cluster.store.host("host-a").mode is HostMode.ENTERING_MAINTENANCE  # never "in maintenance" with a VM
    # Stopped there, it stays (the rule pins it), but is not powered on there while the host evacuates.
    beat(cluster.store, "host-a", {}, cluster.clock() + 1)
    cluster.store.record_heartbeat("host-a", cluster.clock() + 2, (VmReport(name="web1", state=ReportedState.STOPPED),),
                                   load(12 * GIB), ())
    before = cluster.store.tasks()
    r = cluster.client(OPERATOR).post("/v1/vms/web1/start")
    assert r.status_code == 422 and r.json()["error"]["message"] == (
        "host host-a is entering maintenance: it takes no VM (web1); `kvmotion host maintenance exit host-a` first")
    assert cluster.store.tasks() == before


def test_refusals_are_one_line_and_change_nothing(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    viewer = cluster.client(VIEWER)
    assert viewer.post("/v1/hosts/host-a/maintenance", json={}).status_code == 403
    assert viewer.post("/v1/rules", json={"name": "x", "kind": "keep-apart", "vms": ["web1", "web2"]}).status_code == 403
    assert viewer.put("/v1/drs/config", json={"automation": "full"}).status_code == 403
    op = cluster.client(OPERATOR)
    assert op.put("/v1/drs/config", json={"automation": "full"}).status_code == 403  # admins configure DRS
    r = op.post("/v1/hosts/host-z/maintenance", json={})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no host host-z has joined"
    r = op.post("/v1/hosts/host-a/maintenance/exit", json={})
    assert r.status_code == 422 and r.json()["error"]["message"] == "host host-a is not in maintenance"
    r = op.post("/v1/rules", json={"name": "apart", "kind": "keep-apart", "vms": ["web1"]})
    assert r.status_code == 422 and "two VMs or more" in r.json()["error"]["message"]
    r = op.post("/v1/rules", json={"name": "apart", "kind": "keep-apart", "vms": ["web1", "nope"]})
    assert r.status_code == 422 and r.json()["error"]["message"] == "unknown VM nope: no such VM in the cluster"
    r = op.post("/v1/hosts/host-a/health", json={"component": "psu", "severity": "awful"})
    assert r.status_code == 422
    r = op.post("/v1/drs/apply", json={})
    assert r.status_code == 422 and "ids or all" in r.json()["error"]["message"]
    assert cluster.store.rules() == [] and cluster.store.health() == []
    assert cluster.store.host("host-a").mode is HostMode.NORMAL


def test_health_quarantines_and_severe_evacuates_until_recovered(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-b")
    op = cluster.client(OPERATOR)
    r = op.post("/v1/hosts/host-b/health", json={"component": "fan", "severity": "moderate", "reason": "fan 2 slow"})
    assert r.status_code == 200 and r.json()["quarantined"] and r.json()["severity"] == "moderate"
    placed = op.post("/v1/vms", json={"spec": {"name": "new1", "memory": GIB}})
    assert placed.json()["vm"]["desired_host"] != "host-b"
    by_host = {c["host"]: c for c in placed.json()["placement"]["candidates"]}
    assert by_host["host-b"]["score"] > 100  # quarantined: chosen only if no healthy host can take it
    r = op.post("/v1/hosts/host-b/health", json={"component": "psu", "severity": "severe", "reason": "PSU 2 failed"})
    assert r.json()["severity"] == "severe"
    host = cluster.store.host("host-b")
    assert host.mode is HostMode.ENTERING_MAINTENANCE and host.mode_reason == "health: psu: PSU 2 failed"
    assert [t.target for t in cluster.store.tasks(open_only=True) if t.kind is TaskKind.MIGRATE] == ["web1"]
    shown = op.get("/v1/hosts/host-b/health").json()
    assert [(e["component"], e["severity"]) for e in shown["entries"]] == [("fan", "moderate"), ("psu", "severe")]
    # Recovery: out of the maintenance health caused; still quarantined while the fan is moderate.
    op.post("/v1/hosts/host-b/health", json={"component": "psu", "severity": "ok"}).raise_for_status()
    host = cluster.store.host("host-b")
    assert host.mode is HostMode.NORMAL and host.health is Severity.MODERATE and host.quarantined
    op.post("/v1/hosts/host-b/health", json={"component": "fan", "severity": "ok"}).raise_for_status()
    assert not cluster.store.host("host-b").quarantined
    messages = [e.message for e in cluster.store.events() if e.kind is EventKind.HOST_HEALTH]
    assert messages[0] == "external says fan of host-b is moderate: fan 2 slow; host host-b is now moderate"
    assert len(messages) == 4


def test_rules_listed_with_their_violations(cluster: Cluster) -> None:
    running(cluster, "host-a", "db1", "db2")
    r = cluster.client(OPERATOR).post("/v1/rules", json={"name": "dbs-apart", "kind": "keep-apart",
                                                         "vms": ["db1", "db2"]})
    assert r.status_code == 201, r.text
    assert r.json()["violations"] and "db1 and db2 share host-a" in r.json()["violations"][0]
    assert cluster.client(OPERATOR).post("/v1/rules", json={"name": "dbs-apart", "kind": "keep-apart",
                                                            "vms": ["db1", "db2"]}).status_code == 409
    listed = cluster.client(VIEWER).get("/v1/rules").json()
    assert [x["rule"]["name"] for x in listed] == ["dbs-apart"]
    # DRS at threshold 1 recommends only the mandatory move that repairs it.
    cluster.client(ADMIN).put("/v1/drs/config", json={"threshold": 1}).raise_for_status()
    recs = cluster.client(VIEWER).get("/v1/drs").json()["recommendations"]
    assert len(recs) == 1 and recs[0]["mandatory"] and recs[0]["move"]["vm"] in ("db1", "db2")
    applied = cluster.client(OPERATOR).post("/v1/drs/apply", json={"ids": [recs[0]["id"], "0123456789ab"]}).json()
    assert len(applied["tasks"]) == 1 and applied["skipped"][0].startswith("0123456789ab: no longer recommended")
    assert cluster.client(OPERATOR).delete("/v1/rules/dbs-apart").status_code == 204
    assert cluster.client(OPERATOR).delete("/v1/rules/dbs-apart").status_code == 404


def test_drs_recommends_relief_of_a_busy_host_and_full_automation_applies_it(cluster: Cluster) -> None:
    running(cluster, "host-a", "busy1", "busy2", "busy3", demand=1.0)
    status = cluster.client(VIEWER).get("/v1/drs").json()
    assert status["target"] is not None and status["imbalance"] > status["target"]
    assert status["recommendations"] and all(not r["mandatory"] and r["why"] and r["cost"] > 0
                                             for r in status["recommendations"])
    assert all(r["move"]["source"] == "host-a" for r in status["recommendations"])
    o = ops(cluster)
    o.tick_sync()  # partial (the default): nothing moves
    assert cluster.store.tasks(open_only=True) == []
    cluster.client(ADMIN).put("/v1/drs/config", json={"automation": "manual"}).raise_for_status()
    o.tick_sync()  # manual: nothing moves either
    assert cluster.store.tasks(open_only=True) == []
    cluster.client(ADMIN).put("/v1/drs/config", json={"automation": "full", "threshold": 3, "interval": 60})
    o.tick_sync()
    queued = [t for t in cluster.store.tasks(open_only=True) if t.kind is TaskKind.MIGRATE]
    assert queued and all(t.requested_by == "center:drs" and t.source == "host-a" for t in queued)
    o.tick_sync()  # within the interval, and the VMs have tasks: nothing more
    assert len([t for t in cluster.store.tasks(open_only=True)]) == len(queued)


@pytest.mark.parametrize("level", ["manual", "partial", "full"])
def test_drs_automation_decides_where_a_vm_created_without_a_host_goes(cluster: Cluster, level: str) -> None:
    cluster.store.record_heartbeat("host-a", cluster.clock() + 1, (), load(2 * GIB), ())  # the fullest: not chosen
    if level != "partial":  # partial is the default
        cluster.client(ADMIN).put("/v1/drs/config", json={"automation": level}).raise_for_status()
    assert cluster.client(VIEWER).get("/v1/drs").json()["config"]["automation"] == level
    op = cluster.client(OPERATOR)
    tasks = len(cluster.store.tasks(limit=1000))
    r = op.post("/v1/vms", json={"spec": {"name": "new1", "memory": GIB}})
    if level == "manual":  # refused in one line naming the host recommended; nothing created
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "\n" not in message and message.startswith("DRS automation is manual: the center recommends host-b for VM new1 (")
        assert "host-a scores" in message and "host-c scores" in message  # the reasons: every host's score
        assert "--host host-b" in message and "`kvmotion drs config --automation partial`" in message
        assert cluster.store.vm("new1") is None and len(cluster.store.tasks(limit=1000)) == tasks
        r = op.post("/v1/vms", json={"spec": {"name": "new1", "memory": GIB}, "host": "host-b"})  # as it says
        assert r.status_code == 201 and r.json()["placement"] is None, r.text
    else:
        assert r.status_code == 201, r.text
        assert r.json()["vm"]["desired_host"] == r.json()["placement"]["chosen"] == "host-b"
    assert cluster.store.vm("new1").desired_host == "host-b"


def test_powered_off_vms_are_rehomed(cluster: Cluster) -> None:
    run_vm(cluster.store, "cold1", "host-a")
    beat(cluster.store, "host-a", {}, cluster.clock() + 1)
    cluster.store.record_heartbeat("host-a", cluster.clock() + 2, (VmReport(name="cold1", state=ReportedState.STOPPED),),
                                   load(12 * GIB), ())
    r = cluster.client(OPERATOR).post("/v1/hosts/host-a/maintenance", json={})
    moves = r.json()["plan"]["moves"]
    assert len(moves) == 1 and moves[0]["powered_off"] and moves[0]["predicted_s"] is None
    agents = Agents()
    agents.vms[("host-a", "cold1")] = VmState.STOPPED
    asyncio.run(drive(cluster.store, agents, lambda: not cluster.store.tasks(open_only=True)))
    task = cluster.store.tasks(state=TaskState.DONE)[0]
    assert task.kind is TaskKind.REHOME and task.destination == moves[0]["destination"]
    assert agents.calls == [f"create cold1 on {task.destination}", "delete cold1 on host-a"]
    assert cluster.store.vm("cold1").desired_host == task.destination
    ops(cluster).tick_sync()
    assert cluster.store.host("host-a").mode is HostMode.MAINTENANCE


def test_a_measured_dirty_rate_feeds_the_snapshot_and_the_prediction(cluster: Cluster) -> None:
    running(cluster, "host-a", "web1", "busy1")
    beat(cluster.store, "host-a", {"web1": 0.1, "busy1": 0.1}, cluster.clock() + 2, dirty={"busy1": 300e6})
    snap = planning.snapshot(cluster.store, cluster.clock())
    assert (snap.vm["web1"].dirty_rate, snap.vm["busy1"].dirty_rate) == (0.0, 300e6)
    idle_s, _ = ops(cluster).predict("web1", "host-a", "host-b")
    busy_s, _ = ops(cluster).predict("busy1", "host-a", "host-b")
    assert idle_s is not None and busy_s is not None and busy_s > idle_s  # re-sending what it dirties takes time


def test_a_users_migration_records_its_prediction_beside_the_actual(cluster: Cluster) -> None:
    running(cluster, "host-a", "web1")
    r = cluster.client(OPERATOR).post("/v1/migrations", json={"vm": "web1", "destination": "host-b"})
    assert r.status_code == 202, r.text
    task = r.json()["task"]
    assert task["predicted_s"] > 0 and task["predicted_downtime_ms"] > 0
    asyncio.run(drive(cluster.store, Agents(), lambda: not cluster.store.tasks(open_only=True)))
    done = cluster.store.task(task["id"])
    assert done is not None and done.state is TaskState.DONE
    assert done.predicted_s == task["predicted_s"] and done.result is not None and done.result.total_ms is not None


def test_an_agents_own_health_providers_act_through_its_heartbeats(cluster: Cluster) -> None:
    from kvmotion.api.center import PROTOCOL_VERSION
    from kvmotion.api.identity import Identity, Kind
    running(cluster, "host-c", "web1")
    host_c = cluster.client(Identity(Kind.HOST, "host-c"))
    base = {"version": PROTOCOL_VERSION, "vms": [{"name": "web1", "state": "running"}],
            "load": {"cpus": 4, "memory_total": 16 * GIB, "memory_available": 12 * GIB}}
    lost = {"provider": "agent", "component": "net.vm-net", "severity": "severe",
            "reason": "port group vm-net lost its link (eth1 down)"}
    assert host_c.post("/v1/hosts/host-c/heartbeat", json={**base, "health": [lost]}).status_code == 200
    host = cluster.store.host("host-c")
    assert host.health is Severity.SEVERE
    ops(cluster).tick_sync()  # the controller acts: evacuate
    host = cluster.store.host("host-c")
    assert host.mode is HostMode.ENTERING_MAINTENANCE and "vm-net lost its link" in host.mode_reason
    # The provider no longer reports it: ok again, out of the maintenance health caused.
    assert host_c.post("/v1/hosts/host-c/heartbeat", json=base).status_code == 200
    assert cluster.store.health("host-c") == []
    ops(cluster).tick_sync()
    assert cluster.store.host("host-c").mode is HostMode.NORMAL
    events = [e.message for e in cluster.store.events() if e.kind is EventKind.HOST_HEALTH]
    assert events[0].startswith("agent says net.vm-net of host-c is severe: port group vm-net lost its link")


def test_planning_counts_a_hosts_cpu_capacity_not_its_cpu_count(cluster: Cluster) -> None:
    """A host whose agent reports a cgroup CPU limit (lab --host-cpu) is as big as the limit."""
    base = load(12 * GIB)
    cluster.store.record_heartbeat("host-b", cluster.clock() + 1, (), HostLoad(
        cpus=base.cpus, cpu_capacity=0.5, memory_total=base.memory_total, memory_available=base.memory_available), ())
    cpus = {h.name: h.cpus for h in planning.snapshot(cluster.store, cluster.clock()).hosts}
    assert cpus["host-b"] == 0.5 and cpus["host-a"] == float(base.cpus)
