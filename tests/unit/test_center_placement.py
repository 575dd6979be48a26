"""Placement and migration admission: pure decisions over snapshots."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.api.center import ClusterSettings, HostFacts, HostLoad, HostMode, HostState
from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec
from kvmotion.center.admission import Move, admit, host_budget
from kvmotion.center.placement import HostSnapshot, place, summary

GIB = 1 << 30
FACTS = HostFacts(accel="tcg", cpu_models=("qemu64", "Haswell-v4"), portgroups=("vm-net",), datastores=("ds1",))
SPEC = VmSpec(name="web1", memory=GIB, vcpus=2, disks=(DiskSpec(datastore="ds1", source="web1.img"),),
              nics=(NicSpec(mac="52:54:00:12:34:56", portgroup="vm-net"),))


def host(name: str, free: int = 8 * GIB, state: HostState = HostState.CONNECTED, facts: HostFacts | None = FACTS,
         demand: float | None = 0.0, mode: HostMode = HostMode.NORMAL, quarantined: bool = False) -> HostSnapshot:
    return HostSnapshot(name=name, state=state, load=HostLoad(cpus=8, memory_total=16 * GIB, memory_available=free),
                        facts=facts, cpu_demand=demand, mode=mode, quarantined=quarantined)


def test_the_least_loaded_host_is_chosen_and_every_host_has_its_reasons() -> None:
    hosts = [
        host("host-a"),  # the source
        host("host-b", free=4 * GIB),
        host("host-c", free=12 * GIB),
        host("host-d", mode=HostMode.MAINTENANCE, free=15 * GIB),
        host("host-g", quarantined=True, free=15 * GIB),
        host("host-e", free=GIB // 2, facts=FACTS.model_copy(update={"portgroups": (), "datastores": ()})),
        host("host-f", facts=None),
    ]
    p = place(SPEC, hosts, source="host-a")
    assert p.chosen == "host-c"
    by = {c.host: c for c in p.candidates}
    assert by["host-a"].reasons == ("VM web1 is already on host-a",)
    assert by["host-b"].eligible and by["host-c"].eligible
    assert by["host-c"].score is not None and by["host-b"].score is not None and by["host-c"].score < by["host-b"].score
    assert by["host-d"].reasons == ("host-d is in maintenance",)
    assert by["host-g"].eligible and by["host-g"].score > 100  # quarantined: only if no other host can
    alone = place(SPEC, [host("host-a"), host("host-g", quarantined=True)], source="host-a")
    assert alone.chosen == "host-g"
    assert by["host-e"].reasons == ("host-e has 512 MiB free, the VM needs 1024 MiB", "host-e lacks port group vm-net",
                                    "host-e does not reach datastore ds1")
    assert by["host-f"].reasons == ("host-f's CPU models, port groups and datastores are not known yet",)
    assert summary(p) == "placed on host-c"


def test_cpu_demand_and_reserved_memory_count() -> None:
    busy = host("host-b", demand=7.0)
    idle = host("host-c", demand=0.0)
    assert place(SPEC, [busy, idle]).chosen == "host-c"
    reserved = HostSnapshot(**{**idle.__dict__, "reserved_memory": 7 * GIB + GIB // 2})
    p = place(SPEC, [busy, reserved])
    assert p.chosen == "host-b"
    assert "host-c has 512 MiB free, the VM needs 1024 MiB" in dict((c.host, c.reasons) for c in p.candidates)["host-c"]


def test_cpu_demand_counts_against_the_reported_capacity() -> None:
    # Same demand, same memory: the host whose cgroup allows fewer cores is the busier one.
    small = HostSnapshot(**{**host("host-b", demand=1.0).__dict__,
                            "load": HostLoad(cpus=8, cpu_capacity=1.5, memory_total=16 * GIB, memory_available=8 * GIB)})
    big = host("host-c", demand=1.0)
    assert place(SPEC, [small, big]).chosen == "host-c"


def test_cpu_model_baseline_and_local_disks() -> None:
    local = SPEC.replace(cpu_model="Skylake-Server", disks=(DiskSpec(source="web1.img"),))
    p = place(local, [host("host-a"), host("host-b")], source="host-a", baseline="Cascadelake-Server")
    assert p.chosen is None
    assert dict((c.host, c.reasons) for c in p.candidates)["host-b"] == (
        "host-b cannot run CPU model Skylake-Server (the VM's CPU model)",
        "host-b cannot run CPU model Cascadelake-Server (the cluster's CPU baseline)",
        "disk web1.img is local to host-a: a migration needs every disk on a datastore")
    assert summary(p) == ("no host can take it: VM web1 is already on host-a; host-b cannot run CPU model "
                          "Skylake-Server (the VM's CPU model); host-b cannot run CPU model Cascadelake-Server (the "
                          "cluster's CPU baseline); disk web1.img is local to host-a: a migration needs every disk on "
                          "a datastore")
    assert summary(place(SPEC, [])) == "no host has joined the cluster"
    # Creating a VM with a local disk is fine: it is made on the chosen host.
    assert place(local.replace(cpu_model="qemu64"), [host("host-b")]).chosen == "host-b"


def test_budgets_follow_the_link_speed() -> None:
    s = ClusterSettings()
    assert host_budget(None, s) == 4 and host_budget(9_999_999_999, s) == 4 and host_budget(10**10, s) == 8
    assert host_budget(None, ClusterSettings(link_bps=25 * 10**9)) == 8
    assert host_budget(10**9, ClusterSettings(migration_budget_slow=2)) == 2


def test_admission_budget_fifo_and_cluster_limit() -> None:
    budgets = {"a": 2, "b": 2, "c": 2, "d": 2}
    running = [Move("r1", "a", "b")]
    queued = [Move("q1", "a", "c"), Move("q2", "a", "d"), Move("q3", "c", "d"), Move("q4", "b", "d"),
              Move("q5", "c", "x")]
    got = {d.task: (d.admitted, d.reason) for d in admit(queued, running, budgets, cluster_limit=10)}
    assert got["q1"] == (True, "")
    assert got["q2"] == (False, "a runs 2 of 2 migrations")
    assert got["q3"] == (False, "an older migration waits for d")  # q2 holds d: no overtaking on a shared host
    assert got["q4"] == (False, "an older migration waits for d")
    assert got["q5"] == (False, "an older migration waits for c")
    alone = admit([Move("q1", "c", "x")], [], budgets, cluster_limit=10)
    assert alone[0].reason == "x takes no migrations now (not connected)"
    limited = admit([Move("q1", "c", "d"), Move("q2", "a", "b")], running, budgets, cluster_limit=2)
    assert [(d.task, d.admitted) for d in limited] == [("q1", True), ("q2", False)]
    assert limited[1].reason == "the cluster runs 2 of 2 migrations"


HOSTS = st.sampled_from(["h0", "h1", "h2", "h3", "h4"])
MOVES = st.lists(st.tuples(HOSTS, HOSTS).filter(lambda t: t[0] != t[1]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(running=MOVES, queued=MOVES, budgets=st.dictionaries(HOSTS, st.integers(0, 8)), limit=st.integers(1, 50))
def test_admission_never_exceeds_a_budget_or_the_cluster_limit(running, queued, budgets, limit) -> None:
    run = [Move(f"r{i}", s, d) for i, (s, d) in enumerate(running)]
    que = [Move(f"q{i}", s, d) for i, (s, d) in enumerate(queued)]
    decisions = admit(que, run, budgets, limit)
    assert [d.task for d in decisions] == [m.task for m in que]
    admitted = [m for m, d in zip(que, decisions, strict=True) if d.admitted]
    used: dict[str, int] = {}
    for m in run:
        used[m.source] = used.get(m.source, 0) + 1
        used[m.destination] = used.get(m.destination, 0) + 1
    added: dict[str, int] = {}
    for m in admitted:
        for h in (m.source, m.destination):
            added[h] = added.get(h, 0) + 1
    for h, n in added.items():
        assert used.get(h, 0) + n <= budgets.get(h, 0)
    assert len(admitted) == 0 or len(run) + len(admitted) <= limit
    # FIFO: an admitted migration never overtakes a waiting older one on a shared host.
    for i, (m, d) in enumerate(zip(que, decisions, strict=True)):
        if d.admitted:
            for older, od in zip(que[:i], decisions[:i], strict=True):
                if not od.admitted:
                    assert not {older.source, older.destination} & {m.source, m.destination}
