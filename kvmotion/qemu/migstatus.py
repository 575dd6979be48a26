"""Typed view of QEMU's `query-migrate`: the migration's status and its RAM counters.

Pure: timestamps come in with the samples (the caller's monotonic clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from kvmotion.core.errors import InvalidInput

DEFAULT_PAGE_SIZE = 4096


class MigrationStatus(str, Enum):
    """QEMU's MigrationStatus (qapi/migration.json); UNKNOWN stands for a value newer than us."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> MigrationStatus:
        # A newer QEMU may add states; a monitor must not crash on them.
        return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)

    @property
    def is_postcopy(self) -> bool:
        return self.value.startswith("postcopy")

    @property
    def is_switching_over(self) -> bool:
        """The source is paused (or about to be) for the final copy: too late to steer."""
        return self in (MigrationStatus.DEVICE, MigrationStatus.PRE_SWITCHOVER)


def _int(data: Mapping[str, object], key: str, default: int = 0) -> int:
    value = data.get(key)
    if value is None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"query-migrate field {key!r} is not a number: {value!r}") from exc


def _opt_int(data: Mapping[str, object], key: str) -> int | None:
    return _int(data, key) if data.get(key) is not None else None


@dataclass(frozen=True)
class RamStats:
    """QEMU's MigrationStats (the `ram` member of query-migrate). Counts are bytes unless named pages."""

    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0  # zero pages, sent as a flag
    normal: int = 0  # pages sent in full
    normal_bytes: int = 0
    dirty_pages_rate: int = 0  # pages/s, recomputed at syncs at least 1 s apart
    mbps: float = 0.0  # megabits/s over QEMU's last >= 100 ms window
    dirty_sync_count: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    pages_per_second: int = 0

    @property
    def dirty_rate(self) -> float:
        """Bytes the guest dirties per second (as QEMU last measured it)."""
        return float(self.dirty_pages_rate * self.page_size)

    @property
    def link_rate(self) -> float:
        """Bytes per second QEMU last measured on the migration stream."""
        return self.mbps * 1e6 / 8

    @staticmethod
    def from_qmp(data: Mapping[str, object]) -> RamStats:
        try:
            mbps = float(data.get("mbps") or 0.0)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"query-migrate field 'mbps' is not a number: {data.get('mbps')!r}") from exc
        return RamStats(
            transferred=_int(data, "transferred"),
            remaining=_int(data, "remaining"),
            total=_int(data, "total"),
            duplicate=_int(data, "duplicate"),
            normal=_int(data, "normal"),
            normal_bytes=_int(data, "normal-bytes"),
            dirty_pages_rate=_int(data, "dirty-pages-rate"),
            mbps=mbps,
            dirty_sync_count=_int(data, "dirty-sync-count"),
            precopy_bytes=_int(data, "precopy-bytes"),
            downtime_bytes=_int(data, "downtime-bytes"),
            postcopy_bytes=_int(data, "postcopy-bytes"),
            page_size=_int(data, "page-size", DEFAULT_PAGE_SIZE) or DEFAULT_PAGE_SIZE,
            pages_per_second=_int(data, "pages-per-second"),
        )


@dataclass(frozen=True)
class MigrationSample:
    """One `query-migrate` answer, stamped with the caller's clock (`at`, seconds, monotonic)."""

    status: MigrationStatus
    at: float | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    setup_time_ms: int | None = None
    cpu_throttle_percentage: int = 0  # QEMU's own auto-converge, not kvmotion's cgroup throttle
    ram: RamStats | None = None  # absent before the first pass starts
    error: str | None = None

    @property
    def time(self) -> float | None:
        """Seconds on the caller's clock if stamped, else QEMU's total-time."""
        if self.at is not None:
            return self.at
        return self.total_time_ms / 1000 if self.total_time_ms is not None else None

    @property
    def sync_count(self) -> int:
        return self.ram.dirty_sync_count if self.ram else 0

    @staticmethod
    def from_qmp(data: Mapping[str, object], at: float | None = None) -> MigrationSample:
        """Parse a query-migrate return value; every member is optional (QEMU omits most in setup)."""
        if not isinstance(data, Mapping):
            raise InvalidInput(f"query-migrate returned {type(data).__name__}, expected an object")
        ram = data.get("ram")
        if ram is not None and not isinstance(ram, Mapping):
            raise InvalidInput("query-migrate field 'ram' is not an object")
        error = data.get("error-desc")
        return MigrationSample(
            status=MigrationStatus(str(data.get("status", "none"))),
            at=at,
            total_time_ms=_opt_int(data, "total-time"),
            downtime_ms=_opt_int(data, "downtime"),
            expected_downtime_ms=_opt_int(data, "expected-downtime"),
            setup_time_ms=_opt_int(data, "setup-time"),
            cpu_throttle_percentage=_int(data, "cpu-throttle-percentage"),
            ram=RamStats.from_qmp(ram) if ram is not None else None,
            error=str(error) if error is not None else None,
        )
