"""Migration records: phases, options, check results, progress — the typed state both agents share."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvmotion.core.errors import InvalidInput


class Phase(str, Enum):
    """check -> prepare -> precopy -> switchover -> commit -> done; rollback from any phase before commit."""

    CHECK = "check"
    PREPARE = "prepare"
    PRECOPY = "precopy"
    SWITCHOVER = "switchover"
    COMMIT = "commit"
    DONE = "done"
    ROLLBACK = "rollback"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED, Phase.CANCELLED)

    @property
    def cancellable(self) -> bool:
        return self in (Phase.CHECK, Phase.PREPARE, Phase.PRECOPY, Phase.SWITCHOVER)


class Level(str, Enum):
    PASS = "pass"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    reason: str


@dataclass(frozen=True)
class MigrationOptions:
    """What the user may ask of one migration. Encryption is not among them: it is the cluster's
    policy (kvmotion.api.config), read by both agents."""

    max_downtime_ms: int = 500
    bandwidth: int = 0  # bytes/s cap on the stream; 0 = as fast as the link goes
    policy: str = "balanced"
    allow_postcopy: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_downtime_ms <= 60_000:
            raise InvalidInput(f"invalid maximum downtime {self.max_downtime_ms} ms: use 1 ms to 60 s")
        if self.bandwidth < 0:
            raise InvalidInput("invalid bandwidth: must be positive")

    @staticmethod
    def from_json(d: dict) -> MigrationOptions:
        """Stored options; records written before encryption became the cluster's policy carry an
        `encrypted` option, which is dropped here (the record's own `encrypted` says what happened)."""
        return MigrationOptions(**{k: v for k, v in d.items() if k != "encrypted"})


@dataclass(frozen=True)
class Progress:
    """The latest view of a running migration, for the live progress display."""

    round: int = 0
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    link_rate: float = 0.0  # bytes/s
    dirty_rate: float = 0.0  # bytes/s
    predicted_downtime_ms: float = 0.0
    downtime_limit_ms: int = 0
    throttle: float = 0.0
    elapsed: float = 0.0


@dataclass(frozen=True)
class Summary:
    """The end of a migration: what it cost and whether every check held."""

    total_ms: float
    downtime_ms: float | None  # QEMU's own figure
    pause_ms: float | None  # kvmotion's: source STOP event -> destination RESUME event
    setup_ms: float
    rounds: int
    bytes: int
    zero_pages: int
    normal_pages: int
    mean_link_rate: float
    peak_dirty_rate: float
    throttle_max: float
    encrypted: bool
    converged: bool
    postcopy: bool
    compression: str = "none"  # QEMU's multifd-compression (migration.policy.stream_compression)


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    vm: str
    source: str
    destination: str
    options: MigrationOptions
    phase: Phase
    started_at: float
    ended_at: float | None = None
    error: str | None = None
    checks: tuple[Check, ...] = ()
    progress: Progress = field(default_factory=Progress)
    summary: Summary | None = None
    phase_times: tuple[tuple[str, float], ...] = ()  # (phase, wall time entered)
    rounds: tuple[dict, ...] = ()  # per-round statistics (RoundStats JSON)
    encrypted: bool = True  # the stream went over TLS: the cluster's policy when the migration started


def record_from_json(d: dict) -> MigrationRecord:
    return MigrationRecord(
        id=d["id"], vm=d["vm"], source=d["source"], destination=d["destination"],
        options=MigrationOptions.from_json(d["options"]), phase=Phase(d["phase"]), started_at=d["started_at"],
        ended_at=d.get("ended_at"), error=d.get("error"),
        checks=tuple(Check(c["name"], Level(c["level"]), c["reason"]) for c in d.get("checks", ())),
        progress=Progress(**d.get("progress", {})),
        summary=Summary(**d["summary"]) if d.get("summary") else None,
        phase_times=tuple((p, t) for p, t in d.get("phase_times", ())),
        rounds=tuple(d.get("rounds", ())),
        # Older records kept it among the options (then the caller's choice).
        encrypted=bool(d.get("encrypted", d["options"].get("encrypted", True))),
    )
