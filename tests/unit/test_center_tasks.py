"""VMs, tasks and migrations at the center: store methods, routes (in process) and the dispatcher
with fake agents (start, follow, completion, failure, cancel, a center restart mid-migration)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from kvmotion.api.agent import VmState
from kvmotion.api.center import (
    PROTOCOL_VERSION,
    EventKind,
    HostFacts,
    HostLoad,
    HostState,
    MigrateRequest,
    ObservedState,
    PowerState,
    ReportedState,
    TaskKind,
    TaskProgress,
    TaskState,
    TaskView,
    VmReport,
)
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.migration import MigrationOptions, MigrationRecord, MigrationRequest, Phase, Progress, Summary
from kvmotion.api.spec import VmSpec
from kvmotion.center.dispatcher import Dispatcher, drift_of
from kvmotion.center.store import HostRow, MigrationRow, SqliteStore, VmRow
from kvmotion.center.tasks import Tasks
from kvmotion.core.errors import Conflict, InsufficientResources, NotFound, PrecheckFailed
from tests.unit.test_center_api import ADMIN, T0, VIEWER, Cluster

GIB = 1 << 30
OPERATOR = Identity(Kind.USER, "otto", Role.OPERATOR)
FACTS = HostFacts(accel="tcg", cpu_models=("qemu64",), portgroups=("vm-net",), datastores=("ds1",), updated=T0)


def load(free: int = 8 * GIB) -> HostLoad:
    return HostLoad(cpus=4, memory_total=16 * GIB, memory_available=free)


def add_host(store: SqliteStore, name: str, at: float = T0, free: int = 8 * GIB) -> None:
    store.join("tok", lambda _t: None, HostRow(name=name, address="127.0.0.1", agent_url=f"https://{name}.test:7701",
                                               state=HostState.NOT_RESPONDING, joined=at), f"host:{name}")
    store.record_heartbeat(name, at, (), load(free), ())
    store.set_host_facts(name, FACTS)


def spec(name: str = "web1", memory: int = GIB) -> dict:
    return {"name": name, "memory": memory, "vcpus": 1, "disks": [{"datastore": "ds1", "source": f"{name}.img"}]}


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    for name in ("host-a", "host-b", "host-c"):
        add_host(c.store, name, free={"host-a": 8, "host-b": 4, "host-c": 12}[name] * GIB)
    yield c
    c.store.close()


def run_vm(store: SqliteStore, name: str, host: str, at: float = T0 + 1, memory: int = GIB) -> None:
    """A VM created through the center and reported running on `host`."""
    now = time.time()
    task = TaskView(id=f"{abs(hash(name)):016x}"[:16], kind=TaskKind.CREATE, target=name, state=TaskState.QUEUED,
                    created=now, requested_by="user:admin")
    store.create_vm(VmRow(name=name, observed_state=ObservedState.ABSENT, updated=now,
                          spec=VmSpec.validated(spec(name, memory)).dumps(), desired_host=host,
                          desired_power=PowerState.ON),
                    task, "user:admin")
    store.end_task(task.id, TaskState.DONE, now)
    store.record_heartbeat(host, at, (VmReport(name=name, state=ReportedState.RUNNING),), load(), ())


# ---- store ---------------------------------------------------------------------------------------------------
def test_store_tasks_one_open_task_per_vm_and_truthful_ends(cluster: Cluster) -> None:
    s = cluster.store
    run_vm(s, "web1", "host-a")
    t = TaskView(id="00000000000000a1", kind=TaskKind.MIGRATE, target="web1", state=TaskState.QUEUED, created=T0 + 2,
                 requested_by="user:otto")
    m = MigrationRow(id=t.id, task_id=t.id, vm="web1", source="host-a", destination="host-b")
    queued = s.add_task(t, "user:otto", m)
    assert (queued.source, queued.destination, queued.state) == ("host-a", "host-b", TaskState.QUEUED)
    with pytest.raises(Conflict, match="VM web1 is already migrating: task 00000000000000a1"):
        s.add_task(t.model_copy(update={"id": "00000000000000a2", "kind": TaskKind.STOP}), "user:otto")
    with pytest.raises(NotFound, match="no VM nope"):
        s.add_task(t.model_copy(update={"id": "00000000000000a3", "target": "nope"}), "user:otto")
    assert s.task("00000000000000a2") is None  # refused: nothing written
    assert s.start_task(t.id, T0 + 3, TaskProgress(phase="check")) is True
    assert s.start_task(t.id, T0 + 3, TaskProgress()) is False
    s.update_task(t.id, TaskProgress(phase="precopy", fraction=0.5), agent_id="abcdef012345", record='{"id": "x"}')
    mig = s.migration(t.id)
    assert mig is not None and mig.agent_id == "abcdef012345" and mig.record == '{"id": "x"}'
    assert s.request_cancel(t.id, "user:otto", T0 + 4).cancel_requested
    assert s.end_task(t.id, TaskState.DONE, T0 + 5, desired_host="host-b", observed_host="host-b",
                      observed_state=ObservedState.RUNNING)
    assert not s.end_task(t.id, TaskState.FAILED, T0 + 6)  # ended once
    vm = s.vm("web1")
    assert vm is not None and (vm.desired_host, vm.observed_host) == ("host-b", "host-b")
    done = s.task(t.id)
    assert done is not None and done.state is TaskState.DONE and done.ended == T0 + 5
    assert (done.progress.phase, done.progress.fraction, done.progress.message) == ("done", 1.0, "")
    with pytest.raises(Conflict, match="has ended already"):
        s.request_cancel(t.id, "user:otto", T0 + 7)
    kinds = [e.kind for e in s.events(limit=1000)]
    assert kinds.count(EventKind.TASK_ENDED) == 2 and EventKind.TASK_CANCEL_REQUESTED in kinds
    assert [x.id for x in s.tasks(open_only=True)] == []
    # A queued task is cancelled at once.
    q = s.add_task(t.model_copy(update={"id": "00000000000000b1", "kind": TaskKind.STOP}), "user:otto")
    assert s.request_cancel(q.id, "user:otto", T0 + 8).state is TaskState.CANCELLED


def test_store_vm_names_are_unique_cluster_wide(cluster: Cluster) -> None:
    s = cluster.store
    s.record_heartbeat("host-c", T0 + 1, (VmReport(name="old", state=ReportedState.RUNNING),), load(), ())
    t = TaskView(id="00000000000000c1", kind=TaskKind.CREATE, target="old", state=TaskState.QUEUED, created=T0,
                 requested_by="user:admin")
    before = (s.vms(), s.tasks())
    with pytest.raises(Conflict, match=r"VM old exists already \(observed on host-c\)"):
        s.create_vm(VmRow(name="old", observed_state=ObservedState.ABSENT, updated=T0, spec="{}"), t, "user:admin")
    assert (s.vms(), s.tasks()) == before


# ---- routes ----------------------------------------------------------------------------------------------------
def test_vm_create_places_lists_and_starts(cluster: Cluster) -> None:
    op = cluster.client(OPERATOR)
    r = op.post("/v1/vms", json={"spec": spec("web1")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["placement"]["chosen"] == "host-c"  # the most free memory
    assert body["vm"]["desired_host"] == "host-c" and body["task"]["kind"] == "create"
    assert {c["host"] for c in body["placement"]["candidates"]} == {"host-a", "host-b", "host-c"}
    r = op.post("/v1/vms", json={"spec": spec("web1")})
    assert r.status_code == 409 and r.json()["error"]["message"].startswith("VM web1 exists already")
    r = op.post("/v1/vms", json={"spec": spec("web2"), "host": "nope"})
    assert r.status_code == 422 and r.json()["error"]["message"] == "unknown host nope: no such host has joined"
    r = op.post("/v1/vms", json={"spec": spec("big", memory=64 * GIB)})
    assert r.status_code == 409 and "cannot place VM big: no host can take it: host-a has 8192 MiB free" in r.text
    listed = cluster.client(VIEWER).get("/v1/vms")
    assert listed.status_code == 200
    assert [v["name"] for v in listed.json()] == ["web1"] and listed.json()[0]["spec"]["memory"] == GIB
    assert cluster.client(VIEWER).get("/v1/vms/web1").json()["desired_power"] == "off"
    assert cluster.client(VIEWER).get("/v1/vms/nope").status_code == 404
    # The create task is still open: a start waits for it.
    r = op.post("/v1/vms/web1/start")
    assert r.status_code == 409 and "VM web1 is busy (create)" in r.text
    cluster.store.end_task(body["task"]["id"], TaskState.DONE, T0 + 1)
    r = op.post("/v1/vms/web1/start")
    assert r.status_code == 202 and r.json()["kind"] == "start" and r.json()["state"] == "queued"
    r = cluster.client(VIEWER).post("/v1/vms/web1/stop")
    assert r.status_code == 403 and "may not change VMs and migrate them" in r.json()["error"]["message"]


def test_migration_requests_and_their_one_line_refusals(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    op = cluster.client(OPERATOR)
    cases = [({"vm": "nope"}, "unknown VM nope: no such VM in the cluster"),
             ({"vm": "web1", "destination": "nope"}, "unknown host nope: no such host has joined"),
             ({"vm": "web1", "destination": "host-a"}, "VM web1 is already on host-a: name another host")]
    before = cluster.store.tasks()
    for body, message in cases:
        r = op.post("/v1/migrations", json=body)
        assert r.status_code == 422 and r.json()["error"]["message"] == message
    assert cluster.store.tasks() == before
    r = op.post("/v1/migrations", json={"vm": "web1"})
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["placement"]["chosen"] == "host-c"
    assert started["task"]["source"] == "host-a" and started["task"]["destination"] == "host-c"
    r = op.post("/v1/migrations", json={"vm": "web1", "destination": "host-b"})
    assert r.status_code == 422 and r.json()["error"]["message"] == f"VM web1 is already migrating: task {started['task']['id']}"
    tasks = cluster.client(VIEWER).get("/v1/tasks", params={"state": "queued"}).json()
    assert [t["id"] for t in tasks] == [started["task"]["id"]]
    task_id = started["task"]["id"]
    assert cluster.client(VIEWER).get(f"/v1/tasks/{task_id}").json()["kind"] == "migrate"
    assert cluster.client(VIEWER).get("/v1/tasks/0123456789abcdef").status_code == 404
    assert cluster.client(VIEWER).post(f"/v1/tasks/{task_id}/cancel").status_code == 403
    r = op.post(f"/v1/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"


def test_moves_placed_at_once_see_each_other_s_reservation(cluster: Cluster, monkeypatch) -> None:
    """Two 7 GiB VMs asked to move at the same moment: host-c fits one, host-b neither. Both are
    placed on host-c; the second written finds the first's reservation, is placed again and
    refused, instead of being sent where it cannot fit."""
    s = cluster.store
    for name in ("big1", "big2"):
        run_vm(s, name, "host-a", memory=7 * GIB)
    ops = Tasks(s, time.time)
    placing = ops.placement
    inside = threading.Barrier(2, timeout=0.5)

    def slow_placement(vm_spec, source, hosts=None):
        chosen = placing(vm_spec, source, hosts)
        try:
            inside.wait()  # both requests placed before either wrote its task: the race
        except threading.BrokenBarrierError:
            pass  # the second request's placement again, after it found the room taken
        return chosen

    monkeypatch.setattr(ops, "placement", slow_placement)
    outcomes: dict[str, object] = {}

    def move(vm: str) -> None:
        try:
            outcomes[vm] = ops.migrate(MigrateRequest(vm=vm), OPERATOR).task.destination
        except InsufficientResources as exc:
            outcomes[vm] = exc

    threads = [threading.Thread(target=move, args=(vm,)) for vm in ("big1", "big2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(map(str, outcomes.values()))[-1] == "host-c", outcomes
    refused = [o for o in outcomes.values() if isinstance(o, InsufficientResources)]
    assert len(refused) == 1 and "cannot migrate VM" in str(refused[0]), outcomes
    assert [t.destination for t in s.tasks(open_only=True)] == ["host-c"]


def test_events_follow_streams_server_sent_events(cluster: Cluster) -> None:
    with cluster.client(VIEWER) as client, client.stream("GET", "/v1/events", params={"follow": 1}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(json.loads(line[5:]))
            if len(data) == 3:
                break
    assert [d["id"] for d in data] == [1, 2, 3] and data[0]["kind"] == "center_initialized"


# ---- the dispatcher with fake agents ---------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    phases: list[Phase]  # what each poll of the record shows next
    error: str | None = None


class FakeAgents:
    """Agents that answer from memory: each poll of a migration advances it one phase of its plan."""

    def __init__(self) -> None:
        self.records: dict[str, MigrationRecord] = {}
        self.plans: dict[str, Plan] = {}
        self.vms: dict[tuple[str, str], VmState] = {}
        self.next_plan = Plan([Phase.PREPARE, Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMMIT, Phase.DONE])
        self.refuse: str | None = None
        self.calls: list[str] = []
        self.count = 0

    async def start_migration(self, host, request: MigrationRequest):
        vm, destination = request.vm, request.destination
        self.calls.append(f"start {vm} {host.name}->{destination} {request.options.max_downtime_ms}")
        if self.refuse:
            raise PrecheckFailed(self.refuse)
        self.count += 1
        mid = f"{self.count:012x}"
        rec = MigrationRecord(id=mid, vm=vm, source=host.name, destination=destination, options=MigrationOptions(),
                              phase=Phase.CHECK, started_at=time.time())
        self.records[mid] = rec
        self.plans[mid] = dataclasses.replace(self.next_plan, phases=list(self.next_plan.phases))
        return rec

    def advance(self, mid: str) -> MigrationRecord:
        rec, plan = self.records[mid], self.plans[mid]
        if plan.phases and not rec.phase.terminal:
            phase = plan.phases.pop(0)
            rec = dataclasses.replace(
                rec, phase=phase, progress=Progress(transferred=50, remaining=50),
                error=plan.error if phase is Phase.FAILED else rec.error,
                summary=Summary(total_ms=900, downtime_ms=40, pause_ms=45, setup_ms=1, rounds=3, bytes=100,
                                zero_pages=0, normal_pages=0, mean_link_rate=1, peak_dirty_rate=1, throttle_max=0,
                                encrypted=True, converged=True, postcopy=False) if phase is Phase.DONE else None)
            self.records[mid] = rec
        return rec

    async def migration(self, host, migration_id):
        if migration_id not in self.records:
            raise NotFound(f"no migration {migration_id}")
        return self.advance(migration_id)

    async def migrations(self, host):
        return [r for r in self.records.values() if r.source == host.name]

    async def cancel_migration(self, host, migration_id):
        self.calls.append(f"cancel {migration_id}")
        self.plans[migration_id].phases = [Phase.ROLLBACK, Phase.CANCELLED]

    async def facts(self, host):
        return FACTS

    async def vm_state(self, host, name):
        return self.vms.get((host.name, name))

    async def create_vm(self, host, spec):
        self.calls.append(f"create {spec.name} on {host.name}")
        self.vms[(host.name, spec.name)] = VmState.STOPPED

    async def start_vm(self, host, name):
        self.calls.append(f"start {name} on {host.name}")
        self.vms[(host.name, name)] = VmState.RUNNING

    async def stop_vm(self, host, name):
        self.vms[(host.name, name)] = VmState.STOPPED

    async def aclose(self):
        pass


def dispatcher(store: SqliteStore, agents: FakeAgents) -> Dispatcher:
    return Dispatcher(store, agents, interval=0.01, poll=0.01, call_timeout=5, reconcile_every=0.05)


async def until(store: SqliteStore, task_id: str, check, timeout: float = 10.0) -> TaskView:
    async with asyncio.timeout(timeout):
        while True:
            task = store.task(task_id)
            if task is not None and check(task):
                return task
            await asyncio.sleep(0.01)


async def run_until(store: SqliteStore, agents: FakeAgents, task_id: str, check) -> TaskView:
    stop = asyncio.Event()
    d = dispatcher(store, agents)
    async with asyncio.TaskGroup() as group:
        group.create_task(d.run(stop))
        try:
            return await until(store, task_id, check)
        finally:
            stop.set()


def migrate(cluster: Cluster, body: dict) -> str:
    r = cluster.client(OPERATOR).post("/v1/migrations", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task"]["id"]


def test_dispatcher_runs_a_migration_to_the_end(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    agents = FakeAgents()
    task_id = migrate(cluster, {"vm": "web1", "destination": "host-b", "max_downtime_ms": 300})
    task = asyncio.run(run_until(cluster.store, agents, task_id, lambda t: t.state.terminal))
    assert task.state is TaskState.DONE and task.error is None
    assert task.result is not None and task.result.host == "host-b" and task.result.downtime_ms == 40
    assert task.result.pause_ms == 45
    assert task.progress.phase == "done" and task.progress.fraction == 1.0
    assert agents.calls == ["start web1 host-a->host-b 300"]
    vm = cluster.store.vm("web1")
    assert vm is not None and (vm.desired_host, vm.observed_host, vm.observed_state) == \
        ("host-b", "host-b", ObservedState.RUNNING)
    mig = cluster.store.migration(task_id)
    assert mig is not None and mig.agent_id == "000000000001" and json.loads(mig.record)["phase"] == "done"


def test_dispatcher_reports_failures_and_refusals(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    agents = FakeAgents()
    agents.next_plan = Plan([Phase.PREPARE, Phase.ROLLBACK, Phase.FAILED], error="destination QEMU exited")
    task_id = migrate(cluster, {"vm": "web1", "destination": "host-b"})
    task = asyncio.run(run_until(cluster.store, agents, task_id, lambda t: t.state.terminal))
    assert task.state is TaskState.FAILED and task.error == "destination QEMU exited"
    vm = cluster.store.vm("web1")
    assert vm is not None and vm.desired_host == "host-a"  # a failed migration moves nothing
    agents.refuse = "migration of web1 to host-b refused: host-b has 0 MiB free"
    task_id = migrate(cluster, {"vm": "web1", "destination": "host-b"})
    task = asyncio.run(run_until(cluster.store, agents, task_id, lambda t: t.state.terminal))
    assert task.state is TaskState.FAILED and task.error == agents.refuse


def test_dispatcher_cancels_a_running_migration(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    agents = FakeAgents()
    agents.next_plan = Plan([Phase.PREPARE] + [Phase.PRECOPY] * 10_000)

    async def scenario() -> TaskView:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(dispatcher(cluster.store, agents).run(stop))
            try:
                task_id = await asyncio.to_thread(migrate, cluster, {"vm": "web1", "destination": "host-b"})
                await until(cluster.store, task_id, lambda t: t.progress.phase == "precopy")
                r = await asyncio.to_thread(cluster.client(OPERATOR).post, f"/v1/tasks/{task_id}/cancel")
                assert r.status_code == 200 and r.json()["cancel_requested"]
                return await until(cluster.store, task_id, lambda t: t.state.terminal)
            finally:
                stop.set()

    task = asyncio.run(scenario())
    assert task.state is TaskState.CANCELLED and "cancel 000000000001" in agents.calls


def test_a_restarted_center_ends_running_migrations_truthfully(cluster: Cluster) -> None:
    """Center 1 starts the migration and stops mid-way; the migration goes on at the agent; center 2
    finds it by id and follows it to its end. A task whose start the agent never saw fails."""
    run_vm(cluster.store, "web1", "host-a")
    agents = FakeAgents()
    agents.next_plan = Plan([Phase.PREPARE, Phase.PRECOPY, Phase.PRECOPY, Phase.SWITCHOVER, Phase.COMMIT, Phase.DONE])
    task_id = migrate(cluster, {"vm": "web1", "destination": "host-c"})
    mid_way = asyncio.run(run_until(cluster.store, agents, task_id, lambda t: t.progress.phase == "precopy"))
    assert mid_way.state is TaskState.RUNNING  # center 1 stopped; the task stays running
    rec = agents.records["000000000001"]
    assert not rec.phase.terminal
    task = asyncio.run(run_until(cluster.store, agents, task_id, lambda t: t.state.terminal))
    assert task.state is TaskState.DONE and agents.calls == ["start web1 host-a->host-c 500"]  # never started twice
    # The center stopped after it marked the task running but before the source agent heard of it.
    run_vm(cluster.store, "web2", "host-a")
    lost = migrate(cluster, {"vm": "web2", "destination": "host-b"})
    assert cluster.store.start_task(lost, time.time(), TaskProgress(phase="starting"))
    task = asyncio.run(run_until(cluster.store, agents, lost, lambda t: t.state.terminal))
    assert task.state is TaskState.FAILED and "has no migration of web2 started by this task" in (task.error or "")
    # ... or after the agent accepted it but before the center recorded its id: adopted and followed.
    run_vm(cluster.store, "web3", "host-a")
    adopted = migrate(cluster, {"vm": "web3", "destination": "host-b"})
    assert cluster.store.start_task(adopted, time.time() - 1, TaskProgress(phase="starting"))
    host_a = cluster.store.host("host-a")
    asyncio.run(agents.start_migration(host_a, MigrationRequest(vm="web3", destination="host-b")))
    task = asyncio.run(run_until(cluster.store, agents, adopted, lambda t: t.state.terminal))
    assert task.state is TaskState.DONE and task.result is not None and task.result.migration == "000000000002"


def test_dispatcher_admits_under_host_budgets(cluster: Cluster) -> None:
    settings = cluster.store.settings().model_copy(update={"migration_budget_slow": 1})
    cluster.store.save_settings(settings)
    for name in ("v1", "v2"):
        run_vm(cluster.store, name, "host-a")
    agents = FakeAgents()
    agents.next_plan = Plan([Phase.PRECOPY] * 10_000)
    first = migrate(cluster, {"vm": "v1", "destination": "host-b"})
    second = migrate(cluster, {"vm": "v2", "destination": "host-c"})

    async def scenario() -> TaskView:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(dispatcher(cluster.store, agents).run(stop))
            try:
                await until(cluster.store, first, lambda t: t.state is TaskState.RUNNING)
                return await until(cluster.store, second, lambda t: t.progress.message.startswith("waiting"))
            finally:
                stop.set()

    waiting = asyncio.run(scenario())
    assert waiting.state is TaskState.QUEUED and waiting.progress.message == "waiting: host-a runs 1 of 1 migrations"


def test_dispatcher_creates_and_starts_vms_idempotently(cluster: Cluster) -> None:
    agents = FakeAgents()
    r = cluster.client(OPERATOR).post("/v1/vms", json={"spec": spec("db1"), "host": "host-b"})
    create = r.json()["task"]["id"]
    task = asyncio.run(run_until(cluster.store, agents, create, lambda t: t.state.terminal))
    assert task.state is TaskState.DONE and agents.calls == ["create db1 on host-b"]
    start = cluster.client(OPERATOR).post("/v1/vms/db1/start").json()["id"]
    agents.vms[("host-b", "db1")] = VmState.RUNNING  # started meanwhile (a center restart mid-call): nothing to do
    task = asyncio.run(run_until(cluster.store, agents, start, lambda t: t.state.terminal))
    assert task.state is TaskState.DONE and agents.calls == ["create db1 on host-b"]
    vm = cluster.store.vm("db1")
    assert vm is not None and vm.desired_power is PowerState.ON
    stop = cluster.client(OPERATOR).post("/v1/vms/db1/stop").json()["id"]
    del agents.vms[("host-b", "db1")]
    task = asyncio.run(run_until(cluster.store, agents, stop, lambda t: t.state.terminal))
    assert task.state is TaskState.FAILED and task.error == "VM db1 is not on host-b"


def test_reconcile_reports_drift_once(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    cluster.store.record_heartbeat("host-a", T0 + 5, (), load(), ())
    cluster.store.record_heartbeat("host-b", T0 + 5, (VmReport(name="web1", state=ReportedState.RUNNING),), load(), ())
    vm = cluster.store.vm("web1")
    assert vm is not None and drift_of(vm) == "VM web1 is desired on host-a but observed on host-b (running)"
    d = dispatcher(cluster.store, FakeAgents())
    assert asyncio.run(d.reconcile()) == ["web1: VM web1 is desired on host-a but observed on host-b (running)"]
    assert asyncio.run(d.reconcile()) == []  # reported once
    drift = [e for e in cluster.store.events(limit=1000) if e.kind is EventKind.DRIFT]
    assert len(drift) == 1 and drift[0].object == "vm:web1"


def test_heartbeats_give_cpu_demand(cluster: Cluster) -> None:
    """The host's CPU demand is what its agent measured: the sum of its VMs' figures; none while
    no VM has one yet (the agent's first sample)."""
    client = cluster.client(Identity(Kind.HOST, "host-a"))
    view = cluster.client(ADMIN)

    def report(*vms: dict) -> float | None:
        beat = {"version": PROTOCOL_VERSION, "load": {"cpus": 4, "memory_total": GIB, "memory_available": GIB,
                                                       "vms": list(vms)}}
        assert client.post("/v1/hosts/host-a/heartbeat", json=beat).status_code == 200
        return view.get("/v1/hosts/host-a").json()["cpu_demand"]

    assert report({"name": "x", "memory": GIB}, {"name": "y"}) is None
    assert report({"name": "x", "cpu_demand": 1.25, "cpu_ready": 0.5},
                  {"name": "y"}) == 1.25  # y just started: its figure comes next time
    assert report({"name": "x", "cpu_demand": 1.25}, {"name": "y", "cpu_demand": 0.25}) == 1.5
    assert report() == 0.0  # no VMs: nothing busy
    assert view.get("/v1/hosts/host-a").json()["facts"]["cpu_models"] == ["qemu64"]
