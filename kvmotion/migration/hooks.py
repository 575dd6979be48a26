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

from kvmotion.api.spec import VmSpec
from kvmotion.qemu.qmp import Qmp
from kvmotion.storage import host as storage_host


@dataclass(frozen=True)
class SwitchoverContext:
    spec: VmSpec
    source: str
    destination: str
    migration_id: str
    source_qmp: Qmp  # the source QEMU's monitor (hooks run in the source agent)
    proto_nodes: list[str]  # current NBD node under each disk's format node "disk<i>" (mutable)


class SwitchoverHook(Protocol):
    name: str

    async def before_precopy(self, ctx: SwitchoverContext) -> None: ...

    async def before_switchover(self, ctx: SwitchoverContext) -> None: ...

    async def after_commit(self, ctx: SwitchoverContext) -> None: ...

    async def on_rollback(self, ctx: SwitchoverContext) -> None: ...


class DiskLeaseHook:
    """Moves every datastore disk's write lease to the destination (new generation, fencing the source)."""

    name = "disk-leases"

    def __init__(self) -> None:
        self.generations: dict[str, int] = {}  # what the source holds; the hand-over is conditional on it

    async def before_precopy(self, ctx: SwitchoverContext) -> None:
        # Read now, not in the pause. It changes only if the source loses its lease meanwhile,
        # and the hand-over is then refused, as it should be.
        self.generations = await asyncio.to_thread(storage_host.lease_generations, ctx.spec, ctx.source)

    async def before_switchover(self, ctx: SwitchoverContext) -> None:
        await asyncio.to_thread(storage_host.transfer_leases, ctx.spec, ctx.source, ctx.destination, self.generations)

    async def after_commit(self, ctx: SwitchoverContext) -> None:
        return None

    async def on_rollback(self, ctx: SwitchoverContext) -> None:
        await asyncio.to_thread(storage_host.take_back_leases, ctx.spec, ctx.destination, ctx.source)
        # The source's old NBD connections stay fenced (bound to the old generation): give
        # QEMU new ones, under the lease generation the source holds again, before it resumes.
        await storage_host.reattach_disks(ctx.spec, ctx.source, ctx.source_qmp, ctx.proto_nodes, ctx.migration_id[:8])


def default_hooks(spec: VmSpec) -> list[SwitchoverHook]:
    hooks: list[SwitchoverHook] = []
    if spec.on_datastore:
        hooks.append(DiskLeaseHook())
    return hooks
