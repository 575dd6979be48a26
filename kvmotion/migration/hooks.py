"""Switchover hooks: what kvmotion hands over outside QEMU while the source's vCPUs are stopped.

Order matters and is fixed here: hooks run in list order before switchover, and in reverse on
rollback. The network needs no hook at switchover: the destination's TAP joined its port group
when the shadow VM started, its MAC is announced at commit, and the source's TAP goes with the
source QEMU after commit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from kvmotion.qemu.spec import VmSpec


@dataclass(frozen=True)
class SwitchoverContext:
    spec: VmSpec
    source: str
    destination: str
    migration_id: str


class SwitchoverHook(Protocol):
    name: str

    async def before_switchover(self, ctx: SwitchoverContext) -> None: ...

    async def after_commit(self, ctx: SwitchoverContext) -> None: ...

    async def on_rollback(self, ctx: SwitchoverContext) -> None: ...


class DiskLeaseHook:
    """Moves every datastore disk's write lease to the destination (new generation, fencing the source)."""

    name = "disk-leases"

    async def before_switchover(self, ctx: SwitchoverContext) -> None:
        from kvmotion.storage.host import transfer_leases

        await asyncio.to_thread(transfer_leases, ctx.spec, ctx.source, ctx.destination)

    async def after_commit(self, ctx: SwitchoverContext) -> None:
        return None

    async def on_rollback(self, ctx: SwitchoverContext) -> None:
        from kvmotion.storage.host import transfer_leases

        await asyncio.to_thread(transfer_leases, ctx.spec, ctx.destination, ctx.source)


def default_hooks(spec: VmSpec) -> list[SwitchoverHook]:
    hooks: list[SwitchoverHook] = []
    if any(d.datastore for d in spec.disks):
        hooks.append(DiskLeaseHook())
    return hooks
