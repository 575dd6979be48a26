"""Which of an agent's beats carry the full report (kvmotion.host.heartbeat.beat and Cadence),
against a recording fake of the center's client: no network, an injected clock."""

from __future__ import annotations

import asyncio

from kvmotion.api.center import (
    PROTOCOL_VERSION,
    ActiveMigration,
    Alive,
    Heartbeat,
    HeartbeatAnswer,
    HostLoad,
    HostState,
    MigrationRole,
    ReportedState,
    VmReport,
    report_digest,
)
from kvmotion.host.heartbeat import Cadence, beat

WEB1 = (VmReport(name="web1", state=ReportedState.RUNNING),)


class FakeCenter:
    """Answers like the center: asks for the report while it does not know the digest."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.known: str | None = None

    async def alive(self, name: str, beat: Alive) -> HeartbeatAnswer:
        self.calls.append(f"alive {beat.seq}")
        return HeartbeatAnswer(state=HostState.CONNECTED, interval=2.0, now=0.0, report=beat.digest != self.known)

    async def heartbeat(self, name: str, beat: Heartbeat) -> HeartbeatAnswer:
        self.calls.append("full")
        self.known = beat.digest
        return HeartbeatAnswer(state=HostState.CONNECTED, interval=2.0, now=0.0)


def _beats(center: FakeCenter, cadence: Cadence, now: float, vms: tuple[VmReport, ...] = WEB1,
           migrations: tuple[ActiveMigration, ...] = ()) -> bool:
    async def full() -> Heartbeat:
        return Heartbeat(version=PROTOCOL_VERSION, digest=report_digest(vms, migrations), vms=vms,
                         load=HostLoad(cpus=1, memory_total=1, memory_available=1), migrations=migrations)

    _, was_full = asyncio.run(beat(center, "host-a", cadence, vms, migrations, full, 20.0, now))  # type: ignore[arg-type]
    return was_full


def test_full_report_first_on_change_on_request_and_every_interval() -> None:
    center, cadence = FakeCenter(), Cadence()
    assert _beats(center, cadence, 0.0)  # the first beat
    assert not _beats(center, cadence, 2.0) and not _beats(center, cadence, 4.0)
    assert center.calls == ["full", "alive 2", "alive 3"]
    # What it observes changed: a VM's state, then a migration.
    assert _beats(center, cadence, 6.0, (VmReport(name="web1", state=ReportedState.PAUSED),))
    moving = ActiveMigration(id="0123456789ab", vm="web1", role=MigrationRole.SOURCE, peer="host-b", phase="precopy")
    assert _beats(center, cadence, 8.0, WEB1, (moving,))
    assert not _beats(center, cadence, 10.0, WEB1, (moving,))
    # The center lost the digest (it restarted): it asks, the same beat sends the report.
    center.known = None
    assert _beats(center, cadence, 12.0, WEB1, (moving,))
    assert center.calls[-2:] == ["alive 7", "full"]
    # Nothing changed for report_interval seconds: a full report anyway (fresh load).
    assert not _beats(center, cadence, 31.9, WEB1, (moving,))
    assert _beats(center, cadence, 32.0, WEB1, (moving,))


def test_the_digest_covers_vms_specs_and_migrations() -> None:
    base = report_digest(WEB1, ())
    assert base == report_digest(WEB1, ()) and len(base) == 64
    assert base != report_digest((VmReport(name="web1", state=ReportedState.RUNNING, spec_hash="0" * 64),), ())
    assert base != report_digest((), ())
    moving = ActiveMigration(id="0123456789ab", vm="web1", role=MigrationRole.SOURCE, peer="host-b", phase="precopy")
    assert report_digest(WEB1, (moving,)) != report_digest(WEB1, (moving.model_copy(update={"phase": "done"}),))
