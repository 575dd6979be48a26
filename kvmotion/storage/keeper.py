"""A host agent's lease keeper: renew its disks' leases every TTL/3, report the ones it lost.

    keeper = LeaseKeeper(client, "host-a", ttl=client.info().lease_ttl, on_lost=stop_vm_of)
    t0 = keeper.now(); lease = client.acquire("web1.img", "web1"); keeper.keep(lease, t0)

`client` acts for host-a (its certificate names it), so renewals name no host.
    task = asyncio.create_task(keeper.run())

A lease is lost when a renewal is refused (another host has it, it expired, it moved to another
generation) or when renewals kept failing (datastore unreachable) past the lease's expiry: the
datastore already refuses that VM's writes, so `on_lost(disk)` should stop the VM. Expiry is
tracked on this host's monotonic clock from the moment the last successful request was *sent*,
which is never later than the datastore's own deadline; the hosts' wall clocks need not agree.
After a `transfer()` away from this host, call `forget(disk)` so it is not reported as lost.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from kvmotion.api.disks import Lease
from kvmotion.core.errors import KvmotionError, LeaseError

log = logging.getLogger(__name__)


class Renewer(Protocol):
    """What the keeper needs of a DatastoreClient (sync or async `renew`)."""

    def renew(self, disk: str) -> Lease | Awaitable[Lease]: ...


@dataclass(frozen=True)
class Held:
    lease: Lease
    deadline: float  # keeper clock; the lease is surely expired on the datastore after this


class LeaseKeeper:
    def __init__(
        self,
        client: Renewer,
        host: str,
        ttl: float,
        on_lost: Callable[[str], object],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.host = host
        self.ttl = ttl
        self.interval = ttl / 3
        self.on_lost = on_lost
        self._clock = clock
        self._sleep = sleep
        self._held: dict[str, Held] = {}

    def now(self) -> float:
        return self._clock()

    def keep(self, lease: Lease, requested_at: float | None = None) -> None:
        """Start renewing `lease`; `requested_at` = now() taken before acquire/transfer was sent."""
        if lease.host != self.host:
            raise LeaseError(f"lease on {lease.disk} belongs to {lease.host}, not to {self.host}")
        start = self._clock() if requested_at is None else requested_at
        self._held[lease.disk] = Held(lease, start + self.ttl)

    def forget(self, disk: str) -> None:
        self._held.pop(disk, None)

    def held(self) -> list[Lease]:
        return [h.lease for h in self._held.values()]

    async def renew_once(self) -> list[str]:
        """One round over every held lease; returns the disks lost in this round."""
        lost: list[str] = []
        for disk, held in list(self._held.items()):
            sent = self._clock()
            try:
                if inspect.iscoroutinefunction(self.client.renew):
                    lease = await self.client.renew(disk)
                else:  # a blocking HTTP call must not stall the agent's event loop
                    lease = await asyncio.to_thread(self.client.renew, disk)  # type: ignore[arg-type]
            except LeaseError as exc:
                reason = str(exc)
            except KvmotionError as exc:  # unreachable, timeout: fine until the lease would expire
                if self._clock() < held.deadline:
                    log.warning("renewing the lease on %s failed, will retry: %s", disk, exc)
                    continue
                reason = f"the lease expired while renewals failed ({exc})"
            else:
                if self._held.get(disk) is not held:  # forgotten or replaced meanwhile
                    continue
                if lease.generation != held.lease.generation or lease.host != self.host:
                    reason = f"the lease moved to {lease.host} generation {lease.generation}"
                else:
                    self._held[disk] = Held(lease, sent + self.ttl)
                    continue
            if self._held.get(disk) is not held:
                continue
            del self._held[disk]
            lost.append(disk)
            log.error("lost the write lease on %s: %s", disk, reason)
            await self._report(disk)
        return lost

    async def _report(self, disk: str) -> None:
        try:
            result = self.on_lost(disk)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the agent's callback must not kill the keeper
            log.exception("on_lost(%s) failed", disk)

    async def run(self) -> None:
        """Renew forever (cancel the task to stop)."""
        while True:
            await self.renew_once()
            await self._sleep(self.interval)
