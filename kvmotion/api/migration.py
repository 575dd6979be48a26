"""Migration records: phases, options, check results, progress — the typed state both agents share;
the versioned messages the source and destination agents exchange; and the request that starts (or
checks) a migration at its source agent, as the center and the CLI send it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmotion.api.spec import VmSpec
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
class Forecast:
    """What kvmotion.migration.predict expected before the move, and the inputs it assumed: kept
    beside the summary so that predicted and actual can be compared, and the model recalibrated."""

    duration_ms: float  # request -> done
    total_ms: float  # QEMU total-time
    downtime_ms: float
    rounds: int
    bytes: int
    converged: bool
    memory: int
    zero_fraction: float
    dirty_rate: float  # bytes/s measured on the source before the move
    working_set: int | None
    link_rate: int | None  # bytes/s, the source's egress towards the destination
    compression: str
    samples: int  # past migrations the calibration drew on (0: the model's defaults)


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
    link_rate: int | None = None  # bytes/s the source measured towards the destination (None: unknown)
    forecast: Forecast | None = None


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
        link_rate=d.get("link_rate"),
        forecast=Forecast(**d["forecast"]) if d.get("forecast") else None,
    )


# ---- agent-to-agent messages (source -> destination: POST /v1/incoming) -------------------------------
MID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # migration ids (12 hex digits from the source agent)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"  # VM and host names as the migration routes accept them


class Compression(str, Enum):
    """QEMU's multifd-compression, as both ends must set it alike."""

    NONE = "none"
    ZSTD = "zstd"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProtocolVersion(_Wire):
    """The agents' migration protocol. A new major version changes what a message means (refused by
    an agent of another major); a new minor only adds what an older peer may ignore."""

    major: int = Field(ge=0, le=1000)
    minor: int = Field(ge=0, le=1000)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


PROTOCOL = ProtocolVersion(major=2, minor=0)  # 1: an integer `version` and the stream settings fixed in code


class StreamCapabilities(_Wire):
    """What one end can do for the stream: at most `multifd_channels` parallel connections (0: no
    multifd), and the compression methods it can use, most preferred first."""

    multifd_channels: int = Field(ge=0, le=64)
    compression: tuple[Compression, ...] = Field(min_length=1)

    def accept(self, offer: StreamCapabilities) -> StreamSettings:
        """The settings both ends can use (self: this end's own): the fewer channels, and the offer's
        most preferred compression that this end also has (`none` when nothing else is shared)."""
        shared = [c for c in offer.compression if c in self.compression]
        return StreamSettings(multifd_channels=min(self.multifd_channels, offer.multifd_channels),
                              compression=shared[0] if shared else Compression.NONE)


class StreamSettings(_Wire):
    """The stream both QEMUs are set up for: what the destination accepted of the source's offer."""

    multifd_channels: int = Field(ge=0, le=64)
    compression: Compression = Compression.NONE

    def within(self, offer: StreamCapabilities) -> bool:
        """Whether these settings are something `offer` allowed (the source checks the answer)."""
        return self.multifd_channels <= offer.multifd_channels and (
            self.compression is Compression.NONE or self.compression in offer.compression)


class IncomingRequest(_Wire):
    """Source agent -> destination agent: prepare a shadow VM for migration `migration_id`."""

    protocol: ProtocolVersion = Field(description="Migration protocol version of the source agent")
    migration_id: str = Field(pattern=MID_PATTERN)
    source: str = Field(pattern=NAME_PATTERN, description="The source host: must be the caller")
    spec: VmSpec
    postcopy: bool = False
    offer: StreamCapabilities = Field(description="What the source can do for the stream")

    @model_validator(mode="before")
    @classmethod
    def _major_first(cls, data: object) -> object:
        """A peer of another major version is refused for that, before any field it may lack or add."""
        if isinstance(data, dict):
            theirs = data.get("protocol")
            if "protocol" not in data and isinstance(data.get("version"), int):
                theirs = {"major": data["version"], "minor": 0}  # protocol 1 sent an integer `version`
            if isinstance(theirs, dict) and isinstance(theirs.get("major"), int) and theirs["major"] != PROTOCOL.major:
                raise ValueError(f"migration protocol {theirs['major']}.{theirs.get('minor', 0)} is not spoken here "
                                 f"(this agent speaks {PROTOCOL.major}.x): run the same kvmotion major version on both hosts")
        return data


class IncomingAnswer(_Wire):
    protocol: ProtocolVersion = Field(description="Migration protocol version of the destination agent")
    uri: str = Field(description="Where the source's QEMU sends the stream")
    stream: StreamSettings = Field(description="The stream the destination's QEMU expects")


class CommitAnswer(_Wire):
    resumed_at: float = Field(description="When the VM resumed here (QMP RESUME event, wall clock)")


# ---- a user (the CLI, the center as center:NAME) -> the source agent ---------------------------------
_DEFAULTS = MigrationOptions()


class OptionsBody(_Wire):
    """What a user may ask of a migration (MigrationOptions on the wire). Not encryption: that is the
    cluster's policy."""

    max_downtime_ms: int = Field(_DEFAULTS.max_downtime_ms, ge=1, le=60_000, description="Downtime budget (ms)")
    bandwidth: int = Field(_DEFAULTS.bandwidth, ge=0, description="Cap on the stream in bytes/s; 0: the link's speed")
    policy: str = Field(_DEFAULTS.policy, description="Convergence policy, by name; the agent refuses one it does not know")
    allow_postcopy: bool = Field(_DEFAULTS.allow_postcopy, description="Switch to post-copy if pre-copy cannot converge")

    @staticmethod
    def of(options: MigrationOptions) -> OptionsBody:
        return OptionsBody(max_downtime_ms=options.max_downtime_ms, bandwidth=options.bandwidth, policy=options.policy,
                           allow_postcopy=options.allow_postcopy)

    def options(self) -> MigrationOptions:
        return MigrationOptions(max_downtime_ms=self.max_downtime_ms, bandwidth=self.bandwidth, policy=self.policy,
                                allow_postcopy=self.allow_postcopy)


class MigrationRequest(_Wire):
    """Migrate (or check migrating) a VM of this host to another host of the cluster inventory. Sent by
    users, not peers: it carries no protocol version (the agent's API is versioned with kvmotion)."""

    vm: str = Field(pattern=NAME_PATTERN, description="VM on this host")
    destination: str = Field(pattern=NAME_PATTERN, description="Destination host, as named in the cluster inventory")
    options: OptionsBody = Field(default_factory=OptionsBody)
