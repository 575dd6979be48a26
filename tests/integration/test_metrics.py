"""Prometheus' view of a lab: /metrics of the center, both agents and ds1 scraped (as the lab's
admin, over mutual TLS) before, during and after one migration through the center, and the
counters and histograms move as the migration does.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmotion.api import userconfig
from kvmotion.lab.cluster import DATASTORE, cluster_env
from tests.integration.lab_fixture import MigrationLab, lab_factory, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
VM, DISK = "m1", "m1.img"


@pytest.fixture(scope="module")
def mlab():
    factory = lab_factory()
    make = next(factory)
    try:
        yield make(hosts=2)
    finally:
        factory.close()  # tears the lab down


class Scraper:
    """GET /metrics of every listener of the lab, with the admin's certificate."""

    def __init__(self, lab: MigrationLab) -> None:
        cluster = lab.cluster
        verify: object = True
        if cluster.encrypted:
            with cluster_env(cluster):
                verify = userconfig.user_ssl_context()
        self.http = httpx.Client(verify=verify, timeout=10)  # type: ignore[arg-type]
        datastores = self.http.get(f"{cluster.center_url}/v1/datastores").json()
        self.urls = {"center": cluster.center_url, **{h.name: cluster.agent_url(h.name) for h in lab.topo.hosts},
                     DATASTORE: next(d["control_url"] for d in datastores if d["name"] == DATASTORE)}

    def __call__(self, what: str) -> Samples:
        r = self.http.get(f"{self.urls[what].rstrip('/')}/metrics")
        assert r.status_code == 200, (what, r.status_code, r.text[:300])
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    def all(self) -> dict[str, Samples]:
        return {what: self(what) for what in self.urls}

    def close(self) -> None:
        self.http.close()


def v(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_with_a_migration(mlab: MigrationLab, record_property) -> None:
    lab = mlab
    scrape = Scraper(lab)
    try:
        anonymous = httpx.get(f"{scrape.urls['center']}/metrics", verify=False, timeout=10)
        assert anonymous.status_code == (401 if lab.cluster.encrypted else 200)
        lab.cli_ok("disk", "create", f"{DATASTORE}/{DISK}", "64M")
        lab.create_vm(VM, "host-a", k=1, workload="echo,mem", mem_wss="64M", mem_rate="10M",
                      disks=(f"{DATASTORE}/{DISK}",))
        wait_until("the center sees m1 running on host-a", lambda: v(scrape("center"), "kvmotion_center_vm_memory_bytes",
                                                                      host="host-a", vm=VM) > 0, 60)
        before = scrape.all()
        c, a, b, ds = before["center"], before["host-a"], before["host-b"], before[DATASTORE]
        for host in ("host-a", "host-b"):
            assert 0 <= v(c, "kvmotion_center_host_heartbeat_age_seconds", host=host) < 6, c
        assert v(c, "kvmotion_center_hosts", state="connected") == 2
        assert v(a, "kvmotion_agent_vms", host="host-a", state="running") == 1
        assert v(a, "kvmotion_agent_vm_cpu_run_seconds_total", host="host-a", vm=VM) > 0
        assert v(a, "kvmotion_agent_vm_memory_resident_bytes", host="host-a", vm=VM) > 0
        assert v(ds, "kvmotion_datastore_lease_operations_total", datastore=DATASTORE, op="acquire", result="ok") >= 1
        assert v(ds, "kvmotion_datastore_disk_lease", datastore=DATASTORE, disk=DISK, host="host-a", vm=VM) == 1
        generation = v(ds, "kvmotion_datastore_disk_lease_generation", datastore=DATASTORE, disk=DISK)

        started = json.loads(lab.cli_ok("migrate", VM, "--to", "host-b", "--bandwidth", "24M", "--no-wait",
                                        "--json").stdout)
        task_id = started["task"]["id"]
        lab.wait_precopy("host-a", VM, min_bytes=2 << 20)
        during = scrape.all()
        a1, b1, c1 = during["host-a"], during["host-b"], during["center"]
        assert v(a1, "kvmotion_agent_migrations_active", host="host-a", role="source") == 1
        assert v(a1, "kvmotion_agent_migration_sent_bytes_total", host="host-a") >= 2 << 20
        running = {"host": "host-a", "vm": VM, "destination": "host-b"}
        assert sum(val for (name, labels), val in a1.items() if name == "kvmotion_agent_migration_phase"
                   and dict(labels).items() >= running.items()) == 1, a1
        assert v(b1, "kvmotion_agent_migrations_active", host="host-b", role="destination") == 1
        assert v(b1, "kvmotion_agent_vms", host="host-b", state="incoming") == 1
        assert v(c1, "kvmotion_center_tasks", kind="migrate", state="running") == 1

        task = wait_until("the migration's task ends", lambda: (t := lab.cli_json("task", "show", task_id))
                          and t["state"] not in ("queued", "running") and t, 180)  # type: ignore[index]
        assert task["state"] == "done", task
        wait_until("host-b's heartbeat reports m1 running",
                   lambda: v(scrape("center"), "kvmotion_center_vm_memory_bytes", host="host-b", vm=VM) > 0, 60)
        after = scrape.all()
        a2, b2, c2, ds2 = after["host-a"], after["host-b"], after["center"], after[DATASTORE]
        # The source: one more done, its histograms one more observation, bytes and rounds grown.
        for name, labels in (("kvmotion_agent_migrations_total", {"role": "source", "result": "done"}),
                             ("kvmotion_agent_migration_duration_seconds_count", {}),
                             ("kvmotion_agent_migration_pause_seconds_count", {}),
                             ("kvmotion_agent_migration_precopy_rounds_count", {})):
            assert v(a2, name, host="host-a", **labels) == v(a, name, host="host-a", **labels) + 1, name
        assert v(a2, "kvmotion_agent_migration_duration_seconds_sum", host="host-a") > 0
        assert v(a2, "kvmotion_agent_migration_sent_bytes_total", host="host-a") >= \
            v(a1, "kvmotion_agent_migration_sent_bytes_total", host="host-a") > 0
        assert v(a2, "kvmotion_agent_migration_rounds_total", host="host-a") >= 1
        assert v(a2, "kvmotion_agent_migrations_active", host="host-a", role="source") == 0
        assert v(a2, "kvmotion_agent_vms", host="host-a", state="running") == 0
        # The destination: committed, the VM runs there.
        assert v(b2, "kvmotion_agent_migrations_total", host="host-b", role="destination", result="committed") == \
            v(b, "kvmotion_agent_migrations_total", host="host-b", role="destination", result="committed") + 1
        assert v(b2, "kvmotion_agent_vms", host="host-b", state="running") == 1
        # The center: the task ended done, its histograms one more observation, the queue empty.
        assert v(c2, "kvmotion_center_tasks_ended_total", kind="migrate", result="done") == \
            v(c, "kvmotion_center_tasks_ended_total", kind="migrate", result="done") + 1
        assert v(c2, "kvmotion_center_migration_duration_seconds_count") == \
            v(c, "kvmotion_center_migration_duration_seconds_count") + 1
        assert v(c2, "kvmotion_center_migration_downtime_seconds_count") == \
            v(c, "kvmotion_center_migration_downtime_seconds_count") + 1
        assert v(c2, "kvmotion_center_tasks", kind="migrate", state="running") == 0
        for host in ("host-a", "host-b"):
            assert 0 <= v(c2, "kvmotion_center_host_heartbeat_age_seconds", host=host) < 6, c2
        # ds1: the lease moved to host-b under a new generation; lease calls were counted.
        assert v(ds2, "kvmotion_datastore_lease_operations_total", datastore=DATASTORE, op="transfer", result="ok") >= \
            v(ds, "kvmotion_datastore_lease_operations_total", datastore=DATASTORE, op="transfer", result="ok") + 1
        assert sum(val for (name, _), val in ds2.items() if name == "kvmotion_datastore_lease_operations_total") > \
            sum(val for (name, _), val in ds.items() if name == "kvmotion_datastore_lease_operations_total")
        assert v(ds2, "kvmotion_datastore_disk_lease", datastore=DATASTORE, disk=DISK, host="host-b", vm=VM) == 1
        assert v(ds2, "kvmotion_datastore_disk_lease_generation", datastore=DATASTORE, disk=DISK) > generation
        for key, name, where in (("sent_bytes", "kvmotion_agent_migration_sent_bytes_total", a2),
                                 ("duration_s", "kvmotion_agent_migration_duration_seconds_sum", a2),
                                 ("downtime_s", "kvmotion_agent_migration_downtime_seconds_sum", a2),
                                 ("pause_s", "kvmotion_agent_migration_pause_seconds_sum", a2)):
            record_property(key, round(v(where, name, host="host-a"), 3))
        lab.cli_ok("vm", "stop", VM, timeout=90)
    finally:
        scrape.close()
