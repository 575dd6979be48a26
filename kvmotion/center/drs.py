"""DRS as a pure planner: the moves that keep the cluster within its rules and balanced, each with a
sentence why, its gain and its cost.

First the mandatory moves, whatever the threshold: VMs off hosts entering maintenance, VMs breaking a
must rule, then a should rule, then VMs off quarantined hosts where that overloads no other host. Then,
while the imbalance (standard deviation of the connected hosts' load, kvmotion.center.cluster) is above
the threshold's tolerance, greedy cost-benefit: of the moves off hosts loaded above the mean, those
removing the most imbalance are priced, and the one with the best gain x lifetime - cost is taken,
where cost = `migration_cost` x its predicted seconds. The gain is the imbalance removed counted over
the whole cluster: n x the drop in the variance of the n hosts' load (the drop in their summed squared
distance from the mean), so a move's worth does not shrink as the cluster grows, as the standard
deviation's drop does (1/n). Every such move lowers the imbalance, so one plan cannot cycle; hysteresis
across plans: a move must gain `min_gain` at least, and a VM that moved within the snapshot's `recent`
seconds (or in this plan) is not moved again for balance. Balancing never breaks a rule, should rules
included.

The automation level (kvmotion.api.operations.Automation) decides who acts on the plan, and where a VM
created without a host goes (`initial_host`): manual only recommends, partial places new VMs itself,
full also applies the moves every interval (kvmotion.center.operations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvmotion.api.center import Candidate, Placement
from kvmotion.api.operations import Automation
from kvmotion.center.cluster import (
    Estimate,
    Layout,
    MigrationCost,
    Move,
    MoveKind,
    Plan,
    Rule,
    RuleKind,
    Snapshot,
    Stuck,
    Weights,
    collapse,
    default_cost,
    mib,
)
from kvmotion.center.maintenance import order, place
from kvmotion.center.placement import Status, summary
from kvmotion.center.rules import check, refusals, rule_refusals, units
from kvmotion.core.errors import InsufficientResources, InvalidInput

AGAIN = 2  # a rule mend may move a VM a plan moved already (then collapsed into one move), not more often

# Tolerated imbalance per threshold level (1: none of it is acted on, only mandatory moves).
TOLERANCE = {1: math.inf, 2: 0.2, 3: 0.1, 4: 0.05, 5: 0.02}


@dataclass(frozen=True)
class DrsConfig:
    """The planner's settings (who acts on its plans is the automation level's business, not the planner's)."""

    threshold: int = 3
    weights: Weights = field(default_factory=Weights)
    lifetime: float = 1800.0  # s a balance gain is expected to last before demand shifts again
    migration_cost: float = 0.02  # imbalance-seconds charged per second a migration takes
    min_gain: float = 0.001  # a balance move removes at least this much spread (see `_balance`)
    quarantine_cpu: float = 0.8  # VMs leave a quarantined host only for hosts whose CPU load stays under this
    max_moves: int | None = None  # balance moves per plan (None: until balanced)
    priced: int = 16  # moves (by gain) priced and checked against the rules each step
    sources: int = 2  # the most loaded hosts whose VMs each step considers moving

    def __post_init__(self) -> None:
        if self.threshold not in TOLERANCE:
            raise InvalidInput(f"invalid DRS threshold {self.threshold}: use 1 to 5")
        if self.lifetime <= 0 or self.migration_cost < 0 or self.min_gain < 0 or min(self.priced, self.sources) < 1:
            raise InvalidInput("DRS lifetime must be positive, migration cost and minimum gain >= 0, priced and sources >= 1")
        if self.max_moves is not None and self.max_moves < 0:
            raise InvalidInput(f"invalid DRS move limit {self.max_moves}: use 0 or more")

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.threshold]


DEFAULT = DrsConfig()


def initial_host(automation: Automation, vm: str, placement: Placement) -> str:
    """The host a VM created without one is defined on: placement's choice under partial and full
    automation; under manual (as vSphere's: recommendations only) a refusal that names the host
    recommended, why, and how to go on. InsufficientResources when no host can take it, whatever the level."""
    chosen = placement.chosen
    if chosen is None:
        raise InsufficientResources(f"cannot place VM {vm}: {summary(placement)}")
    if automation is not Automation.MANUAL:
        return chosen
    best = next(c for c in placement.candidates if c.host == chosen)
    why = [f"the least loaded host that can take it, score {best.score:.3f}"]
    why += [f"{c.host} scores {c.score:.3f}" for c in placement.candidates if c.eligible and c.host != chosen]
    why += [r for c in placement.candidates for r in c.reasons]
    raise InvalidInput(f"DRS automation is manual: the center recommends {chosen} for VM {vm} ({'; '.join(why)}) "
                       f"but places nothing itself; create it with --host {chosen}, or let DRS place new VMs: "
                       "`kvmotion drs config --automation partial`")


def recommend(snapshot: Snapshot, config: DrsConfig = DEFAULT, cost: MigrationCost = default_cost) -> Plan:
    """The moves DRS recommends now, mandatory first, and what it could not fix."""
    layout = Layout(snapshot, config.weights)
    before = layout.imbalance()
    groups = units(snapshot)
    moves: list[Move] = []
    stuck: dict[str, Stuck] = {}
    notes: dict[str, tuple[Move, ...]] = {}  # a should rule broken -> the moves that broke it
    balanced = 0
    while True:
        # Balance moves can make room for a mandatory one that failed: repeat until neither finds any
        # (the last round, which moves nothing, says what stays stuck).
        stuck.clear()
        got = _mandatory(layout, groups, cost, config, stuck, notes)
        limit = None if config.max_moves is None else config.max_moves - balanced
        more = _balance(layout, groups, cost, config, limit)
        balanced += len(more)
        moves += got + more
        if not got and not more:
            break
    return Plan(moves=tuple(collapse(snapshot, moves, cost)), stuck=tuple(stuck.values()), imbalance_before=before,
                imbalance_after=layout.imbalance(),
                notes=tuple(n for n, ms in notes.items() if _still_broken(layout, ms)))


def _still_broken(layout: Layout, moves: Sequence[Move]) -> bool:
    """Whether the unit these moves took somewhere still breaks a should rule there at the end of the plan
    (a rule mend may have moved it on, or moved away the VM it shared the host with)."""
    dest = moves[0].destination
    unit = [m.vm for m in moves]
    return all(layout.where[v] == dest for v in unit) and bool(rule_refusals(layout, unit, dest, should=True))


def _mandatory(layout: Layout, groups: Sequence[tuple[str, ...]], cost: MigrationCost, config: DrsConfig,
               stuck: dict[str, Stuck], notes: dict[str, tuple[Move, ...]]) -> list[Move]:
    snap = layout.snapshot
    out: list[Move] = []

    def off(host: str, kind: MoveKind, reason: str, cpu_limit: float | None) -> None:
        here = [tuple(v for v in g if layout.where[v] == host and v not in layout.moved) for g in groups]
        for unit in order(layout, here):
            got, why, note = place(layout, unit, kind, reason, cost, cpu_limit)
            out.extend(got)
            if why:
                stuck[why.vm] = why
            if note:
                notes[note] = tuple(got)

    for h in snap.hosts:
        if h.state is Status.ENTERING_MAINTENANCE:
            off(h.name, MoveKind.EVACUATE, f"{h.name} enters maintenance", None)
    for must in (True, False):
        for v in check([r for r in snap.rules if r.must is must], layout.where, snap.vm):
            out.extend(_fix(layout, groups, v.rule, v.sentence, cost, stuck))
    for h in snap.hosts:
        if h.state is Status.QUARANTINE:
            off(h.name, MoveKind.QUARANTINE, f"{h.name} is in quarantine (health {h.health.value})",
                config.quarantine_cpu)
    return out


def _fix(layout: Layout, groups: Sequence[tuple[str, ...]], rule_name: str, sentence: str, cost: MigrationCost,
         stuck: dict[str, Stuck]) -> list[Move]:
    """Moves that mend one violated rule (re-checked first: an earlier fix may have mended it), or a Stuck."""
    snap = layout.snapshot
    rule = next(r for r in snap.rules if r.name == rule_name)
    now = check([rule], layout.where, snap.vm)
    if not now:
        return []
    sentence = now[0].sentence
    group_of = {v: g for g in groups for v in g}
    out: list[Move] = []
    if rule.kind is RuleKind.KEEP_TOGETHER:
        members = [v for v in rule.vms if snap.vm[v].on]
        group = group_of[members[0]]
        count: dict[str, int] = {}
        for v in group:
            count[layout.where[v]] = count.get(layout.where[v], 0) + 1
        candidates: list[Candidate] = []
        # Keep every should rule if any target allows it; a must rule may break a should one (said so).
        for should in (True, False) if rule.must else (True,):
            candidates = []
            for target in sorted(count, key=lambda h: (-count[h], h)):
                moving = tuple(v for v in group if layout.where[v] != target)
                again = [v for v in moving if layout.times.get(v, 0) >= AGAIN]
                reasons = ([f"{', '.join(again)} moved twice in this plan already"] if again
                           else refusals(layout, moving, target, should=should))
                candidates.append(Candidate(host=target, reasons=tuple(reasons)))
                if reasons:
                    continue
                reason = f"{sentence}: {target} already runs {count[target]} of them and has room for the rest"
                if not should:
                    reason += " (breaking a should rule: " + "; ".join(refusals(layout, moving, target)) + ")"
                for v in moving:
                    src = layout.where[v]
                    out.append(Move(vm=v, source=src, destination=target, kind=MoveKind.RULE, why=reason,
                                    estimate=cost(snap.vm[v], snap.host[src], snap.host[target], snap.rate(src, target))))
                    layout.move(v, target)
                return out
        stuck[members[0]] = Stuck(tuple(members), layout.where[members[0]], f"{sentence}; no host takes them all: "
                                  + "; ".join(r for c in candidates for r in c.reasons), tuple(candidates))
        return out
    # vm-host: each VM away from its hosts moves (with its keep-together unit); keep-apart: all but one VM
    # of each shared host move.
    if rule.kind is RuleKind.VM_HOST:
        got, left = _leave(layout, group_of, rule, sentence, now[0].vms, cost)
        stuck.update(left)
        return got
    by_host: dict[str, list[str]] = {}
    for v in now[0].vms:
        by_host.setdefault(layout.where[v], []).append(v)

    def size(n: str) -> tuple[int, str]:
        return (-snap.vm[n].memory, n)

    def stays(n: str) -> tuple[bool, int, str]:
        # One this plan moved already if any (a VM moves once per plan), else the biggest.
        return (not any(u in layout.moved for u in group_of[n]), *size(n))

    for vs in by_host.values():
        # The first VM whose staying lets all the others leave stays; if none does (a VM with a local disk,
        # no room), the biggest stays and whoever can leaves. Which VMs can leave depends on the layout
        # only, never on what this plan moved, so planning again on the result finds nothing more to do.
        for keep in sorted(vs, key=stays):
            got, left = _leave(layout, group_of, rule, sentence, sorted((v for v in vs if v != keep), key=size), cost)
            if not left:
                out.extend(got)
                break
            for m in reversed(got):
                layout.undo(m.vm, m.source)
        else:
            keep = min(vs, key=size)
            got, left = _leave(layout, group_of, rule, sentence, sorted((v for v in vs if v != keep), key=size), cost)
            out.extend(got)
            stuck.update(left)
    return out


def _leave(layout: Layout, group_of: Mapping[str, tuple[str, ...]], rule: Rule, sentence: str, away: Iterable[str],
           cost: MigrationCost) -> tuple[list[Move], dict[str, Stuck]]:
    """Each of `away` (with its keep-together unit) off its host to mend `rule`, unless an earlier move
    mended it for that VM: the moves, and the VMs that could not leave (why)."""
    snap = layout.snapshot
    out: list[Move] = []
    stuck: dict[str, Stuck] = {}
    for v in away:
        still = check([rule], layout.where, snap.vm)
        if not still or v not in still[0].vms:
            continue  # mended by an earlier move
        unit = tuple(u for u in group_of[v] if layout.where[u] == layout.where[v])
        again = [u for u in unit if layout.times.get(u, 0) >= AGAIN]
        if again:
            stuck[v] = Stuck(unit, layout.where[v], f"{sentence}; {', '.join(again)} moved twice in this plan already")
            continue
        got, why, note = place(layout, unit, MoveKind.RULE, sentence, cost)
        if note and not rule.must:
            # Mending a should rule by breaking another one is no mend: undo, and say so.
            for m in got:
                layout.undo(m.vm, m.source)
            got = []
            why = Stuck(unit, layout.where[v], f"{sentence}; no host takes {v} without breaking another rule")
        out.extend(got)
        if why:
            stuck[why.vm] = why
    return out, stuck


def _balance(layout: Layout, groups: Sequence[tuple[str, ...]], cost: MigrationCost, config: DrsConfig,
             limit: int | None) -> list[Move]:
    snap = layout.snapshot
    active = sorted(h.name for h in snap.hosts if h.accepts)
    n = len(active)
    if n < 2 or not math.isfinite(config.tolerance) or (limit is not None and limit <= 0):
        return []
    index = {h: i for i, h in enumerate(active)}
    capc = np.array([snap.host[h].cpus for h in active], dtype=float)
    capm = np.array([snap.host[h].memory for h in active], dtype=float)
    wc, wm = config.weights.cpu, config.weights.memory
    # The units balancing may move: all powered on, on one connected host, no local disk, not moved lately.
    cand: list[tuple[str, ...]] = []
    for g in groups:
        vms = [snap.vm[v] for v in g]
        hosts = {layout.where[v] for v in g}
        if (len(hosts) == 1 and next(iter(hosts)) in index and all(v.on and not v.local_disk for v in vms)
                and not any(v.moved_at is not None and snap.now - v.moved_at < snap.recent for v in vms)
                and not any(v in layout.moved for v in g)):
            cand.append(g)
    if not cand:
        return []
    ucpu = np.array([sum(snap.vm[v].cpu_demand for v in g) for g in cand])
    umem = np.array([sum(snap.vm[v].memory for v in g) for g in cand], dtype=float)
    uhost = np.array([index[layout.where[g[0]]] for g in cand])
    alive = np.ones(len(cand), dtype=bool)
    allowed = np.ones((len(cand), n), dtype=bool)  # never: barred hosts, hosts a vm-host rule excludes
    row = {v: i for i, g in enumerate(cand) for v in g}
    for i, g in enumerate(cand):
        for v in g:
            for h in snap.vm[v].barred:
                if h in index:
                    allowed[i, index[h]] = False
    for r in snap.rules:
        if r.kind is RuleKind.VM_HOST:
            cols = np.array([h not in r.hosts for h in active])
            for v in r.vms:
                if v in row:
                    allowed[row[v], cols] = False
    estimates: dict[tuple[int, int], Estimate] = {}
    out: list[Move] = []
    x = np.array([layout.load(h) for h in active])
    free = np.array([layout.free(h) for h in active], dtype=float)
    while limit is None or len(out) < limit:
        mean = float(x.sum()) / n
        imb = math.sqrt(max(float((x * x).sum()) / n - mean * mean, 0.0))
        if imb <= config.tolerance:
            break
        # Moves from the most loaded hosts above the mean to hosts below it: where the gains are.
        hot = np.zeros(n, dtype=bool)
        for h in np.argsort(-x, kind="stable")[:config.sources]:
            hot[h] = x[h] > mean
        cold = np.flatnonzero(x < mean)
        sel = np.flatnonzero(alive & hot[uhost])
        if sel.size == 0 or cold.size == 0:
            break
        src = uhost[sel]
        xc = x[cold]
        da = wc * ucpu[sel] / capc[src] + wm * umem[sel] / capm[src]
        db = wc * ucpu[sel, None] / capc[None, cold] + wm * umem[sel, None] / capm[None, cold]
        xa = x[src][:, None]
        s1 = x.sum() - da[:, None] + db
        s2 = (x * x).sum() - xa * xa + (xa - da[:, None]) ** 2 - xc[None, :] ** 2 + (xc[None, :] + db) ** 2
        # Spread removed: n x the drop in variance, the drop in the hosts' summed squared distance from
        # the mean load (about 2 x load moved x the two hosts' load difference, whatever the cluster's size).
        var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
        gain = n * (imb * imb - var)
        ok = allowed[np.ix_(sel, cold)] & (umem[sel, None] <= free[None, cold])
        gain = np.where(ok, gain, -np.inf)
        flat = gain.ravel()
        k = min(config.priced, flat.size)
        top = np.argpartition(-flat, k - 1)[:k]
        top = top[np.argsort(-flat[top], kind="stable")]
        best: tuple[float, int, int, float, Estimate, float, float] | None = None
        for f in top:
            gain_f = float(flat[f])
            if not gain_f >= max(config.min_gain, 1e-12):
                break
            row_i, col = divmod(int(f), cold.size)
            d = int(cold[col])
            u = int(sel[row_i])
            key = (u, d)
            if key not in estimates:
                s = active[int(uhost[u])]
                parts = [cost(snap.vm[v], snap.host[s], snap.host[active[d]], snap.rate(s, active[d])) for v in cand[u]]
                estimates[key] = Estimate(sum(p.seconds for p in parts), max(p.downtime for p in parts),
                                          sum(p.bytes for p in parts))
            est = estimates[key]
            benefit = gain_f * config.lifetime
            charge = config.migration_cost * est.seconds
            net = benefit - charge
            if net <= 0 or (best is not None and net <= best[0]):
                continue
            if refusals(layout, cand[u], active[d], should=True):
                continue
            best = (net, u, d, gain_f, est, benefit, charge)
        if best is None:
            break
        net, u, d, gain_f, est, benefit, charge = best
        s, t = active[int(uhost[u])], active[d]
        unit = cand[u]
        desc = " and ".join(unit)
        why = (f"{s} is at {layout.load(s):.0%} load against a mean of {mean:.0%}: moving {desc} "
               f"({float(ucpu[u]):.1f} cores, {mib(float(umem[u]))}) to {t} (at {layout.load(t):.0%}) cuts the "
               f"imbalance from {imb:.3f} to {math.sqrt(max(imb * imb - gain_f / n, 0)):.3f}, worth {benefit:.0f} against {charge:.0f} for "
               f"a {est.seconds:.0f} s migration")
        for v in unit:
            vm = snap.vm[v]
            e = cost(vm, snap.host[s], snap.host[t], snap.rate(s, t)) if len(unit) > 1 else est
            out.append(Move(vm=v, source=s, destination=t, kind=MoveKind.BALANCE, why=why, estimate=e,
                            gain=gain_f, benefit=benefit, cost=charge))
            layout.move(v, t)
        alive[u] = False
        for h in (s, t):
            x[index[h]] = layout.load(h)
            free[index[h]] = layout.free(h)
    return out
