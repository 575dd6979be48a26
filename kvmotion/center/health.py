"""Host health as a pure policy: the providers' reports -> the host's health -> the state it should be in.

Each provider (an external one through the API, built-in ones from run-queue wait, PSI, links) reports
per component ok / moderate / severe; the host's health is the worst report. Cluster policy, as
vSphere's Proactive HA: moderate -> quarantine (placed on last; DRS moves VMs off where others have
room), severe -> maintenance (evacuate: the host enters maintenance). Recovery clears what health set,
never what an admin set (an admin's maintenance stays until the admin ends it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmotion.center.cluster import Health
from kvmotion.center.placement import Status

RANK = {Health.OK: 0, Health.MODERATE: 1, Health.SEVERE: 2}


@dataclass(frozen=True)
class Report:
    provider: str  # "external", "cpu-contention", "memory-pressure", "link", ...
    component: str  # "psu", "cpu", "memory", "vm-net", "ds1", ...
    health: Health
    reason: str = ""


def overall(reports: Iterable[Report]) -> tuple[Health, tuple[str, ...]]:
    """The worst health reported, and a sentence for each report at that level."""
    reports = list(reports)
    worst = max((r.health for r in reports), key=RANK.__getitem__, default=Health.OK)
    why = tuple(f"{r.provider}: {r.component} {r.health.value}" + (f" ({r.reason})" if r.reason else "")
                for r in reports if r.health is worst and worst is not Health.OK)
    return worst, why


@dataclass(frozen=True)
class Transition:
    state: Status
    by_health: bool  # the new state is health's doing (recovery may clear it)
    sentence: str  # for the event; empty when nothing changes


def next_state(host: str, state: Status, by_health: bool, health: Health) -> Transition:
    """The state `host` should take for `health`; `by_health`: its present state was set by health."""
    stay = Transition(state, by_health, "")
    if state is Status.NOT_RESPONDING:
        return stay  # liveness owns it: a silent host reports no health
    admin = state in (Status.MAINTENANCE, Status.ENTERING_MAINTENANCE) and not by_health
    if admin:
        return stay
    if health is Health.SEVERE:
        if state in (Status.CONNECTED, Status.QUARANTINE):
            return Transition(Status.ENTERING_MAINTENANCE, True,
                              f"{host} reports a severe health fault: it enters maintenance (its VMs are evacuated)")
        return stay
    if health is Health.MODERATE:
        if state is Status.QUARANTINE:
            return stay
        return Transition(Status.QUARANTINE, True,
                          f"{host} reports a moderate health fault: quarantined (placed on last; DRS moves VMs off "
                          "where other hosts have room)")
    if state is Status.CONNECTED:
        return stay
    return Transition(Status.CONNECTED, False, f"{host} is healthy again: back from {state.value.replace('_', ' ')}")
