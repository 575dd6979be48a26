"""Rules, maintenance and DRS plans on hand-made clusters: the reasons they give and the edge cases."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmotion.api.center import Candidate, Placement, PowerState
from kvmotion.api.operations import Automation
from kvmotion.api.operations import DrsConfig as DrsSettings
from kvmotion.center.cluster import (
    GIB,
    Estimate,
    Health,
    Host,
    Move,
    MoveKind,
    Rule,
    RuleKind,
    Snapshot,
    Vm,
    apply,
    collapse,
    default_cost,
    imbalance,
    overcommitted,
    sequence,
)
from kvmotion.center.drs import DrsConfig, initial_host, recommend
from kvmotion.center.maintenance import plan_evacuation, plan_move_back
from kvmotion.center.placement import Status
from kvmotion.center.rules import violations
from kvmotion.core.errors import InsufficientResources, InvalidInput, NotFound

ON, OFF = PowerState.ON, PowerState.OFF


def host(name: str, state: Status = Status.CONNECTED, cpus: float = 4, memory: int = 8 * GIB) -> Host:
    return Host(name, state, cpus=cpus, memory=memory)


def vm(name: str, at: str, memory: int = GIB, demand: float = 0.0, **kw: object) -> Vm:
    return Vm(name, at, memory=memory, vcpus=2, cpu_demand=demand, **kw)  # type: ignore[arg-type]


def test_violations_are_sentences() -> None:
    s = Snapshot(
        hosts=(host("a"), host("b"), host("c")),
        vms=(vm("web1", "a"), vm("cache1", "b"), vm("db1", "c"), vm("db2", "c"), vm("db3", "c", power=OFF)),
        rules=(Rule("web", RuleKind.KEEP_TOGETHER, ("web1", "cache1")),
               Rule("dbs", RuleKind.KEEP_APART, ("db1", "db2", "db3"), must=False),
               Rule("pin", RuleKind.VM_HOST, ("web1", "db1"), ("a", "b"))))
    assert [v.sentence for v in violations(s)] == [
        "keep-together rule web (must): its VMs run apart (web1 on a, cache1 on b)",
        "keep-apart rule dbs (should): db1 and db2 share c",  # db3 is off: it shares nothing
        "vm-host rule pin (must): db1 runs on c, not on a or b",
    ]
    with pytest.raises(InvalidInput, match="rule x: a keep-apart rule needs two VMs or more and no host"):
        Rule("x", RuleKind.KEEP_APART, ("db1",))
    with pytest.raises(InvalidInput, match="rule x names nope, not in the snapshot"):
        Snapshot(hosts=(host("a"),), vms=(), rules=(Rule("x", RuleKind.VM_HOST, ("nope",), ("a",)),))
    with pytest.raises(InvalidInput, match="VM v is on z, which is not in the snapshot"):
        Snapshot(hosts=(host("a"),), vms=(vm("v", "z"),))


def test_evacuation_biggest_first_onto_the_least_loaded_host() -> None:
    s = Snapshot(
        hosts=(host("a"), host("b"), host("c"), host("m", Status.MAINTENANCE), host("q", Status.QUARANTINE)),
        vms=(vm("small", "a", GIB), vm("big", "a", 4 * GIB, demand=1.0), vm("mid", "a", 2 * GIB),
             vm("off", "a", 2 * GIB, power=OFF), vm("busy", "b", 2 * GIB, demand=2.0)))
    plan = plan_evacuation(s, "a")
    assert [(m.vm, m.destination, m.kind) for m in plan.moves] == [
        ("big", "c", MoveKind.EVACUATE), ("mid", "b", MoveKind.EVACUATE), ("small", "c", MoveKind.EVACUATE),
        ("off", "c", MoveKind.REHOME)]
    assert plan.moves[0].why == "a enters maintenance: c is the least loaded of 2 host(s) that can take it, at 38% load after"
    assert plan.moves[3].why == ("a enters maintenance: powered off, its home moves to c (3.0 GiB free, enough to start it "
                                 "there), no migration")
    assert plan.moves[3].estimate.seconds == 0 and plan.moves[0].estimate.seconds > 0
    assert plan.stuck == () and plan.complete
    assert plan.seconds == sum(m.estimate.seconds for m in plan.moves)
    back = plan_move_back(apply(s, plan.moves), "a", [m.vm for m in plan.moves])
    assert sorted((m.vm, m.kind) for m in back.moves) == [
        ("big", MoveKind.MOVE_BACK), ("mid", MoveKind.MOVE_BACK), ("off", MoveKind.REHOME), ("small", MoveKind.MOVE_BACK)]
    with pytest.raises(NotFound, match="no host named x in the cluster"):
        plan_evacuation(s, "x")


def test_what_cannot_leave_is_listed_with_why() -> None:
    s = Snapshot(
        hosts=(host("a"), host("b", memory=3 * GIB), host("q", Status.QUARANTINE)),
        vms=(vm("local", "a", local_disk=True), vm("pinned", "a"), vm("huge", "a", 4 * GIB),
             vm("t1", "a"), vm("t2", "a"), vm("filler", "b", GIB)),
        rules=(Rule("pin", RuleKind.VM_HOST, ("pinned",), ("a",)),
               Rule("pair", RuleKind.KEEP_TOGETHER, ("t1", "t2"))))
    plan = plan_evacuation(s, "a")
    why = {x.vm: x.why for x in plan.stuck}
    assert why == {
        "local": "local cannot leave a: local has a disk on it, and a migration needs every disk on a datastore",
        "pinned": "pinned cannot leave a: b has 0 MiB free, pinned needs 1.0 GiB; vm-host rule pin (must): pinned "
                  "may run only on a; q is quarantined (a health fault)",
        "huge": "huge cannot leave a: b has 2.0 GiB free, huge needs 4.0 GiB; q is quarantined (a health fault)",
    }
    # The keep-together pair goes as one unit, to the one host that can take both.
    assert [(m.vm, m.destination) for m in plan.moves] == [("t1", "b"), ("t2", "b")]
    assert plan.notes == ("a stays entering maintenance while 3 VM(s) or group(s) cannot leave it",)
    # Move back: what no longer fits says so.
    after = apply(s, plan.moves)
    crowded = Snapshot(hosts=after.hosts, vms=(*after.vms, vm("newcomer", "a", 4 * GIB)), rules=after.rules)
    back = plan_move_back(crowded, "a", ["t1", "t2", "gone"])
    assert back.moves == ()
    assert back.stuck[0].why == "t1 and t2 stay(s) on b: a has 0 MiB free, t1 and t2 need 2.0 GiB"


def test_a_should_rule_gives_way_only_when_nothing_else_fits() -> None:
    s = Snapshot(hosts=(host("a"), host("b")), vms=(vm("x", "a"), vm("y", "b")),
                 rules=(Rule("apart", RuleKind.KEEP_APART, ("x", "y"), must=False),))
    plan = plan_evacuation(s, "a")
    assert [(m.vm, m.destination) for m in plan.moves] == [("x", "b")]
    assert plan.notes == ("x to b breaks a should rule (keep-apart rule apart (should): y would share b with x): "
                          "no host kept it",)
    must = Snapshot(hosts=s.hosts, vms=s.vms, rules=(Rule("apart", RuleKind.KEEP_APART, ("x", "y")),))
    assert plan_evacuation(must, "a").moves == ()


def test_drs_on_an_empty_cluster_one_host_and_nothing_that_fits() -> None:
    assert recommend(Snapshot(hosts=(), vms=())).moves == ()
    one = Snapshot(hosts=(host("a"),), vms=(vm("v", "a", demand=4.0),))
    assert recommend(one, DrsConfig(threshold=5)).moves == () and imbalance(one) == 0.0
    full = Snapshot(hosts=(host("a"), host("b", memory=GIB)),
                    vms=(vm("v", "a", 2 * GIB, demand=4.0), vm("w", "b", GIB)))
    assert recommend(full, DrsConfig(threshold=5)).moves == ()


def test_drs_balances_with_a_reason_and_hysteresis() -> None:
    hot = tuple(vm(f"v{i}", "a", GIB, demand=1.0) for i in range(4))
    s = Snapshot(hosts=(host("a"), host("b")), vms=hot, now=1000.0)
    assert recommend(s, DrsConfig(threshold=1)).moves == ()  # level 1: mandatory moves only
    plan = recommend(s, DrsConfig(threshold=3))
    assert [(m.vm, m.destination, m.kind) for m in plan.moves] == [("v0", "b", MoveKind.BALANCE),
                                                                   ("v1", "b", MoveKind.BALANCE)]
    first = plan.moves[0]
    assert first.why == ("a is at 75% load against a mean of 38%: moving v0 (1.0 cores, 1.0 GiB) to b (at 0%) cuts "
                         "the imbalance from 0.375 to 0.188, worth 380 against 0 for a 10 s migration")
    spread = 2 * (0.375**2 - 0.1875**2)  # 2 hosts x the drop in the variance of their load
    assert first.gain == pytest.approx(spread) and first.benefit == pytest.approx(spread * 1800)
    assert first.cost == pytest.approx(0.02 * first.estimate.seconds)
    assert plan.imbalance_after == 0.0 < plan.imbalance_before
    # Moved a minute ago: not moved again (hysteresis); long ago: it may be.
    recent = Snapshot(hosts=s.hosts, vms=tuple(Vm(**{**v.__dict__, "moved_at": 940.0}) for v in hot), now=1000.0)
    assert recommend(recent, DrsConfig(threshold=3)).moves == ()
    old = Snapshot(hosts=s.hosts, vms=recent.vms, now=1000.0, recent=30.0)
    assert len(recommend(old, DrsConfig(threshold=3)).moves) == 2
    # A gain below the minimum or not worth its migration is no move.
    assert recommend(s, DrsConfig(threshold=3, min_gain=0.5)).moves == ()
    assert recommend(s, DrsConfig(threshold=3, migration_cost=100.0)).moves == ()
    assert len(recommend(s, DrsConfig(threshold=3, max_moves=1)).moves) == 1


def test_drs_mandatory_moves_come_first_and_quarantine_overloads_no_one() -> None:
    s = Snapshot(
        hosts=(host("a"), host("b", cpus=2), Host("q", Status.QUARANTINE, cpus=4, memory=8 * GIB,
                                                 health=Health.MODERATE)),
        vms=(vm("db1", "a"), vm("db2", "a"), vm("sick1", "q", demand=1.0), vm("sick2", "q", demand=3.5)),
        rules=(Rule("dbs", RuleKind.KEEP_APART, ("db1", "db2")),))
    plan = recommend(s, DrsConfig(threshold=1))
    kinds = [(m.vm, m.destination, m.kind) for m in plan.moves]
    assert kinds[0] == ("db2", "b", MoveKind.RULE)
    assert plan.moves[0].why.startswith("keep-apart rule dbs (must): db1 and db2 share a: b is the least loaded")
    assert ("sick1", "a", MoveKind.QUARANTINE) in kinds
    # sick2 (3.5 cores) would put a (with sick1) at 112 % and b at 175 % CPU: it stays, and the plan says why.
    assert [x.vm for x in plan.stuck] == ["sick2"]
    assert "a would run at 112% CPU, over the 80% allowed" in plan.stuck[0].why
    assert recommend(apply(s, plan.moves), DrsConfig(threshold=1)).moves == ()


def test_config_and_cost() -> None:
    with pytest.raises(InvalidInput, match="invalid DRS threshold 6: use 1 to 5"):
        DrsConfig(threshold=6)
    assert DrsSettings().automation is Automation.PARTIAL and Automation("full") is Automation.FULL
    a, b = host("a"), host("b")
    idle = default_cost(vm("v", "a", 4 * GIB), a, b, 125e6)
    busy = default_cost(vm("v", "a", 4 * GIB, dirty_rate=60e6), a, b, 125e6)
    assert idle.bytes == 4 * GIB and idle.downtime == pytest.approx(0.02)
    assert busy.seconds > idle.seconds and busy.bytes > idle.bytes
    assert default_cost(vm("v", "a", power=OFF), a, b, 125e6).seconds == 0


PLACED = Placement(chosen="b", candidates=(
    Candidate(host="a", score=0.75), Candidate(host="b", score=0.5),
    Candidate(host="c", reasons=("c is in maintenance",)),
))


@pytest.mark.parametrize("level", [Automation.PARTIAL, Automation.FULL])
def test_partial_and_full_automation_place_a_new_vm(level: Automation) -> None:
    assert initial_host(level, "web1", PLACED) == "b"


def test_manual_automation_refuses_to_place_and_says_where_and_how_to_go_on() -> None:
    with pytest.raises(InvalidInput) as refused:
        initial_host(Automation.MANUAL, "web1", PLACED)
    message = str(refused.value)
    assert message == ("DRS automation is manual: the center recommends b for VM web1 (the least loaded host that "
                       "can take it, score 0.500; a scores 0.750; c is in maintenance) but places nothing itself; "
                       "create it with --host b, or let DRS place new VMs: `kvmotion drs config --automation partial`")


@pytest.mark.parametrize("level", list(Automation))
def test_no_host_to_recommend_is_the_same_refusal_at_every_level(level: Automation) -> None:
    full = Placement(chosen=None, candidates=(Candidate(host="a", reasons=("a has 0 MiB free, the VM needs 1024 MiB",)),))
    with pytest.raises(InsufficientResources, match=r"^cannot place VM web1: no host can take it: a has 0 MiB free"):
        initial_host(level, "web1", full)


def test_drs_keep_apart_moves_the_vms_that_can_leave_so_planning_again_moves_nothing() -> None:
    # db (a local disk) cannot leave b. Keeping web together brings web3 to b, and web2 must then leave db:
    # the whole web group goes to a (web3 stays where it was), not db, which would be stuck.
    s = Snapshot(hosts=(host("a"), host("b")),
                 vms=(vm("db", "b", 2 * GIB, local_disk=True), vm("web1", "b"), vm("web2", "b"), vm("web3", "a")),
                 rules=(Rule("web", RuleKind.KEEP_TOGETHER, ("web1", "web2", "web3"), must=False),
                        Rule("apart", RuleKind.KEEP_APART, ("db", "web2"), must=False)))
    plan = recommend(s, DrsConfig(threshold=1))
    assert sorted((m.vm, m.source, m.destination) for m in plan.moves) == [("web1", "b", "a"), ("web2", "b", "a")]
    assert plan.stuck == () and violations(apply(s, plan.moves)) == []
    assert recommend(apply(s, plan.moves), DrsConfig(threshold=1)).moves == ()
    # A VM leaving quarantine lands beside db (breaking the should rule: b would pass the CPU limit); the
    # rule is then mended in the same plan by moving sick on, not by trying to move db.
    q = Snapshot(hosts=(host("a"), host("b", cpus=2), Host("q", Status.QUARANTINE, cpus=4, memory=8 * GIB,
                                                           health=Health.MODERATE)),
                 vms=(vm("db", "a", 2 * GIB, local_disk=True), vm("busy", "b", demand=1.0), vm("sick", "q", demand=1.0)),
                 rules=(Rule("apart", RuleKind.KEEP_APART, ("db", "sick"), must=False),))
    plan = recommend(q, DrsConfig(threshold=1))
    assert [(m.vm, m.destination, m.kind) for m in plan.moves] == [("sick", "b", MoveKind.RULE)]
    assert plan.stuck == () and plan.notes == () and violations(apply(q, plan.moves)) == []
    assert recommend(apply(q, plan.moves), DrsConfig(threshold=1)).moves == ()


def test_a_swap_through_a_third_host_keeps_its_hop_rather_than_deadlock() -> None:
    # x must go A -> B and y B -> A, both hosts full: no order of two direct moves fits, the hop via C does.
    s = Snapshot(hosts=(host("A", memory=2 * GIB), host("B", memory=2 * GIB), host("C", memory=2 * GIB)),
                 vms=(vm("x", "A", memory=2 * GIB), vm("y", "B", memory=2 * GIB)), rules=())
    est = Estimate(1.0, 0.01, 1)
    planned = [Move("x", "A", "C", MoveKind.RULE, "x: hop", est), Move("y", "B", "A", MoveKind.RULE, "y: over", est),
               Move("x", "C", "B", MoveKind.RULE, "x: on", est)]
    direct = [replace(planned[2], source="A"), planned[1]]
    assert sequence(s, direct) is None  # each waits for the other
    moves = collapse(s, planned, default_cost)
    assert [(m.vm, m.source, m.destination) for m in moves] == [("x", "A", "C"), ("y", "B", "A"), ("x", "C", "B")]
    step = s
    for m in moves:
        step = apply(step, [m])
        assert not overcommitted(step)
    # A chain that does fit collapses to one move per VM.
    roomy = replace(s, hosts=(host("A", memory=2 * GIB), host("B", memory=4 * GIB), host("C", memory=2 * GIB)))
    assert [(m.vm, m.source, m.destination) for m in collapse(roomy, planned, default_cost)] == [
        ("x", "A", "B"), ("y", "B", "A")]
