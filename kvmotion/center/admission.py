"""Migration admission as a pure decision: which queued migrations may start now.

Like vSphere's vMotion costs: a migration costs 1 on its source and 1 on its destination; a host's
budget is `migration_budget_slow` (4) on a migration link under 10 Gbit/s and
`migration_budget_fast` (8) at 10 Gbit/s or more; at most `cluster_migrations` run in the cluster.

Fairness is FIFO per host: queued migrations are looked at oldest first, and one that must wait
holds its hosts for the younger ones (a younger migration never overtakes an older one that shares
a host with it), so a migration between busy hosts is not starved by a stream of others; younger
migrations between other hosts still go. The cluster limit is strict FIFO: once it is reached,
nothing younger starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmotion.api.center import ClusterSettings

FAST_LINK_BPS = 10_000_000_000
COST = 1  # what one migration costs on each of its two hosts


@dataclass(frozen=True)
class Move:
    """A migration, queued or running: what admission needs of it."""

    task: str
    source: str
    destination: str


@dataclass(frozen=True)
class Decision:
    task: str
    admitted: bool
    reason: str  # why it waits (empty when admitted)


def host_budget(link_bps: int | None, settings: ClusterSettings) -> int:
    """A host's migration budget from its link speed (the cluster's default link when unknown)."""
    speed = link_bps if link_bps is not None else settings.link_bps
    return settings.migration_budget_fast if speed >= FAST_LINK_BPS else settings.migration_budget_slow


def admit(queued: Sequence[Move], running: Sequence[Move], budgets: Mapping[str, int],
          cluster_limit: int) -> list[Decision]:
    """A decision for each queued migration, in the order given (oldest first). `budgets`: each
    host's budget; a host missing from it (gone, not responding) has none, so its migrations wait."""
    used: dict[str, int] = {}
    for move in running:
        for host in (move.source, move.destination):
            used[host] = used.get(host, 0) + COST
    active = len(running)
    held: set[str] = set()  # hosts an older waiting migration holds
    out = []
    for move in queued:
        hosts = (move.source, move.destination)
        reason = ""
        if active >= cluster_limit:
            reason = f"the cluster runs {active} of {cluster_limit} migrations"
        else:
            for host in hosts:
                budget = budgets.get(host, 0)
                if budget == 0:
                    reason = f"{host} takes no migrations now (not connected)"
                    break
                if used.get(host, 0) + COST > budget:
                    reason = f"{host} runs {used.get(host, 0)} of {budget} migrations"
                    break
                if host in held:
                    reason = f"an older migration waits for {host}"
                    break
        if reason:
            held.update(hosts)
            out.append(Decision(move.task, False, reason))
            continue
        for host in hosts:
            used[host] = used.get(host, 0) + COST
        active += 1
        out.append(Decision(move.task, True, ""))
    return out
