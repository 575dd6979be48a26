"""The planners over hundreds of generated clusters: what must hold for every plan."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.center.cluster import Move, MoveKind, Plan, Snapshot, apply, imbalance, overcommitted, sequence
from kvmotion.center.drs import DrsConfig, recommend
from kvmotion.center.maintenance import plan_evacuation, plan_move_back
from kvmotion.center.rules import violations
from tests.unit.clusters import snapshots

EXAMPLES = settings(max_examples=300, deadline=None)


def must_broken(s: Snapshot) -> set[str]:
    return {v.rule for v in violations(s) if v.must}


def check_plan(s: Snapshot, plan: Plan) -> Snapshot:
    """What every plan keeps to; returns the snapshot after it."""
    where = {v.name: v.host for v in s.vms}
    for m in plan.moves:  # a VM moves at most once, unless through a hop (cluster.collapse): from where it is
        assert where[m.vm] == m.source, f"{m.vm} leaves {m.source} but is on {where[m.vm]}"
        where[m.vm] = m.destination
        assert s.host[m.destination].accepts, f"{m.vm} sent to {m.destination}, {s.host[m.destination].state}"
        assert m.why
        assert (m.kind is MoveKind.REHOME) == (not s.vm[m.vm].on)
        assert not s.vm[m.vm].local_disk
    first: dict[str, Move] = {}
    last: dict[str, Move] = {}
    for m in plan.moves:
        first.setdefault(m.vm, m)
        last[m.vm] = m
    if len(first) < len(plan.moves):  # hops kept only where one move per VM has no order that fits
        direct = [replace(last[v], source=first[v].source) for v in first if first[v].source != last[v].destination]
        assert sequence(s, direct) is None, "a VM moved twice where one move would do"
    step = s
    for m in plan.moves:  # run one after the other, no host is ever short of memory
        step = apply(step, [m])
        assert not overcommitted(step), f"{m.vm} to {m.destination} before room was made there"
    after = apply(s, plan.moves)
    assert must_broken(after) <= must_broken(s), "a plan broke a must rule"
    return after


@EXAMPLES
@given(s=snapshots(), threshold=st.integers(1, 5))
def test_drs_keeps_memory_rules_and_host_states_and_is_idempotent(s: Snapshot, threshold: int) -> None:
    config = DrsConfig(threshold=threshold)
    plan = recommend(s, config)
    after = check_plan(s, plan)
    assert abs(plan.imbalance_after - imbalance(after)) < 1e-9
    again = recommend(after, config)
    assert again.moves == (), f"planning again moved {[m.vm for m in again.moves]}"
    for m in plan.moves:
        if m.kind is MoveKind.BALANCE:
            assert m.gain >= config.min_gain and m.benefit > m.cost


@EXAMPLES
@given(s=snapshots(), threshold=st.integers(2, 5))
def test_drs_balancing_never_raises_the_imbalance(s: Snapshot, threshold: int) -> None:
    # Mandatory moves may raise it (a quarantined host's VMs land somewhere); balance moves never do.
    mandatory = recommend(s, DrsConfig(threshold=1))
    start = apply(s, mandatory.moves)
    plan = recommend(start, DrsConfig(threshold=threshold))
    if all(m.kind is MoveKind.BALANCE for m in plan.moves):
        # (else balancing made room for a mandatory move that failed before, which may add load)
        assert plan.imbalance_after <= imbalance(start) + 1e-12
        if plan.moves:
            assert plan.imbalance_after < imbalance(start)


@EXAMPLES
@given(s=snapshots(), data=st.data())
def test_evacuation_empties_the_host_but_for_what_it_lists(s: Snapshot, data: st.DataObject) -> None:
    host = data.draw(st.sampled_from([h.name for h in s.hosts]))
    plan = plan_evacuation(s, host)
    after = check_plan(s, plan)
    stuck = {v for x in plan.stuck for v in x.vms}
    assert {v.name for v in after.vms if v.host == host} == stuck  # every VM left is listed
    assert all(m.source == host for m in plan.moves)
    again = plan_evacuation(after, host)
    assert again.moves == () and {v for x in again.stuck for v in x.vms} == stuck
    # Back again: every move of the move-back plan returns a VM to `host`, and the result keeps the rules.
    back = plan_move_back(after, host, [m.vm for m in plan.moves])
    assert all(m.destination == host for m in back.moves)
    if s.host[host].accepts:
        home = check_plan(after, back)
        assert plan_move_back(home, host, [m.vm for m in plan.moves]).moves == ()
    else:
        assert back.moves == ()

