"""Rules (keep together, keep apart, VM to host) as pure checks: what a layout violates, and why a host
may not take some VMs now. Ganeti's cmdlib style: every violation and every refusal is a sentence in a list.

keep-together and keep-apart bind powered-on VMs only (a stopped VM shares no host's resources); a
vm-host rule binds every VM, as it is where a stopped VM would start. VMs bound by keep-together rules
(through any chain of them) move as one unit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvmotion.center.cluster import Layout, Rule, RuleKind, Snapshot, Vm, mib
from kvmotion.center.placement import state_refusal


@dataclass(frozen=True)
class Violation:
    rule: str
    kind: RuleKind
    must: bool
    vms: tuple[str, ...]  # the VMs that break it
    sentence: str


def violations(snapshot: Snapshot) -> list[Violation]:
    """Every rule the snapshot breaks, each with a sentence (in rule order)."""
    return check(snapshot.rules, {v.name: v.host for v in snapshot.vms}, snapshot.vm)


def check(rules: Iterable[Rule], where: Mapping[str, str], vms: Mapping[str, Vm]) -> list[Violation]:
    out = []
    for rule in rules:
        label = f"{rule.kind.value} rule {rule.name} ({rule.strength})"
        if rule.kind is RuleKind.VM_HOST:
            away = [v for v in rule.vms if where[v] not in rule.hosts]
            if away:
                runs = ", ".join(f"{v} runs on {where[v]}" for v in away)
                out.append(Violation(rule.name, rule.kind, rule.must, tuple(away),
                                     f"{label}: {runs}, not on {' or '.join(rule.hosts)}"))
            continue
        on = [v for v in rule.vms if vms[v].on]
        by_host: dict[str, list[str]] = {}
        for v in on:
            by_host.setdefault(where[v], []).append(v)
        if rule.kind is RuleKind.KEEP_TOGETHER and len(by_host) > 1:
            runs = ", ".join(f"{' and '.join(vs)} on {h}" for h, vs in sorted(by_host.items()))
            out.append(Violation(rule.name, rule.kind, rule.must, tuple(on), f"{label}: its VMs run apart ({runs})"))
        elif rule.kind is RuleKind.KEEP_APART:
            shared = {h: vs for h, vs in sorted(by_host.items()) if len(vs) > 1}
            if shared:
                runs = "; ".join(f"{' and '.join(vs)} share {h}" for h, vs in shared.items())
                out.append(Violation(rule.name, rule.kind, rule.must,
                                     tuple(v for vs in shared.values() for v in vs), f"{label}: {runs}"))
    return out


def units(snapshot: Snapshot) -> list[tuple[str, ...]]:
    """The VMs grouped by keep-together rules (chains merge; powered-off VMs alone), sorted."""
    parent = {v.name: v.name for v in snapshot.vms}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for rule in snapshot.rules:
        if rule.kind is RuleKind.KEEP_TOGETHER:
            on = [v for v in rule.vms if snapshot.vm[v].on]
            for v in on[1:]:
                a, b = root(on[0]), root(v)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for vm in snapshot.vms:
        groups.setdefault(root(vm.name), []).append(vm.name)
    return sorted(tuple(sorted(g)) for g in groups.values())


def rule_refusals(layout: Layout, unit: Sequence[str], host: str, *, should: bool) -> list[str]:
    """Why the rules keep `unit` (VMs moving together) off `host`; `should`: should rules count too."""
    snap = layout.snapshot
    moving = set(unit)
    out = []
    for rule in snap.rules:
        if not (rule.must or should):
            continue
        label = f"{rule.kind.value} rule {rule.name} ({rule.strength})"
        mine = [v for v in rule.vms if v in moving]
        if not mine:
            continue
        if rule.kind is RuleKind.VM_HOST:
            if host not in rule.hosts:
                out.append(f"{label}: {', '.join(mine)} may run only on {' or '.join(rule.hosts)}")
            continue
        mine = [v for v in mine if snap.vm[v].on]
        if not mine:
            continue
        others = [v for v in rule.vms if v not in moving and snap.vm[v].on]
        if rule.kind is RuleKind.KEEP_APART:
            there = [v for v in others if layout.where[v] == host]
            if there or len(mine) > 1:
                who = ", ".join(there) if there else " and ".join(mine)
                out.append(f"{label}: {who} would share {host} with {', '.join(mine) if there else 'each other'}")
        else:
            away = [v for v in others if layout.where[v] != host]
            if away:
                out.append(f"{label}: {', '.join(f'{v} runs on {layout.where[v]}' for v in away)}")
    return out


def refusals(layout: Layout, unit: Sequence[str], host: str, *, should: bool = True) -> list[str]:
    """Every reason `host` cannot take the VMs of `unit` now (empty: it can): its state, what the VMs
    can never run on, free memory, rules. Memory counts the powered-on VMs only."""
    snap = layout.snapshot
    vms = [snap.vm[v] for v in unit]
    if all(layout.where[v.name] == host for v in vms):
        return [f"{' and '.join(unit)} {'is' if len(unit) == 1 else 'are'} already on {host}"]
    out = []
    refused = state_refusal(host, snap.host[host].state)
    if refused:
        out.append(refused)
    for v in vms:
        if host in v.barred:
            out.append(f"{v.name}: {v.barred[host]}")
        if v.local_disk:
            out.append(f"{v.name} has a disk local to {layout.where[v.name]}: a migration needs every disk on a datastore")
    need = sum(v.memory for v in vms if v.on and layout.where[v.name] != host)
    free = layout.free(host)
    if need > free:
        out.append(f"{host} has {mib(max(free, 0))} free, {' and '.join(unit)} need{'s' if len(unit) == 1 else ''} {mib(need)}")
    return out + rule_refusals(layout, unit, host, should=should)
