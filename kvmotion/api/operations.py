"""Wire models of what live migration is for: maintenance mode, DRS, rules and host health.

The center runs them (kvmotion.center.operations); these are the requests and answers of their
routes, and the calls for both center clients (`client.call(calls.enter_maintenance(...))`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, ClassVar

from pydantic import Field, StrictBool, StrictInt, model_validator

from kvmotion.api.center import Call, HealthReport, HostMode, Name, Severity, TaskView, Wire, path_name
from kvmotion.api.spec import NAME_PATTERN

RULE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
RuleName = Annotated[str, Field(pattern=RULE_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=300)]
RECOMMENDATION_PATTERN = r"^[0-9a-f]{12}$"


class MaintenanceRequest(Wire):
    _what: ClassVar[str] = "maintenance request"
    dry_run: StrictBool = False  # only the plan


class MaintenanceExit(Wire):
    _what: ClassVar[str] = "maintenance exit"
    move_back: StrictBool = False  # the VMs it held go back where they were, if they still fit
    dry_run: StrictBool = False


class Move(Wire):
    """One planned migration, with why, its place in the order and what it is predicted to cost."""

    vm: str
    source: str
    destination: str
    order: int
    why: str
    predicted_s: float | None = None
    predicted_downtime_ms: float | None = None
    powered_off: bool = False  # only its home changes: nothing runs


class Unmovable(Wire):
    vm: str
    reason: str


class Plan(Wire):
    host: str
    moves: tuple[Move, ...] = ()
    unmovable: tuple[Unmovable, ...] = ()
    predicted_s: float | None = None  # the whole plan, moves run under the center's limits


class MaintenanceAnswer(Wire):
    plan: Plan
    mode: HostMode
    tasks: tuple[TaskView, ...] = ()  # the migrations it queued (none on a dry run)


# ---- health -------------------------------------------------------------------------------------------------
class HealthEntry(Wire):
    host: str
    provider: str
    component: str
    severity: Severity
    reason: str
    at: float


class HostHealth(Wire):
    host: str
    severity: Severity  # the worst of its entries
    quarantined: bool
    entries: tuple[HealthEntry, ...] = ()


# ---- rules ----------------------------------------------------------------------------------------------------
class RuleKind(str, Enum):
    KEEP_TOGETHER = "keep-together"  # the VMs on one host
    KEEP_APART = "keep-apart"  # each VM on a host of its own
    VM_HOST = "vm-host"  # the VMs on the named host


class Strength(str, Enum):
    MUST = "must"  # never broken by a move; a violation is a mandatory move
    SHOULD = "should"  # DRS repairs it when it can


class RuleSpec(Wire):
    _what: ClassVar[str] = "rule"
    name: RuleName
    kind: RuleKind
    vms: Annotated[tuple[Name, ...], Field(min_length=1, max_length=64)]
    host: Name | None = None
    strength: Strength = Strength.MUST

    @model_validator(mode="after")
    def _shape(self) -> RuleSpec:
        if len(set(self.vms)) != len(self.vms):
            raise ValueError("a VM is named twice")
        if self.kind is RuleKind.VM_HOST:
            if self.host is None:
                raise ValueError("a vm-host rule names a host")
        else:
            if self.host is not None:
                raise ValueError(f"a {self.kind.value} rule names no host")
            if len(self.vms) < 2:
                raise ValueError(f"a {self.kind.value} rule names two VMs or more")
        return self


class RuleView(Wire):
    rule: RuleSpec
    created: float
    created_by: str
    violations: tuple[str, ...] = ()  # as the cluster is now


# ---- DRS --------------------------------------------------------------------------------------------------------
class Automation(str, Enum):
    """Who acts on DRS's decisions (as vSphere's levels): the center, or an operator."""

    MANUAL = "manual"  # recommendations only: a VM created without a host is refused, naming the host recommended
    PARTIAL = "partial"  # new VMs placed on their own; moves recommended
    FULL = "full"  # new VMs placed and moves applied on their own, every interval


class DrsConfig(Wire):
    _what: ClassVar[str] = "DRS configuration"
    # Partial by default: `vm create` without --host places the VM, and no VM moves unasked.
    automation: Automation = Automation.PARTIAL
    threshold: Annotated[StrictInt, Field(ge=1, le=5)] = 3  # 1: mandatory moves only; 5: the most aggressive
    interval: Annotated[float, Field(ge=10, le=86400)] = 300.0  # seconds between full automation's passes


class Recommendation(Wire):
    id: Annotated[str, Field(pattern=RECOMMENDATION_PATTERN)]
    move: Move
    mandatory: bool  # a rule, quarantine or maintenance asks for it
    gain: float  # imbalance removed x the gain's expected lifetime (s)
    cost: float  # the predicted migration (s)
    why: str


class DrsStatus(Wire):
    config: DrsConfig
    imbalance: float  # standard deviation of the hosts' normalized load
    target: float | None  # the imbalance the threshold tolerates (None: any; only mandatory moves)
    recommendations: tuple[Recommendation, ...] = ()
    loads: tuple[tuple[str, float], ...] = ()  # each host's normalized load
    notes: tuple[str, ...] = ()  # what it cannot fix, and why


class DrsApply(Wire):
    _what: ClassVar[str] = "DRS apply request"
    ids: Annotated[tuple[Annotated[str, Field(pattern=RECOMMENDATION_PATTERN)], ...], Field(max_length=1000)] = ()
    all: StrictBool = False

    @model_validator(mode="after")
    def _one(self) -> DrsApply:
        if self.all == bool(self.ids):
            raise ValueError("name recommendation ids or all, not both or neither")
        return self


class DrsApplied(Wire):
    tasks: tuple[TaskView, ...]
    skipped: tuple[str, ...] = ()  # ids no longer recommended, or refused, with why


# ---- calls (for CenterClient.call and AsyncCenterClient.call) ---------------------------------------------
def _host(name: str) -> str:
    return path_name(name, NAME_PATTERN, "host name")


def enter_maintenance(host: str, request: MaintenanceRequest) -> Call:
    return Call("POST", f"/v1/hosts/{_host(host)}/maintenance", MaintenanceAnswer, request)


def exit_maintenance(host: str, request: MaintenanceExit) -> Call:
    return Call("POST", f"/v1/hosts/{_host(host)}/maintenance/exit", MaintenanceAnswer, request)


def report_health(host: str, report: HealthReport) -> Call:
    return Call("POST", f"/v1/hosts/{_host(host)}/health", HostHealth, report)


def health(host: str) -> Call:
    return Call("GET", f"/v1/hosts/{_host(host)}/health", HostHealth)


def rules() -> Call:
    return Call("GET", "/v1/rules", list[RuleView])


def add_rule(rule: RuleSpec) -> Call:
    return Call("POST", "/v1/rules", RuleView, rule)


def remove_rule(name: str) -> Call:
    return Call("DELETE", f"/v1/rules/{path_name(name, RULE_PATTERN, 'rule name')}", None)


def drs() -> Call:
    return Call("GET", "/v1/drs", DrsStatus)


def configure_drs(config: DrsConfig) -> Call:
    return Call("PUT", "/v1/drs/config", DrsConfig, config)


def apply_drs(request: DrsApply) -> Call:
    return Call("POST", "/v1/drs/apply", DrsApplied, request)
