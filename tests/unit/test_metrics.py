"""/metrics on the center, an agent and a datastore, in process: who may scrape, the families each
serves, and figures that move as the state under them does (tasks queued, run and ended; heartbeats;
VMs; migrations ended; lease calls and refused writes)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvmotion.api.agent import VmState
from kvmotion.api.center import PROTOCOL_VERSION, ObservedState, TaskKind, TaskProgress, TaskResult, TaskState, TaskView
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.metrics import histogram_buckets, new_registry
from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase, Progress, Summary
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.serving import Security, secure
from kvmotion.host.api import create_app as agent_app
from kvmotion.host.metrics import HostSample, VmSample, host_families, sample_vms
from kvmotion.host.resources import MemInfo
from kvmotion.host.schedstat import SchedStat
from kvmotion.host.vms import HostConfig
from kvmotion.migration.api import migration_router
from kvmotion.migration.engine import MigrationService
from kvmotion.migration.metrics import migration_families
from kvmotion.qemu.accel import Accel, AccelChoice
from kvmotion.storage.api import create_app as datastore_app
from kvmotion.storage.datastore import Datastore
from kvmotion.storage.lease import WriteRefusal, parse_refusal_line, refusal_line
from kvmotion.storage.metrics import DatastoreMetrics
from tests.certs import TestCA, as_caller
from tests.unit.test_center_api import T0, VIEWER, Cluster
from tests.unit.test_center_tasks import add_host, run_vm

with warnings.catch_warnings():  # starlette's TestClient warns about its httpx backend
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
OPERATOR = Identity(Kind.USER, "otto", Role.OPERATOR)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def scrape(client: TestClient) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def test_histogram_buckets_are_cumulative_with_the_sum() -> None:
    buckets, total = histogram_buckets([0.5, 1.0, 3.0, 99.0], (1.0, 2.0, 5.0))
    assert buckets == [("1.0", 2.0), ("2.0", 2.0), ("5.0", 3.0), ("+Inf", 4.0)]
    assert total == 103.5
    assert histogram_buckets([], (1.0,)) == ([("1.0", 0.0), ("+Inf", 0.0)], 0.0)


# ---- the center ------------------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    for name in ("host-a", "host-b"):
        add_host(c.store, name)
    yield c
    c.store.close()


def test_center_metrics_need_an_identity_that_may_read(cluster: Cluster) -> None:
    assert cluster.client(None).get("/metrics").status_code == 401
    assert cluster.client(Identity(Kind.QEMU, "host-a")).get("/metrics").status_code == 403
    assert cluster.client(Identity(Kind.HOST, "host-a")).get("/metrics").status_code == 200
    text = scrape(cluster.client(VIEWER))
    assert {"kvmotion_center_tasks", "kvmotion_center_tasks_ended", "kvmotion_center_migration_duration_seconds",
            "kvmotion_center_migration_downtime_seconds", "kvmotion_center_hosts", "kvmotion_center_host_state",
            "kvmotion_center_host_heartbeat_age_seconds", "kvmotion_center_vms", "kvmotion_center_host_cpu_demand_cpus",
            "kvmotion_center_vm_cpu_demand_cpus", "kvmotion_center_vm_cpu_ready_cpus", "kvmotion_center_vm_memory_bytes",
            "process_resident_memory_bytes"} <= families(text)
    assert "/metrics" not in cluster.client(VIEWER).get("/openapi.json").json()["paths"]


def test_center_metrics_follow_the_task_queue_and_migrations(cluster: Cluster) -> None:
    viewer, store = cluster.client(VIEWER), cluster.store
    run_vm(store, "web1", "host-a")
    before = parse(scrape(viewer))
    assert value(before, "kvmotion_center_tasks_ended_total", kind="create", result="done") == 1
    assert value(before, "kvmotion_center_tasks", kind="migrate", state="queued") == 0
    assert value(before, "kvmotion_center_migration_duration_seconds_count") == 0
    assert value(before, "kvmotion_center_vms", state="running") == 1

    r = cluster.client(OPERATOR).post("/v1/migrations", json={"vm": "web1", "destination": "host-b"})
    assert r.status_code == 202, r.text
    task_id = r.json()["task"]["id"]
    queued = parse(scrape(viewer))
    assert value(queued, "kvmotion_center_tasks", kind="migrate", state="queued") == 1
    assert store.start_task(task_id, T0 + 2, TaskProgress(phase="check"))
    running = parse(scrape(viewer))
    assert value(running, "kvmotion_center_tasks", kind="migrate", state="queued") == 0
    assert value(running, "kvmotion_center_tasks", kind="migrate", state="running") == 1
    assert store.end_task(task_id, TaskState.DONE, T0 + 14, result=TaskResult(host="host-b", total_ms=12_000,
                                                                             downtime_ms=40),
                          desired_host="host-b", observed_host="host-b", observed_state=ObservedState.RUNNING)
    after = parse(scrape(viewer))
    assert value(after, "kvmotion_center_tasks", kind="migrate", state="running") == 0
    assert value(after, "kvmotion_center_tasks_ended_total", kind="migrate", result="done") == 1
    assert value(after, "kvmotion_center_migration_duration_seconds_count") == 1
    assert value(after, "kvmotion_center_migration_duration_seconds_sum") == 12.0
    assert value(after, "kvmotion_center_migration_duration_seconds_bucket", le="10.0") == 0
    assert value(after, "kvmotion_center_migration_duration_seconds_bucket", le="20.0") == 1
    assert value(after, "kvmotion_center_migration_downtime_seconds_bucket", le="0.05") == 1
    # A failed one counts as failed, and in no histogram.
    t = TaskView(id="00000000000000f1", kind=TaskKind.STOP, target="web1", state=TaskState.QUEUED, created=T0 + 20,
                 requested_by="user:otto")
    store.add_task(t, "user:otto")
    store.end_task(t.id, TaskState.FAILED, T0 + 21, error="no")
    failed = parse(scrape(viewer))
    assert value(failed, "kvmotion_center_tasks_ended_total", kind="stop", result="failed") == 1
    assert value(failed, "kvmotion_center_migration_duration_seconds_count") == 1


def test_center_metrics_give_heartbeat_age_and_loads(cluster: Cluster) -> None:
    viewer = cluster.client(VIEWER)
    vm_load = {"name": "web1", "memory": 300 << 20,
               "cpu_demand": 0.75, "cpu_ready": 0.125}
    beat = {"version": PROTOCOL_VERSION, "vms": [{"name": "web1", "state": "running"}],
            "load": {"cpus": 4, "memory_total": 16 << 30, "memory_available": 9 << 30, "vms": [vm_load]}}
    cluster.clock.now = T0 + 3
    assert cluster.client(Identity(Kind.HOST, "host-a")).post("/v1/hosts/host-a/heartbeat", json=beat).status_code == 200
    cluster.clock.now = T0 + 5.5
    s = parse(scrape(viewer))
    assert value(s, "kvmotion_center_host_heartbeat_age_seconds", host="host-a") == 2.5
    assert value(s, "kvmotion_center_host_heartbeat_age_seconds", host="host-b") == 5.5
    assert value(s, "kvmotion_center_hosts", state="connected") == 2
    assert value(s, "kvmotion_center_host_state", host="host-a", state="connected") == 1
    assert value(s, "kvmotion_center_host_cpus", host="host-a") == 4
    assert value(s, "kvmotion_center_host_memory_available_bytes", host="host-a") == 9 << 30
    assert value(s, "kvmotion_center_host_cpu_demand_cpus", host="host-a") == 0.75
    assert value(s, "kvmotion_center_host_cpu_ready_cpus", host="host-a") == 0.125
    assert value(s, "kvmotion_center_vm_cpu_demand_cpus", host="host-a", vm="web1") == 0.75
    assert value(s, "kvmotion_center_vm_cpu_ready_cpus", host="host-a", vm="web1") == 0.125
    assert value(s, "kvmotion_center_vm_memory_bytes", host="host-a", vm="web1") == 300 << 20
    assert value(s, "kvmotion_center_vms", state="running") == 1
    # Silent for longer than the settings allow: not responding, its loads left out as stale.
    cluster.clock.now = T0 + 30
    cluster.app.state.controller.tick_sync()
    silent = parse(scrape(viewer))
    assert value(silent, "kvmotion_center_host_heartbeat_age_seconds", host="host-a") == 27
    assert value(silent, "kvmotion_center_hosts", state="not_responding") == 2
    assert ("kvmotion_center_vm_cpu_demand_cpus", frozenset({("host", "host-a"), ("vm", "web1")})) not in silent
    assert value(silent, "kvmotion_center_vms", state="unknown") == 1


# ---- an agent ----------------------------------------------------------------------------------------------------
def _record(mid: str, phase: Phase, progress: Progress | None = None, summary: Summary | None = None) -> MigrationRecord:
    return MigrationRecord(id=mid, vm=f"vm-{mid}", source="host-a", destination="host-b", options=MigrationOptions(),
                           phase=phase, started_at=T0, progress=progress or Progress(), summary=summary)


def _summary(total_ms: float, downtime_ms: float, rounds: int, sent: int, throttle: float) -> Summary:
    return Summary(total_ms=total_ms, downtime_ms=downtime_ms, pause_ms=downtime_ms + 20, setup_ms=50, rounds=rounds,
                   bytes=sent, zero_pages=0, normal_pages=sent // 4096, mean_link_rate=1e8, peak_dirty_rate=5e7,
                   throttle_max=throttle, encrypted=True, converged=True, postcopy=False)


def test_migration_families_count_ends_and_follow_running_migrations() -> None:
    records = [
        _record("a1", Phase.DONE, Progress(round=4, transferred=900), _summary(3000, 30, 5, 1000, 0.5)),
        _record("a2", Phase.FAILED, Progress(round=2, transferred=400)),
        _record("a3", Phase.PRECOPY, Progress(round=3, transferred=250, remaining=750, link_rate=1e8, dirty_rate=2e7,
                                              throttle=0.2)),
    ]
    s = parse("".join(f"{line}\n" for line in _exposition(records, incoming_active=1, ended={"committed": 2})))
    assert value(s, "kvmotion_agent_migrations_total", host="host-a", role="source", result="done") == 1
    assert value(s, "kvmotion_agent_migrations_total", host="host-a", role="source", result="failed") == 1
    assert value(s, "kvmotion_agent_migrations_total", host="host-a", role="source", result="cancelled") == 0
    assert value(s, "kvmotion_agent_migrations_total", host="host-a", role="destination", result="committed") == 2
    assert value(s, "kvmotion_agent_migrations_active", host="host-a", role="source") == 1
    assert value(s, "kvmotion_agent_migrations_active", host="host-a", role="destination") == 1
    assert value(s, "kvmotion_agent_migration_duration_seconds_count", host="host-a") == 1
    assert value(s, "kvmotion_agent_migration_duration_seconds_sum", host="host-a") == 3.0
    assert value(s, "kvmotion_agent_migration_downtime_seconds_bucket", host="host-a", le="0.05") == 1
    assert value(s, "kvmotion_agent_migration_pause_seconds_sum", host="host-a") == pytest.approx(0.05)
    assert value(s, "kvmotion_agent_migration_precopy_rounds_sum", host="host-a") == 5
    assert value(s, "kvmotion_agent_migration_throttle_max_ratio_bucket", host="host-a", le="0.4") == 0
    assert value(s, "kvmotion_agent_migration_throttle_max_ratio_bucket", host="host-a", le="0.5") == 1
    # Bytes and rounds: the final figures of the ended ones (never below their last progress), the running one's so far.
    assert value(s, "kvmotion_agent_migration_sent_bytes_total", host="host-a") == 1000 + 400 + 250
    assert value(s, "kvmotion_agent_migration_rounds_total", host="host-a") == 5 + 2 + 3
    running = {"host": "host-a", "vm": "vm-a3", "destination": "host-b"}
    assert value(s, "kvmotion_agent_migration_phase", **running, phase="precopy") == 1
    assert value(s, "kvmotion_agent_migration_remaining_bytes", **running) == 750
    assert value(s, "kvmotion_agent_migration_throttle_ratio", **running) == 0.2
    assert value(s, "kvmotion_agent_migration_dirty_rate_bytes_per_second", **running) == 2e7
    # A migration this host receives is not counted as one it sends.
    incoming = dataclasses.replace(records[0], id="b1", source="host-c", destination="host-a")
    again = parse("".join(f"{line}\n" for line in _exposition([*records, incoming], 1, {"committed": 2})))
    assert value(again, "kvmotion_agent_migrations_total", host="host-a", role="source", result="done") == 1


def _exposition(records: list[MigrationRecord], incoming_active: int, ended: dict[str, int]) -> list[str]:
    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield from migration_families("host-a", records, incoming_active, ended)

    registry = CollectorRegistry()
    registry.register(One())
    return generate_latest(registry).decode().splitlines()


def test_host_families_from_a_sample() -> None:
    class Status:  # what sample_vms reads of a VmStatus
        def __init__(self, name: str, state: str, pid: int | None) -> None:
            self.name, self.state, self.pid, self.vcpus, self.memory = name, VmState(state), pid, 2, 512 << 20

    threads = {10: SchedStat(2 * 10**9, 5 * 10**8, 7), 11: SchedStat(10**9, 0, 3)}
    vms = sample_vms([Status("web1", "running", 42), Status("db1", "stopped", None)],  # type: ignore[list-item]
                     read=lambda pid: threads if pid == 42 else {}, rss=lambda pid: 100 << 20)
    assert vms[0] == VmSample("web1", VmState.RUNNING, 2, 512 << 20, True, 100 << 20, 3 * 10**9, 5 * 10**8)

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield from host_families(HostSample("host-a", 4, MemInfo(16 << 30, 8 << 30), 512 << 20, vms))

    registry = CollectorRegistry()
    registry.register(One())
    s = parse(generate_latest(registry).decode())
    assert value(s, "kvmotion_agent_vms", host="host-a", state="running") == 1
    assert value(s, "kvmotion_agent_vms", host="host-a", state="stopped") == 1
    assert value(s, "kvmotion_agent_vm_cpu_run_seconds_total", host="host-a", vm="web1") == 3.0
    assert value(s, "kvmotion_agent_vm_cpu_ready_seconds_total", host="host-a", vm="web1") == 0.5
    assert value(s, "kvmotion_agent_vm_memory_resident_bytes", host="host-a", vm="web1") == 100 << 20
    assert ("kvmotion_agent_vm_cpu_run_seconds_total", frozenset({("host", "host-a"), ("vm", "db1")})) not in s
    assert value(s, "kvmotion_agent_host_memory_committed_bytes", host="host-a") == 512 << 20


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The agent's app with both routers and one registry, certificates as the TLS listener presents them."""
    monkeypatch.setenv("KVMOTION_CLUSTER_DIR", str(tmp_path / "cluster"))
    config = HostConfig(name="host-a", state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                        portgroups={"vm-net": "br0"}, accel=AccelChoice(Accel.TCG, "test"))
    registry = new_registry()
    services: list[MigrationService] = []
    router = partial(migration_router, listen_ip="127.0.0.1", limit=4, keep=services.append, registry=registry)
    app = secure(agent_app(config, extra_routers=(router,), registry=registry),
                 Security(tls_files=None, audit_log=tmp_path / "audit.log"), "agent host-a")
    ca = TestCA(tmp_path / "ca")
    return (lambda who: TestClient(as_caller(app, ca.creds(who).pem if who else None), base_url="https://agent")), services[0]


def test_agent_metrics_follow_its_vms_and_migrations(agent) -> None:  # type: ignore[no-untyped-def]
    client, svc = agent
    assert client(None).get("/metrics").status_code == 401
    assert client(Identity(Kind.QEMU, "host-a")).get("/metrics").status_code == 403
    assert client(Identity(Kind.HOST, "host-b")).get("/metrics").status_code == 200  # peers read
    viewer = client(VIEWER)
    text = scrape(viewer)
    assert {"kvmotion_agent_vms", "kvmotion_agent_host_memory_total_bytes", "kvmotion_agent_migrations",
            "kvmotion_agent_migration_duration_seconds", "kvmotion_agent_migration_sent_bytes",
            "process_cpu_seconds"} <= families(text)
    before = parse(text)
    assert value(before, "kvmotion_agent_vms", host="host-a", state="stopped") == 0
    assert client(OPERATOR).post("/v1/vms", json={"name": "web1", "memory": 256 << 20, "vcpus": 2}).status_code == 201
    created = parse(scrape(viewer))
    assert value(created, "kvmotion_agent_vms", host="host-a", state="stopped") == 1
    assert value(created, "kvmotion_agent_vm_vcpus", host="host-a", vm="web1") == 2
    assert value(created, "kvmotion_agent_vm_memory_configured_bytes", host="host-a", vm="web1") == 256 << 20
    # The service's records and the destination's ends, as its migrations leave them.
    svc.records.add(_record("c1", Phase.DONE, Progress(round=3, transferred=5000), _summary(2500, 12, 3, 6000, 0.0)))
    svc.destination.ended["destroyed"] += 1
    moved = parse(scrape(viewer))
    assert value(moved, "kvmotion_agent_migrations_total", host="host-a", role="source", result="done") == 1
    assert value(moved, "kvmotion_agent_migrations_total", host="host-a", role="destination", result="destroyed") == 1
    assert value(moved, "kvmotion_agent_migration_duration_seconds_count", host="host-a") == 1
    assert value(moved, "kvmotion_agent_migration_sent_bytes_total", host="host-a") == 6000


# ---- a datastore ------------------------------------------------------------------------------------------------
def test_refusal_lines_parse_back() -> None:
    for reason in WriteRefusal:
        line = refusal_line("write", "web1.img", "host-a", 3, reason, "host-b generation 4")
        assert parse_refusal_line(line + "\n") == ("write", reason)
    assert parse_refusal_line("nbdkit: python[1]: error: something else") is None


def test_datastore_metrics_count_lease_calls_and_fenced_writes(tmp_path: Path) -> None:
    root = tmp_path / "ds1"
    root.mkdir()
    ca = TestCA(tmp_path / "cluster")
    served = ca.creds(Identity(Kind.DATASTORE, "ds1"))
    ds = Datastore("ds1", root, 30.0)
    metrics = DatastoreMetrics(ds)
    app = secure(datastore_app(ds, metrics),
                 Security(tls_files=(served.dir / SERVER_CERT, served.dir / SERVER_KEY, served.dir / CA_CERT),
                          audit_log=None), "datastore ds1")

    def client(who: Identity | None) -> TestClient:
        return TestClient(as_caller(app, ca.creds(who).pem if who else None))

    assert client(None).get("/metrics").status_code == 401
    assert client(Identity(Kind.QEMU, "host-a")).get("/metrics").status_code == 403
    viewer, a, b = client(VIEWER), client(Identity(Kind.HOST, "host-a")), client(Identity(Kind.HOST, "host-b"))
    empty = parse(scrape(viewer))
    assert value(empty, "kvmotion_datastore_disks", datastore="ds1") == 0
    assert value(empty, "kvmotion_datastore_lease_operations_total", datastore="ds1", op="acquire", result="ok") == 0
    assert client(OPERATOR).post("/v1/disks", json={"name": "web1.img", "size": 1 << 20}).status_code == 200
    assert a.post("/v1/disks/web1.img/acquire", json={"vm": "web1"}).status_code == 200
    assert b.post("/v1/disks/web1.img/acquire", json={"vm": "web1"}).status_code == 409  # held by host-a
    assert b.post("/v1/disks/web1.img/transfer", json={"from_host": "host-a", "to_host": "host-c", "vm": "web1"}
                  ).status_code == 403  # only the holder hands it on
    assert a.post("/v1/disks/nope.img/renew").status_code == 404
    moved = a.post("/v1/disks/web1.img/transfer", json={"from_host": "host-a", "to_host": "host-b", "vm": "web1"})
    assert moved.status_code == 200
    metrics.nbd_log_line(refusal_line("write", "web1.img", "host-a", 1, WriteRefusal.STALE, "host-b generation 2") + "\n")
    metrics.nbd_log_line("nbdkit: an unrelated line\n")
    s = parse(scrape(viewer))
    ops = {(op, result): value(s, "kvmotion_datastore_lease_operations_total", datastore="ds1", op=op, result=result)
           for op in ("acquire", "renew", "transfer") for result in ("ok", "refused", "forbidden", "error")}
    assert {k: v for k, v in ops.items() if v} == {("acquire", "ok"): 1, ("acquire", "refused"): 1,
                                                   ("transfer", "forbidden"): 1, ("renew", "error"): 1,
                                                   ("transfer", "ok"): 1}
    assert value(s, "kvmotion_datastore_fencing_refusals_total", datastore="ds1", op="write", reason="stale") == 1
    assert value(s, "kvmotion_datastore_fencing_refusals_total", datastore="ds1", op="write", reason="not_holder") == 0
    assert value(s, "kvmotion_datastore_disks", datastore="ds1") == 1
    assert value(s, "kvmotion_datastore_disk_size_bytes", datastore="ds1", disk="web1.img") == 1 << 20
    assert value(s, "kvmotion_datastore_disk_lease_generation", datastore="ds1", disk="web1.img") == 2
    assert value(s, "kvmotion_datastore_disk_lease", datastore="ds1", disk="web1.img", host="host-b", vm="web1") == 1
    # Expired: no longer a live lease.
    metrics.clock = lambda: time.time() + 60
    assert "kvmotion_datastore_disk_lease" not in {k[0] for k in parse(scrape(viewer))}


# ---- the Grafana dashboard ----------------------------------------------------------------------------------------
DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "kvmotion.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _served(text: str) -> set[str]:
    """Every series name a scrape can carry, samples or not (families are listed even when empty)."""
    return {f.name + suffix for f in text_string_to_metric_families(text) for suffix in SUFFIXES.get(f.type, ("",))}


def test_the_dashboard_uses_only_served_metrics(cluster: Cluster, agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = agent
    root = tmp_path / "ds-dash"
    root.mkdir()
    ds_app = secure(datastore_app(Datastore("ds1", root, 30.0)), Security(tls_files=None, audit_log=None, insecure=True),
                    "datastore ds1")
    served = (_served(scrape(cluster.client(VIEWER))) | _served(scrape(client(VIEWER)))
              | _served(scrape(TestClient(ds_app))))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 20 and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "targets" in p)
    used = {m for e in exprs for m in re.findall(r"\bkvmotion_[a-z_]+", e)}
    assert used and used <= served, sorted(used - served)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
