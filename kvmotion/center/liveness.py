"""Host liveness as pure decisions: which hosts are silent, and what a heartbeat changes.

Level-triggered: `silent` looks at the current picture only (states and last heartbeats), so
running it again, or after a restart of the center, decides the same. Time spent with the center
down does not count as a host's silence: nobody was listening.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmotion.api.center import HostState


@dataclass(frozen=True)
class Seen:
    """What liveness needs to know of a host."""

    name: str
    state: HostState
    last_heartbeat: float | None  # None: never heard since it joined


def silent(now: float, listening_since: float, hosts: Iterable[Seen], limit: float) -> list[Seen]:
    """The connected hosts heard from neither within `limit` seconds before `now` nor since
    `listening_since` (when this center started): they become not responding."""
    out = []
    for host in hosts:
        if host.state is not HostState.CONNECTED:
            continue  # not responding already
        heard = max(host.last_heartbeat if host.last_heartbeat is not None else listening_since, listening_since)
        if now - heard > limit:
            out.append(host)
    return out


def after_heartbeat(state: HostState) -> HostState:
    """A heartbeat brings a not-responding host back (maintenance is a mode apart: HostMode)."""
    return HostState.CONNECTED if state is HostState.NOT_RESPONDING else state
