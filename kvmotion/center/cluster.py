"""The cluster as the planners see it (maintenance, DRS, rules): a frozen snapshot, and the plans they return.

Pure: no I/O and no clock (the snapshot carries `now`). The center builds a `Snapshot` from its store
and the agents' heartbeats; `kvmotion.center.placement.fact_refusals` gives each VM's `barred` hosts
(CPU model, port groups, datastores), which no load or rule can change.

Load of a host: each dimension as a fraction of its capacity, CPU = the demand of its powered-on VMs
(vCPU run time plus run-queue wait, in cores) over its cores, memory = their memory over its memory;
the host's load is the weighted sum, and the cluster's imbalance is the population standard deviation
of that load over the connected hosts (those that take VMs), as vSphere's DRS measured it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from typing import Protocol

from kvmotion.api.center import Candidate, PowerState
from kvmotion.center.placement import Status
from kvmotion.core.errors import InvalidInput

GIB = 1 << 30
MIB = 1 << 20


class Health(str, Enum):
    OK = "ok"
    MODERATE = "moderate"  # cluster policy: quarantine
    SEVERE = "severe"  # cluster policy: maintenance (evacuate)


@dataclass(frozen=True)
class Host:
    name: str
    state: Status
    cpus: float  # cores its VMs may use
    memory: int  # bytes its VMs may use
    health: Health = Health.OK

    def __post_init__(self) -> None:
        if not self.cpus > 0 or self.memory <= 0:
            raise InvalidInput(f"host {self.name}: capacity must be positive (cpus {self.cpus}, memory {self.memory})")

    @property
    def accepts(self) -> bool:
        """It takes VMs (moved or new): connected, not in maintenance, quarantine or silent."""
        return self.state is Status.CONNECTED


@dataclass(frozen=True)
class Vm:
    name: str
    host: str
    memory: int  # bytes
    vcpus: int = 1
    cpu_demand: float = 0.0  # cores: its vCPU threads' run time plus run-queue wait over the last interval
    dirty_rate: float = 0.0  # bytes/s the guest dirties
    local_disk: bool = False  # a disk outside every datastore: it cannot migrate
    power: PowerState = PowerState.ON
    moved_at: float | None = None  # when it last migrated (hysteresis)
    barred: Mapping[str, str] = field(default_factory=dict, hash=False)  # host -> why it can never run there

    def __post_init__(self) -> None:
        if self.memory <= 0 or self.vcpus < 1 or self.cpu_demand < 0 or self.dirty_rate < 0:
            raise InvalidInput(f"VM {self.name}: memory and vCPUs must be positive, demand and dirty rate >= 0")

    @property
    def on(self) -> bool:
        return self.power is PowerState.ON


class RuleKind(str, Enum):
    KEEP_TOGETHER = "keep-together"  # the VMs run on one host
    KEEP_APART = "keep-apart"  # no two of the VMs on one host
    VM_HOST = "vm-host"  # the VMs run on one of the hosts


@dataclass(frozen=True)
class Rule:
    name: str
    kind: RuleKind
    vms: tuple[str, ...]
    hosts: tuple[str, ...] = ()  # vm-host only
    must: bool = True  # False: "should", which maintenance may break when nothing else fits

    def __post_init__(self) -> None:
        if self.kind is RuleKind.VM_HOST:
            if not self.vms or not self.hosts:
                raise InvalidInput(f"rule {self.name}: a vm-host rule needs at least one VM and one host")
        elif len(set(self.vms)) < 2 or self.hosts:
            raise InvalidInput(f"rule {self.name}: a {self.kind.value} rule needs two VMs or more and no host")

    @property
    def strength(self) -> str:
        return "must" if self.must else "should"


@dataclass(frozen=True)
class Estimate:
    """A migration's predicted duration, downtime and bytes sent."""

    seconds: float
    downtime: float  # the guest's: source stopped -> destination resumed
    bytes: int


class MigrationCost(Protocol):
    """Predicts one migration of `vm` from `source` to `destination` over a link of `link_rate` bytes/s."""

    def __call__(self, vm: Vm, source: Host, destination: Host, link_rate: float) -> Estimate: ...


def default_cost(vm: Vm, source: Host, destination: Host, link_rate: float) -> Estimate:
    """Pre-copy as a geometric series: each round re-sends what the guest dirtied during the last one
    (ratio dirty/link; a guest at 95 % of the link or more is throttled down to half of it, as the
    policy does), until what is left fits a 30 ms pause or after 30 rounds. A powered-off VM only
    changes home. The migration predictor (kvmotion.migration.predict) replaces this where present."""
    if not vm.on:
        return Estimate(0.0, 0.0, 0)
    rate = max(link_rate, 1.0)
    ratio = vm.dirty_rate / rate
    if ratio >= 0.95:
        ratio = 0.5
    sent, pending = 0.0, float(vm.memory)
    for _ in range(30):
        if pending <= rate * 0.03:
            break
        sent += pending
        pending *= ratio
    sent += pending
    return Estimate(seconds=1.0 + sent / rate, downtime=0.02 + pending / rate, bytes=int(sent))


@dataclass(frozen=True)
class Weights:
    """How much CPU and memory count in a host's load (they add up to 1)."""

    cpu: float = 0.5
    memory: float = 0.5

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.memory < 0 or not math.isclose(self.cpu + self.memory, 1.0):
            raise InvalidInput(f"load weights {self.cpu}/{self.memory}: use two numbers >= 0 that add up to 1")


EVEN = Weights()


@dataclass(frozen=True)
class Snapshot:
    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]
    rules: tuple[Rule, ...] = ()
    links: Mapping[tuple[str, str], float] = field(default_factory=dict, hash=False)  # (source, destination) -> bytes/s
    link_rate: float = 125e6  # bytes/s between hosts missing from `links` (1 Gbit/s)
    now: float = 0.0
    recent: float = 900.0  # s: DRS does not move a VM again for balance this soon after it moved

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise InvalidInput("snapshot: a host name appears twice")
        vms = [v.name for v in self.vms]
        if len(set(vms)) != len(vms):
            raise InvalidInput("snapshot: a VM name appears twice")
        known = set(names)
        for vm in self.vms:
            if vm.host not in known:
                raise InvalidInput(f"snapshot: VM {vm.name} is on {vm.host}, which is not in the snapshot")
        rules = [r.name for r in self.rules]
        if len(set(rules)) != len(rules):
            raise InvalidInput("snapshot: a rule name appears twice")
        for rule in self.rules:
            unknown = sorted(set(rule.vms) - set(vms)) + sorted(set(rule.hosts) - known)
            if unknown:
                raise InvalidInput(f"rule {rule.name} names {', '.join(unknown)}, not in the snapshot")

    @cached_property
    def host(self) -> Mapping[str, Host]:
        return {h.name: h for h in self.hosts}

    @cached_property
    def vm(self) -> Mapping[str, Vm]:
        return {v.name: v for v in self.vms}

    def rate(self, source: str, destination: str) -> float:
        return self.links.get((source, destination), self.link_rate)


def apply(snapshot: Snapshot, moves: Iterable[Move]) -> Snapshot:
    """The snapshot after `moves` ran (each VM on its destination, moved now)."""
    where = {m.vm: m.destination for m in moves}
    vms = tuple(replace(v, host=where[v.name], moved_at=snapshot.now) if v.name in where else v for v in snapshot.vms)
    return replace(snapshot, vms=vms)


def collapse(snapshot: Snapshot, moves: Iterable[Move], cost: MigrationCost) -> list[Move]:
    """One move per VM: a VM a plan moved twice (a rule mended after an evacuation) goes straight from
    where it is to where it ends (none if that is where it is), then `sequence`. Unless no order of
    those fits: a swap through a third host became a direct swap between two full hosts. Then the
    moves stay as planned, hops included: the planner made each fit in its turn."""
    moves = list(moves)
    first: dict[str, str] = {}
    last: dict[str, Move] = {}
    for m in moves:
        first.setdefault(m.vm, m.source)
        last[m.vm] = m
    out = []
    for m in moves:
        if last[m.vm] is not m or first[m.vm] == m.destination:
            continue
        if first[m.vm] != m.source:
            src, dst = snapshot.host[first[m.vm]], snapshot.host[m.destination]
            m = replace(m, source=src.name, estimate=cost(snapshot.vm[m.vm], src, dst, snapshot.rate(src.name, dst.name)))
        out.append(m)
    ordered = sequence(snapshot, out)
    return ordered if ordered is not None else sequence(snapshot, moves) or moves


def sequence(snapshot: Snapshot, moves: Iterable[Move]) -> list[Move] | None:
    """The moves in their order, except that a move whose destination lacks the memory when its turn comes
    waits for the first one that frees it: none ever overcommits a host while the plan runs. None when
    no order does (every move left waits for another)."""
    free = {h.name: h.memory for h in snapshot.hosts}
    for v in snapshot.vms:
        if v.on:
            free[v.host] -= v.memory
    pending = [(m, snapshot.vm[m.vm].memory if snapshot.vm[m.vm].on else 0) for m in moves]
    out = []
    while pending:
        i = next((i for i, (m, need) in enumerate(pending) if need <= free[m.destination]), None)
        if i is None:
            return None
        m, need = pending.pop(i)
        free[m.source] += need
        free[m.destination] -= need
        out.append(m)
    return out


# ---- load -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    cpu: float  # demand / cores
    memory: float  # memory of powered-on VMs / memory

    def total(self, w: Weights) -> float:
        return w.cpu * self.cpu + w.memory * self.memory


def loads(snapshot: Snapshot) -> dict[str, Load]:
    cpu = dict.fromkeys(snapshot.host, 0.0)
    mem = dict.fromkeys(snapshot.host, 0)
    for v in snapshot.vms:
        if v.on:
            cpu[v.host] += v.cpu_demand
            mem[v.host] += v.memory
    return {h.name: Load(cpu[h.name] / h.cpus, mem[h.name] / h.memory) for h in snapshot.hosts}


def imbalance(snapshot: Snapshot, weights: Weights = EVEN) -> float:
    """Standard deviation of the connected hosts' load (0 with fewer than two)."""
    by = loads(snapshot)
    values = [by[h.name].total(weights) for h in snapshot.hosts if h.accepts]
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def overcommitted(snapshot: Snapshot) -> list[str]:
    """Hosts whose powered-on VMs need more memory than they have, each with a sentence."""
    by = loads(snapshot)
    return [f"{h.name} holds {by[h.name].memory:.0%} of its memory in powered-on VMs" for h in snapshot.hosts
            if by[h.name].memory > 1.0 + 1e-9]


# ---- plans ------------------------------------------------------------------------------------------------
class MoveKind(str, Enum):
    EVACUATE = "evacuate"  # its host enters maintenance
    REHOME = "rehome"  # a powered-off VM's home changes (no migration)
    RULE = "rule"  # a rule is violated
    QUARANTINE = "quarantine"  # its host has a health fault
    BALANCE = "balance"  # DRS: imbalance above the threshold
    MOVE_BACK = "move_back"  # back where it ran before maintenance

    @property
    def mandatory(self) -> bool:
        return self is not MoveKind.BALANCE


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    destination: str
    kind: MoveKind
    why: str  # one sentence
    estimate: Estimate
    gain: float = 0.0  # DRS: spread removed, n x the drop in the variance of the n connected hosts' load
    benefit: float = 0.0  # gain x its expected lifetime (spread-seconds)
    cost: float = 0.0  # what the migration is charged, same unit


@dataclass(frozen=True)
class Stuck:
    """VMs a plan leaves where they are (one, or a keep-together group), why, and every host's reasons."""

    vms: tuple[str, ...]
    host: str
    why: str
    candidates: tuple[Candidate, ...] = ()

    @property
    def vm(self) -> str:
        return self.vms[0]


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]  # in the order to run them
    stuck: tuple[Stuck, ...] = ()
    imbalance_before: float = 0.0
    imbalance_after: float = 0.0
    notes: tuple[str, ...] = ()  # what else a reader should know (e.g. a should rule left broken)

    @property
    def seconds(self) -> float:
        """Predicted time of the moves one after the other."""
        return sum(m.estimate.seconds for m in self.moves)

    @property
    def bytes(self) -> int:
        return sum(m.estimate.bytes for m in self.moves)

    @property
    def complete(self) -> bool:
        return not self.stuck


def summarize(candidates: Iterable[Candidate]) -> str:
    """Every distinct reason hosts gave, each once, in order."""
    reasons = dict.fromkeys(r for c in candidates for r in c.reasons)
    return "; ".join(reasons) if reasons else "no other host in the cluster"


def mib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


# ---- a planner's working copy -----------------------------------------------------------------------------
class Layout:
    """Where each VM is while a planner works on its private copy (the snapshot stays as it was)."""

    def __init__(self, snapshot: Snapshot, weights: Weights = EVEN) -> None:
        self.snapshot = snapshot
        self.weights = weights
        self.where = {v.name: v.host for v in snapshot.vms}
        self.on_host: dict[str, set[str]] = {h.name: set() for h in snapshot.hosts}
        self.cpu = dict.fromkeys(snapshot.host, 0.0)
        self.mem = dict.fromkeys(snapshot.host, 0)
        self.moved: set[str] = set()  # moved by this plan
        self.times: dict[str, int] = {}  # how often each moved in this plan
        for v in snapshot.vms:
            self.on_host[v.host].add(v.name)
            if v.on:
                self.cpu[v.host] += v.cpu_demand
                self.mem[v.host] += v.memory

    def move(self, name: str, destination: str) -> None:
        vm = self.snapshot.vm[name]
        source = self.where[name]
        self.on_host[source].discard(name)
        self.on_host[destination].add(name)
        self.where[name] = destination
        self.moved.add(name)
        self.times[name] = self.times.get(name, 0) + 1
        if vm.on:
            self.cpu[source] -= vm.cpu_demand
            self.mem[source] -= vm.memory
            self.cpu[destination] += vm.cpu_demand
            self.mem[destination] += vm.memory

    def undo(self, name: str, source: str) -> None:
        """Take back the last move of `name` (it returns to `source`, as if it had not moved)."""
        self.move(name, source)
        self.times[name] -= 2
        if not self.times[name]:
            del self.times[name]
            self.moved.discard(name)

    def free(self, host: str) -> int:
        return self.snapshot.host[host].memory - self.mem[host]

    def load(self, host: str, cpu: float = 0.0, memory: int = 0) -> float:
        """The host's weighted load, with `cpu` cores and `memory` bytes more."""
        h = self.snapshot.host[host]
        return (self.weights.cpu * (self.cpu[host] + cpu) / h.cpus
                + self.weights.memory * (self.mem[host] + memory) / h.memory)

    def cpu_load(self, host: str, cpu: float = 0.0) -> float:
        return (self.cpu[host] + cpu) / self.snapshot.host[host].cpus

    def imbalance(self) -> float:
        values = [self.load(h.name) for h in self.snapshot.hosts if h.accepts]
        return statistics.pstdev(values) if len(values) > 1 else 0.0

    def mean(self) -> float:
        values = [self.load(h.name) for h in self.snapshot.hosts if h.accepts]
        return statistics.fmean(values) if values else 0.0
