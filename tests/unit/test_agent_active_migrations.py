"""What a joined agent's heartbeat reports of its migrations: those it drives, unfinished, and the
shadows it holds for other hosts' migrations (a service over a real VmManager, no QEMU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvmotion.api.center import ActiveMigration, MigrationRole
from kvmotion.api.migration import MigrationOptions, MigrationRecord, Phase
from kvmotion.api.spec import VmSpec
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.migration.engine import MigrationService
from kvmotion.migration.protocol import ShadowPhase, ShadowState
from kvmotion.qemu.accel import Accel, AccelChoice
from tests.joinedroot import make_root, serve_in_test


def test_active_migrations(tmp_path: Path, monkeypatch) -> None:
    serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a"))  # joined, no peers yet
    manager = VmManager(HostConfig(name="host-a", state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                                   portgroups={"vm-net": "br0"}, accel=AccelChoice(Accel.TCG, "test")))
    svc = MigrationService(manager, "127.0.0.1")
    asyncio.run(manager.create(VmSpec(name="web1", memory=256 << 20)))
    asyncio.run(manager.create(VmSpec(name="db1", memory=256 << 20), incoming_migration="bbbbbbbbbbbb"))
    asyncio.run(manager.create(VmSpec(name="old1", memory=256 << 20), incoming_migration="cccccccccccc"))
    svc.incoming_sources.remember("bbbbbbbbbbbb", "host-c")
    svc.destination.shadows["bbbbbbbbbbbb"] = ShadowState(ShadowPhase.WAITING)
    svc.destination.shadows["cccccccccccc"] = ShadowState(ShadowPhase.STALE)  # left from before: not under way

    def record(mid: str, phase: Phase) -> MigrationRecord:
        return MigrationRecord(id=mid, vm="web1", source="host-a", destination="host-b", options=MigrationOptions(),
                               phase=phase, started_at=1.0)

    svc.records.add(record("aaaaaaaaaaaa", Phase.PRECOPY))
    svc.records.add(record("dddddddddddd", Phase.DONE))
    assert svc.active_migrations() == [
        ActiveMigration(id="aaaaaaaaaaaa", vm="web1", role=MigrationRole.SOURCE, peer="host-b", phase="precopy"),
        ActiveMigration(id="bbbbbbbbbbbb", vm="db1", role=MigrationRole.DESTINATION, peer="host-c", phase="incoming"),
    ]
