"""Per-round statistics and the summary of a migration, from QEMU's `query-migrate` samples
(kvmotion.qemu.migstatus).

A *round* is one dirty-sync iteration: QEMU sends the pages dirty in its bitmap, then syncs the
bitmap again (ram.dirty-sync-count increments). Round 1 is the first full pass over guest RAM.
Everything here is pure: timestamps come in with the samples (the caller's monotonic clock).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmotion.core.errors import InvalidInput
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus, RamStats

# Below this a round's own bytes/time is too noisy (sync pauses, tick jitter): fall back to
# QEMU's rate, which it measures over windows of at least 100 ms.
_MIN_ROUND_WALL = 0.1


@dataclass(frozen=True)
class RoundStats:
    """One round (or several short ones seen between two samples), derived from two samples.

    `first_round`..`round` are the dirty-sync iterations that ended between the samples; round 1
    is the first full pass. `remaining` is measured just after the sync that ended `round`, so
    `predicted_downtime` is the pause QEMU would need if it switched over now.
    """

    round: int
    first_round: int
    started_at: float  # s, caller's clock (or QEMU total-time)
    wall_time: float  # s
    bytes_sent: int
    link_rate: float  # bytes/s measured over the round (wire bytes)
    dirty_rate: float  # bytes/s = dirty-pages-rate x page size (estimated while QEMU has none)
    remaining: int  # bytes pending after the sync
    throttle: float  # fraction of vCPU time taken away while the round ran (0..1)
    page_rate: float = 0.0  # bytes/s of pages moved over the round: above link_rate when compressed

    @property
    def syncs(self) -> int:
        return self.round - self.first_round + 1

    @property
    def predicted_downtime(self) -> float:
        """Seconds to send what is pending at the measured link rate (inf when nothing moves)."""
        if self.remaining <= 0:
            return 0.0
        return self.remaining / self.link_rate if self.link_rate > 0 else math.inf

    @property
    def dirty_to_link(self) -> float:
        """How much faster the guest dirties than the link carries (SDPS's test is > 1)."""
        if self.link_rate <= 0:
            return math.inf if self.dirty_rate > 0 else 0.0
        return self.dirty_rate / self.link_rate

    @staticmethod
    def between(start: MigrationSample, end: MigrationSample, throttle: float = 0.0) -> RoundStats:
        """The round(s) from `start` (first sample of a round) to `end` (first sample after its sync)."""
        if start.ram is None or end.ram is None or start.time is None or end.time is None:
            raise InvalidInput("a round needs two samples with ram statistics and a time")
        if end.ram.dirty_sync_count <= start.ram.dirty_sync_count:
            raise InvalidInput(
                f"no round ended between the samples (dirty-sync-count {start.ram.dirty_sync_count} "
                f"-> {end.ram.dirty_sync_count})"
            )
        wall = max(0.0, end.time - start.time)
        sent = max(0, end.ram.transferred - start.ram.transferred)
        rate = sent / wall if wall >= _MIN_ROUND_WALL and sent > 0 else end.ram.link_rate
        pages = max(0, end.ram.normal - start.ram.normal) * end.ram.page_size
        dirty = end.ram.dirty_rate
        if dirty <= 0 and wall >= _MIN_ROUND_WALL:
            # QEMU measures its dirty rate over >= 1 s periods: a first pass shorter than that
            # reports 0, which would hide a fast writer until a second round was spent. What the
            # sync found pending was dirtied during the round: its rate is a lower bound.
            dirty = end.ram.remaining / wall
        return RoundStats(
            round=end.ram.dirty_sync_count - 1,
            first_round=start.ram.dirty_sync_count,
            started_at=start.time,
            wall_time=wall,
            bytes_sent=sent,
            link_rate=rate,
            page_rate=rate * max(1.0, pages / sent) if sent > 0 else rate,
            dirty_rate=dirty,
            remaining=end.ram.remaining,
            throttle=max(throttle, end.cpu_throttle_percentage / 100),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RoundStats:
        try:
            return RoundStats(
                round=int(data["round"]),
                first_round=int(data["first_round"]),
                started_at=float(data["started_at"]),
                wall_time=float(data["wall_time"]),
                bytes_sent=int(data["bytes_sent"]),
                link_rate=float(data["link_rate"]),
                dirty_rate=float(data["dirty_rate"]),
                remaining=int(data["remaining"]),
                throttle=float(data["throttle"]),
                page_rate=float(data.get("page_rate", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed round statistics: {exc}") from exc


@dataclass(frozen=True)
class RoundTracker:
    """Folds samples into rounds. Immutable: `observe` returns the next tracker and the round it closed."""

    round_start: MigrationSample | None = None  # first sample seen in the current round
    last: MigrationSample | None = None
    rounds: tuple[RoundStats, ...] = ()
    throttle_max: float = 0.0  # largest throttle seen (ours or QEMU's), fraction
    throttle_in_round: float = 0.0  # largest throttle seen during the current round

    @property
    def latest_round(self) -> RoundStats | None:
        return self.rounds[-1] if self.rounds else None

    def observe(self, sample: MigrationSample, throttle: float = 0.0) -> tuple[RoundTracker, RoundStats | None]:
        """Add a sample; `throttle` is the vCPU throttle kvmotion had in force (fraction)."""
        throttle = max(throttle, sample.cpu_throttle_percentage / 100)
        throttle_max = max(self.throttle_max, throttle)
        if sample.ram is None or sample.time is None:
            return dataclasses.replace(self, last=sample, throttle_max=throttle_max), None
        start = self.round_start
        in_round = max(self.throttle_in_round, throttle)
        if start is None or start.ram is None or start.time is None:
            return RoundTracker(sample, sample, self.rounds, throttle_max, throttle), None
        if sample.ram.dirty_sync_count <= start.ram.dirty_sync_count:
            return RoundTracker(start, sample, self.rounds, throttle_max, in_round), None
        closed = RoundStats.between(start, sample, in_round)
        return RoundTracker(sample, sample, (*self.rounds, closed), throttle_max, throttle), closed

    def summary(self) -> MigrationStats:
        if self.last is None:
            raise InvalidInput("no query-migrate sample was recorded")
        return MigrationStats.from_samples(self.last, self.rounds, self.throttle_max)


@dataclass(frozen=True)
class MigrationStats:
    """What a finished (or failed) migration cost, for reports and `--json` output."""

    status: MigrationStatus
    total_time: float  # s, QEMU total-time
    setup_time: float  # s
    downtime: float | None  # s, as QEMU reports it (None unless completed)
    memory: int  # guest RAM bytes
    bytes_transferred: int
    precopy_bytes: int
    downtime_bytes: int
    postcopy_bytes: int
    zero_pages: int
    normal_pages: int
    page_size: int
    rounds: int  # dirty-sync iterations
    mean_link_rate: float  # bytes/s over the iterative phase
    peak_dirty_rate: float  # bytes/s, largest seen at a round's end
    throttle_max: float  # fraction
    error: str | None = None
    round_log: tuple[RoundStats, ...] = ()

    @staticmethod
    def from_samples(
        final: MigrationSample, rounds: tuple[RoundStats, ...] = (), throttle_max: float = 0.0
    ) -> MigrationStats:
        ram = final.ram or RamStats()
        total = (final.total_time_ms or 0) / 1000
        setup = (final.setup_time_ms or 0) / 1000
        iterating = total - setup - (final.downtime_ms or 0) / 1000
        return MigrationStats(
            status=final.status,
            total_time=total,
            setup_time=setup,
            downtime=final.downtime_ms / 1000 if final.downtime_ms is not None else None,
            memory=ram.total,
            bytes_transferred=ram.transferred,
            precopy_bytes=ram.precopy_bytes,
            downtime_bytes=ram.downtime_bytes,
            postcopy_bytes=ram.postcopy_bytes,
            zero_pages=ram.duplicate,
            normal_pages=ram.normal,
            page_size=ram.page_size,
            rounds=ram.dirty_sync_count,
            mean_link_rate=ram.precopy_bytes / iterating if iterating > 0 else ram.link_rate,
            peak_dirty_rate=max([r.dirty_rate for r in rounds] + [ram.dirty_rate]),
            throttle_max=max(throttle_max, final.cpu_throttle_percentage / 100),
            error=final.error,
            round_log=rounds,
        )

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["round_log"] = [r.to_json() for r in self.round_log]
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> MigrationStats:
        try:
            fields = {f.name for f in dataclasses.fields(MigrationStats)}
            unknown = set(data) - fields
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            values = dict(data)
            values["status"] = MigrationStatus(str(values["status"]))
            values["round_log"] = tuple(RoundStats.from_json(r) for r in values.get("round_log", ()))
            stats = MigrationStats(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed migration statistics: {exc}") from exc
        return stats
