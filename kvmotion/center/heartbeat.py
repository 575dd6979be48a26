"""The heartbeat controller: every tick, hosts silent for longer than the settings allow become
not responding (with an event; their VMs' observed state becomes unknown). Full reports bring hosts
back (Store.record_heartbeat). The decision is liveness.silent; this is its loop. Alive beats the
center noted in memory (Center.alive_in_memory) are written to the store first, in one transaction.

Run under the center's TaskGroup (app.lifespan) until `stop` is set: every wait is bounded (a tick
by `tick_timeout`, the pause between ticks by `interval`), a failed tick is logged and the next
one decides again from the current picture, cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from kvmotion.center.liveness import Seen, silent
from kvmotion.center.store import Store

log = logging.getLogger("kvmotion.center")


class Liveness(Protocol):
    """Where Alive beats wait for the store (kvmotion.center.service.Center)."""

    def take_heard(self) -> dict[str, float]: ...

    def forget(self, name: str) -> None: ...


class HeartbeatController:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time, interval: float = 0.5,
                 tick_timeout: float = 10.0) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.tick_timeout = tick_timeout
        self.listening_since = clock()  # silence counts from here, not from before this center ran
        self.liveness: Liveness | None = None  # create_app sets it

    def decide(self, now: float) -> list[Seen]:
        hosts = [Seen(h.name, h.state, h.last_heartbeat) for h in self.store.hosts()]
        return silent(now, self.listening_since, hosts, self.store.settings().not_responding_after)

    def tick_sync(self) -> list[str]:
        """One pass: the hosts this tick marked not responding."""
        if self.liveness is not None:
            heard = self.liveness.take_heard()
            if heard:
                self.store.record_alive_many(heard)
        now = self.clock()
        marked = [h.name for h in self.decide(now) if self.store.mark_not_responding(h.name, h.last_heartbeat, now)]
        for name in marked:
            if self.liveness is not None:
                self.liveness.forget(name)
        return marked

    async def tick(self) -> list[str]:
        async with asyncio.timeout(self.tick_timeout):
            return await asyncio.to_thread(self.tick_sync)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                marked = await self.tick()
                if marked:
                    log.warning("not responding: %s", ", ".join(marked))
            except TimeoutError:
                log.warning("heartbeat check took over %.0f s (is the store's disk stalled?); trying again", self.tick_timeout)
            except Exception:  # the next tick decides again from the current picture
                log.exception("heartbeat check failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await stop.wait()
