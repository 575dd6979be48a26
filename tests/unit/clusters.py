"""Generated clusters for the planners' property tests (hypothesis strategies) and small builders."""

from __future__ import annotations

from hypothesis import strategies as st

from kvmotion.api.center import PowerState
from kvmotion.center.cluster import GIB, Health, Host, Rule, RuleKind, Snapshot, Vm
from kvmotion.center.placement import Status

NOW = 10_000.0
STATES = [Status.CONNECTED] * 6 + [Status.NOT_RESPONDING, Status.MAINTENANCE,
                                      Status.ENTERING_MAINTENANCE, Status.QUARANTINE]


@st.composite
def snapshots(draw: st.DrawFn, max_hosts: int = 6, max_vms: int = 24, rules: bool = True) -> Snapshot:
    """A cluster whose powered-on VMs fit in memory (as any real one does); demands are multiples of
    1/8 core so sums are exact whatever order a planner adds them in."""
    n = draw(st.integers(1, max_hosts))
    hosts = []
    for i in range(n):
        state = draw(st.sampled_from(STATES))
        health = Health.MODERATE if state is Status.QUARANTINE else Health.OK
        hosts.append(Host(f"h{i}", state, cpus=draw(st.sampled_from([2.0, 4.0, 8.0])),
                          memory=draw(st.sampled_from([4, 8, 16])) * GIB, health=health))
    used = [0] * n
    vms = []
    for j in range(draw(st.integers(0, max_vms))):
        memory = draw(st.sampled_from([GIB // 2, GIB, 2 * GIB, 4 * GIB]))
        vcpus = draw(st.integers(1, 4))
        on = draw(st.integers(0, 9)) > 0
        at = draw(st.integers(0, n - 1))
        if on:
            fits = [k for k in range(n) if used[(at + k) % n] + memory <= hosts[(at + k) % n].memory]
            if fits:
                at = (at + fits[0]) % n
                used[at] += memory
            else:
                on = False
        moved = draw(st.sampled_from([None, None, None, NOW - 60, NOW - 5000]))
        barred = dict.fromkeys(draw(st.lists(st.sampled_from([h.name for h in hosts]), max_size=2 if j % 4 == 0 else 0)),
                               "cannot run CPU model Skylake")
        vms.append(Vm(f"v{j}", f"h{at}", memory=memory, vcpus=vcpus,
                      cpu_demand=draw(st.integers(0, vcpus * 8)) / 8, dirty_rate=draw(st.sampled_from([0.0, 1e6, 5e7, 2e8])),
                      local_disk=draw(st.integers(0, 19)) == 0, power=PowerState.ON if on else PowerState.OFF,
                      moved_at=moved, barred=barred))
    out: list[Rule] = []
    names = [v.name for v in vms]
    if rules and names:
        for r in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(list(RuleKind)))
            must = draw(st.booleans())
            if kind is RuleKind.VM_HOST:
                members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
                allowed = draw(st.lists(st.sampled_from([h.name for h in hosts]), min_size=1, max_size=n, unique=True))
                out.append(Rule(f"r{r}", kind, tuple(members), tuple(allowed), must=must))
            elif len(names) >= 2:
                members = draw(st.lists(st.sampled_from(names), min_size=2, max_size=3, unique=True))
                out.append(Rule(f"r{r}", kind, tuple(members), must=must))
    return Snapshot(hosts=tuple(hosts), vms=tuple(vms), rules=tuple(out), now=NOW)
