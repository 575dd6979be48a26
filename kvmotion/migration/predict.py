"""Pure prediction of a live migration's duration and downtime, calibrated on the cluster's history.

The model replays what the source does (kvmotion.migration.source) on a fluid picture of the
guest and the stream, and lets the real convergence policy (kvmotion.migration.policy) steer it:

- The stream moves page bytes at a *page rate*: what the link carries divided by the compression
  ratio, or what the CPU compresses / encrypts, whichever is lower. Its first pass also walks
  every page of guest RAM (zero pages cost a check, not a send): a cost per GiB.
- The guest dirties `dirty_rate` bytes/s of distinct pages, never more than its working set per
  round; a throttle-able (CPU-bound) writer dirties in proportion to the vCPU share left to it.
- QEMU's switchover test (migration.c): at the end of a round it syncs the bitmap and switches
  over once what is pending fits in page rate x downtime limit; the pause is pending / page rate
  plus a fixed cost (device state, resume).
- Every 100 ms (the source's tick) and after every round, `policy.tick` sees the same statistics
  the source would feed it and its actions (downtime ramp, vCPU throttle, give up) are applied.

Calibration (`calibrate`) fits the few free numbers from past migrations with medians:
per stream class (link rate, compression, TLS), the page rate and the per-GiB walk cost as a
Theil–Sen line through (page bytes, pre-copy time) per GiB of guest; the compression ratio; the
fixed setup, switchover, pause, prepare and commit costs. Without history, `ModelParams()`
holds defaults taken from bench/README.md's runs on 2-core TCG hosts. Where the history holds at
least MIN_ALIKE migrations alike the one asked about (`corrected`), their outcome corrects the
replay's: the replay gives the shape, the cluster's own runs the level.

"Downtime" for the planners is the guest's pause (source stopped -> destination resumed), not
QEMU's figure, which ends before the destination has loaded the stream's tail.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvmotion.api.migration import Compression, MigrationRecord, Phase
from kvmotion.core.errors import InvalidInput
from kvmotion.migration import policy as pol
from kvmotion.migration.stats import RoundStats
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus, RamStats

GIB = 1 << 30
PAGE = 4096
TICK = 0.1  # s between the source's policy ticks (kvmotion.migration.source.TICK)
_MAX_TICKS = 200_000  # a bound on the replay; the policy's completion timeout ends it long before
_MIN_ROUND_WALL = 0.1  # below this QEMU's dirty rate is a longer average, not the round's own


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Guest:
    """What is known of the VM before its move (measured by its host, or by its last migration)."""

    memory: int  # bytes of guest RAM
    zero_fraction: float = 0.0  # share of guest pages that are zero (sent as a flag)
    dirty_rate: float = 0.0  # bytes/s of pages the guest dirties, unthrottled
    working_set: int | None = None  # bytes the writer keeps rewriting (None: all of the non-zero RAM)
    throttleable: bool = True  # the writer is CPU-bound: its rate follows the vCPU share left

    def __post_init__(self) -> None:
        if self.memory <= 0:
            raise InvalidInput(f"invalid guest memory {self.memory}: must be positive")
        if not 0 <= self.zero_fraction <= 1:
            raise InvalidInput(f"invalid zero-page fraction {self.zero_fraction}: use 0..1")
        if self.dirty_rate < 0 or not math.isfinite(self.dirty_rate):
            raise InvalidInput(f"invalid dirty rate {self.dirty_rate}: use a finite rate >= 0")
        if self.working_set is not None and self.working_set < 0:
            raise InvalidInput(f"invalid working set {self.working_set}: must be >= 0")

    @property
    def nonzero(self) -> float:
        return self.memory * (1 - self.zero_fraction)


@dataclass(frozen=True)
class Route:
    """The stream between two hosts: the source's egress rate towards the destination, TLS."""

    link_rate: int | None  # bytes/s; None when the source cannot tell (then nothing is compressed)
    encrypted: bool = True
    postcopy: bool = False  # post-copy allowed: no multifd, so no compression

    def __post_init__(self) -> None:
        if self.link_rate is not None and self.link_rate <= 0:
            raise InvalidInput(f"invalid link rate {self.link_rate}: must be positive")

    @property
    def compression(self) -> Compression:
        """What the source will choose (the same pure function it calls)."""
        return pol.stream_compression(self.link_rate, self.postcopy)


@dataclass(frozen=True)
class StreamClass:
    """Migrations whose stream is alike: history is pooled per class."""

    link_rate: int | None
    compression: Compression
    encrypted: bool

    def __str__(self) -> str:
        link = "unknown link" if self.link_rate is None else f"{self.link_rate * 8 / 1e9:g} Gbit/s"
        return f"{link}, {self.compression.value}, {'TLS' if self.encrypted else 'plain'}"


def stream_class(route: Route) -> StreamClass:
    return StreamClass(_link_class(route.link_rate), route.compression, route.encrypted)


def _link_class(rate: int | None) -> int | None:
    """Link rates to 3 significant digits: a shaper's 1gbit and a NIC's 1000Mb/s are one class."""
    if rate is None:
        return None
    unit = 10 ** max(0, math.floor(math.log10(rate)) - 2)
    return math.floor(rate / unit + 0.5) * unit


# ------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Throughput:
    """What one stream class moves."""

    page_rate: float  # bytes/s of non-zero guest pages
    wire_ratio: float  # wire bytes per page byte (1 uncompressed; zstd 0.15-0.25 on the lab's guests)
    walk_per_gib: float  # s per GiB of guest RAM for the first pass's walk (zero checks, syncs)
    samples: int = 0  # migrations it was fitted on (0: defaults)


# Defaults without history (bench/README.md, 2-core TCG hosts): uncompressed, the sender is CPU-bound
# near 0.5 GB/s of pages; zstd level 1 compresses ~0.2 GB/s of pages to a quarter.
DEFAULT_RAW_RATE = 500e6
DEFAULT_ZSTD_RATE = 200e6
DEFAULT_ZSTD_RATIO = 0.25
DEFAULT_WALK_PER_GIB = 0.1
LINK_EFFICIENCY = 0.95  # payload share of a TCP stream over a shaped link


def default_throughput(cls: StreamClass) -> Throughput:
    zstd = cls.compression is Compression.ZSTD
    ratio = DEFAULT_ZSTD_RATIO if zstd else 1.0
    cpu = DEFAULT_ZSTD_RATE if zstd else DEFAULT_RAW_RATE
    rate = cpu if cls.link_rate is None else min(cpu, cls.link_rate * LINK_EFFICIENCY / ratio)
    return Throughput(page_rate=rate, wire_ratio=ratio, walk_per_gib=DEFAULT_WALK_PER_GIB)


@dataclass(frozen=True)
class FixedCosts:
    """Seconds every migration pays whatever its size."""

    setup: float = 0.005  # QEMU's setup-time (plain); the TLS handshake adds to it
    setup_tls: float = 0.08
    switchover: float = 0.005  # the pause beyond sending what is pending: device state, resume
    pending_share: float = 1.0  # share of the replay's pending-at-switchover time seen in QEMU's downtime
    # The guest's own downtime (source STOP -> destination RESUME) as its own line: QEMU's downtime
    # ends once the source has written its last byte, while the destination still reads and loads
    # the stream's tail (10-30 ms on the lab's TCG hosts), longer the more was pending.
    pause_base: float = 0.015
    pause_share: float = 1.0
    prepare: float = 0.15  # request -> `migrate`: checks, the shadow VM, the hooks
    finish: float = 0.05  # QEMU completed -> done: lease hand-over, commit


# What a prediction reports, in seconds: request -> done, QEMU's total-time, the guest's pause, QEMU's downtime.
TIMES = ("duration", "total", "pause", "downtime")
MIN_ALIKE = 3  # past migrations alike a new one before their outcome corrects the replay's
ALIKE_RATIO = 1.5  # alike: the same stream class, memory and dirty rate within this factor
IDLE_RATE = 1e6  # bytes/s: dirty rates below this are alike whatever their ratio


@dataclass(frozen=True)
class Past:
    """A past migration beside what the calibrated replay says of it."""

    stream: StreamClass
    memory: int
    dirty_rate: float
    throttleable: bool
    replayed: tuple[float, ...] | None  # TIMES as replayed; None when the replay did not converge
    actual: tuple[float | None, ...]  # TIMES as measured (None: not recorded)

    def alike(self, guest: Guest, stream: StreamClass) -> bool:
        def near(a: float, b: float) -> bool:
            return max(a, b) <= ALIKE_RATIO * min(a, b)
        idle = self.dirty_rate < IDLE_RATE and guest.dirty_rate < IDLE_RATE
        rates = idle or near(self.dirty_rate, guest.dirty_rate)
        return (self.stream == stream and self.throttleable == guest.throttleable and near(self.memory, guest.memory)
                and rates)


@dataclass(frozen=True)
class ModelParams:
    fixed: FixedCosts = field(default_factory=FixedCosts)
    classes: tuple[tuple[StreamClass, Throughput], ...] = ()
    samples: int = 0  # migrations the calibration used
    past: tuple[Past, ...] = ()  # the history, for corrections by alike migrations

    def throughput(self, cls: StreamClass) -> Throughput:
        """The fitted figures of `cls`, else of a class with the same compression and TLS (the
        nearest link rate), else the defaults."""
        known = dict(self.classes)
        if cls in known:
            return known[cls]
        alike = [(c, t) for c, t in self.classes if c.compression is cls.compression and c.encrypted == cls.encrypted]
        if cls.link_rate is None or not alike:
            return default_throughput(cls)
        link = cls.link_rate
        near, th = min(alike, key=lambda ct: abs(math.log((ct[0].link_rate or link) / link)))
        if near.link_rate is not None and near.link_rate > link:
            # a slower link than any seen: the link, not the CPU, bounds the page rate
            th = dataclasses.replace(th, page_rate=min(th.page_rate, link * LINK_EFFICIENCY / th.wire_ratio))
        return th


# ----------------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Prediction:
    """The predicted migration, with everything it assumed."""

    converged: bool
    duration: float  # s, request -> done (what a planner waits for)
    total: float  # s, `migrate` -> completed (QEMU's total-time)
    downtime: float  # s, QEMU's downtime
    pause: float  # s, source stopped -> destination resumed
    rounds: int  # dirty-sync iterations
    page_bytes: int  # non-zero page bytes sent (re-sends included)
    bytes: int  # wire bytes
    throttle_max: float
    reason: str | None  # why it would not converge (the policy's words), or post-copy
    guest: Guest
    route: Route
    compression: Compression
    throughput: Throughput
    fixed: FixedCosts
    policy: str
    alike: int = 0  # past migrations alike this one whose outcome corrected the replay's times

    @property
    def basis(self) -> str:
        """Where the times come from, in a few words."""
        return f"replay corrected by {self.alike} alike past migrations" if self.alike else "replay of the policy"


# ---------------------------------------------------------------------------------------- the model


def predict(guest: Guest, route: Route, params: ModelParams | None = None,
            config: pol.PolicyConfig | None = None) -> Prediction:
    """Replay the migration of `guest` over `route` under `config` (the balanced preset by default);
    when at least MIN_ALIKE past migrations were alike it, their outcome corrects the replay's."""
    params = params or ModelParams()
    return corrected(replay(guest, route, params, config), params.past)


def corrected(p: Prediction, past: Sequence[Past]) -> Prediction:
    """Each time as the median over alike past migrations of their actual x (this replay / theirs):
    what the replay misses for such a migration (a writer the throttle slows more than linearly, pages
    that compress less than the class's median) it misses alike for all of them. If the replay says
    it will not converge but alike migrations did, they are the better evidence."""
    stream = stream_class(p.route)
    alike = [x for x in past if x.alike(p.guest, stream)]
    if len(alike) < MIN_ALIKE:
        return p
    mine = _times(p) if p.converged else None
    times = []
    for i in range(len(TIMES)):
        vals = []
        for x in alike:
            a, r = x.actual[i], x.replayed
            if a is not None:
                vals.append(a * mine[i] / r[i] if mine and r and r[i] > 0 else a)
        times.append(statistics.median(vals) if vals else (mine[i] if mine else 0.0))
    duration, total, pause, downtime = times
    return dataclasses.replace(p, converged=True, reason=p.reason if p.converged else None, alike=len(alike),
                               duration=duration, total=total, pause=pause, downtime=downtime)


def _times(p: Prediction) -> tuple[float, float, float, float]:
    """A prediction's TIMES."""
    return p.duration, p.total, p.pause, p.downtime


def replay(guest: Guest, route: Route, params: ModelParams, config: pol.PolicyConfig | None = None) -> Prediction:
    """The replay alone (no correction by past migrations)."""
    return _priced(_simulate(guest, route, params, config), params.fixed)


def _simulate(guest: Guest, route: Route, params: ModelParams, config: pol.PolicyConfig | None) -> _Replay:
    """The replay run to its end; of the fixed costs only the setup enters it (`_priced` adds the rest)."""
    config = config or pol.preset("balanced")
    if route.postcopy != config.allow_postcopy:
        config = dataclasses.replace(config, allow_postcopy=route.postcopy)
    sim = _Replay(guest, params.throughput(stream_class(route)), config, route)
    sim.run(params.fixed.setup_tls if route.encrypted else params.fixed.setup)
    return sim


def _priced(sim: _Replay, fixed: FixedCosts) -> Prediction:
    """The prediction of a finished replay under `fixed` (whose setup the replay ran with)."""
    guest, route, th, config = sim.guest, sim.route, sim.th, sim.config
    pending = sim.final_pending / th.page_rate  # s to send what is pending at the switchover
    stopped = sim.converged or sim.postcopy
    downtime = fixed.pending_share * pending + fixed.switchover if stopped else 0.0
    total = sim.t + downtime
    if sim.postcopy:  # the rest moves once, on demand and in the background, after a short pause
        total += sim.left / th.page_rate
    page_bytes = sim.sent + (sim.final_pending if sim.converged else 0.0)
    return Prediction(
        converged=sim.converged,
        duration=fixed.prepare + total + fixed.finish,
        total=total,
        downtime=downtime,
        pause=fixed.pause_share * pending + fixed.pause_base if stopped else 0.0,
        rounds=sim.round,
        page_bytes=round(page_bytes),
        bytes=round(page_bytes * th.wire_ratio),
        throttle_max=sim.throttle_max,
        reason=sim.reason,
        guest=guest,
        route=route,
        compression=route.compression,
        throughput=th,
        fixed=fixed,
        policy=config.name,
    )


class _Replay:
    """The fluid replay: time, pending bytes and dirtied bytes advance piecewise between events
    (a round's end, a policy tick)."""

    def __init__(self, guest: Guest, th: Throughput, config: pol.PolicyConfig, route: Route) -> None:
        if th.page_rate <= 0 or th.wire_ratio <= 0:
            raise InvalidInput(f"invalid stream throughput {th}: rates must be positive")
        self.guest, self.th, self.config, self.route = guest, th, config, route
        cap = guest.nonzero if guest.working_set is None else guest.working_set
        self.cap = max(0.0, min(float(cap), float(guest.memory)))
        self.decision = pol.start(config, guest.memory)
        self.limit = self.decision.state.downtime_ms / 1000
        self.throttle = 0.0
        self.throttle_max = 0.0
        self.t = 0.0
        self.round = 1  # dirty-sync count - 1: the round being sent
        self.sent = 0.0  # page bytes sent so far
        self.converged = False
        self.postcopy = False
        self.reason: str | None = None
        self.final_pending = 0.0
        self.left = 0.0
        self.last_round: RoundStats | None = None

    def _dirty_rate(self) -> float:
        g = self.guest
        return g.dirty_rate * (1 - self.throttle) if g.throttleable else g.dirty_rate

    def run(self, setup: float) -> None:
        g, th = self.guest, self.th
        walk = th.walk_per_gib * g.memory / GIB
        # The first pass sends the non-zero pages and checks the rest: its own, slower, page rate.
        first_rate = g.nonzero / (g.nonzero / th.page_rate + walk) if g.nonzero > 0 else th.page_rate
        self.t = setup
        todo, dirtied, rate = g.nonzero, 0.0, first_rate
        round_start, round_sent = self.t, 0.0
        next_tick = TICK * math.ceil(self.t / TICK + 1e-9)
        for _ in range(_MAX_TICKS):
            t_sync = self.t + todo / rate
            if t_sync <= next_tick:  # the round ends: QEMU syncs the bitmap and tests the switchover
                self.sent += todo
                dirtied = min(self.cap, dirtied + self._dirty_rate() * (t_sync - self.t))
                round_sent += todo
                self.t = t_sync
                wall = self.t - round_start
                measured = dirtied / wall if wall >= _MIN_ROUND_WALL else self._dirty_rate()
                self.last_round = RoundStats(
                    round=self.round, first_round=self.round, started_at=round_start, wall_time=wall,
                    bytes_sent=int(round_sent * th.wire_ratio), link_rate=rate * th.wire_ratio,
                    dirty_rate=measured, remaining=int(dirtied), throttle=self.throttle, page_rate=rate,
                )
                if dirtied <= th.page_rate * self.limit:
                    self.converged, self.final_pending = True, dirtied
                    return
                self.round += 1
                todo, dirtied, rate = dirtied, 0.0, th.page_rate
                round_start, round_sent = self.t, 0.0
                continue
            dt = next_tick - self.t
            self.sent += rate * dt
            todo -= rate * dt
            round_sent += rate * dt
            dirtied = min(self.cap, dirtied + self._dirty_rate() * dt)
            self.t = next_tick
            next_tick += TICK
            if self._tick(todo + dirtied, rate):
                self.left = todo + dirtied
                return
        raise InvalidInput(f"the migration replay did not end within {_MAX_TICKS * TICK:.0f} s")

    def _tick(self, remaining: float, rate: float) -> bool:
        """One policy tick; True when the policy ends pre-copy (gives up or starts post-copy)."""
        ram = RamStats(remaining=int(remaining), total=self.guest.memory, dirty_sync_count=self.round,
                       dirty_pages_rate=int(self._dirty_rate() / PAGE), mbps=rate * self.th.wire_ratio * 8 / 1e6)
        sample = MigrationSample(status=MigrationStatus.ACTIVE, at=self.t, ram=ram)
        self.decision = pol.tick(self.config, self.decision.state, pol.Observation(self.t, sample, self.last_round))
        for action in self.decision.actions:
            if isinstance(action, pol.SetDowntimeLimit):
                self.limit = action.ms / 1000
            elif isinstance(action, pol.SetThrottle):
                self.throttle = action.fraction
                self.throttle_max = max(self.throttle_max, action.fraction)
            elif isinstance(action, pol.StartPostcopy):
                self.postcopy, self.reason = True, f"post-copy: {action.reason}"
                return True
            elif isinstance(action, pol.Abort):
                self.reason = action.reason
                return True
        return False


# ---------------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class Observed:
    """One finished migration as the calibration needs it: its inputs and what it cost."""

    guest: Guest
    route: Route
    compression: Compression
    total: float  # s, QEMU total-time
    setup: float  # s, QEMU setup-time
    downtime: float  # s, QEMU's
    page_bytes: int  # normal pages x page size
    wire_bytes: int
    pause: float | None = None  # s, kvmotion's stop -> resume
    prepare: float | None = None  # s, request -> pre-copy
    duration: float | None = None  # s, request -> done

    @property
    def stream_class(self) -> StreamClass:
        return StreamClass(_link_class(self.route.link_rate), self.compression, self.route.encrypted)

    @property
    def precopy(self) -> float:
        """Seconds QEMU spent sending pages before the switchover."""
        return max(0.0, self.total - self.setup - self.downtime)


def observed_from_record(rec: MigrationRecord, guest: Guest | None = None) -> Observed | None:
    """A finished, converged record as an observation (None for any other). The record holds what
    the source measured at the start (`forecast`) when it made one; otherwise `guest` says what the
    guest did, or the summary's peak dirty rate stands for it."""
    s = rec.summary
    if rec.phase is not Phase.DONE or s is None or not s.converged or s.downtime_ms is None:
        return None
    f = rec.forecast
    memory = f.memory if f else (s.zero_pages + s.normal_pages) * PAGE
    if guest is None:
        if f is not None:
            guest = Guest(memory=f.memory, zero_fraction=f.zero_fraction, dirty_rate=f.dirty_rate,
                          working_set=f.working_set)
        elif memory > 0:
            guest = Guest(memory=memory, zero_fraction=min(1.0, s.zero_pages * PAGE / memory),
                          dirty_rate=s.peak_dirty_rate)
        else:
            return None
    times = dict(rec.phase_times)
    start = times.get(Phase.CHECK.value, rec.started_at)
    precopy_at = times.get(Phase.PRECOPY.value)
    done_at = times.get(Phase.DONE.value, rec.ended_at)
    return Observed(
        guest=guest,
        route=Route(link_rate=rec.link_rate, encrypted=rec.encrypted, postcopy=rec.options.allow_postcopy),
        compression=Compression(s.compression),
        total=s.total_ms / 1000,
        setup=s.setup_ms / 1000,
        downtime=s.downtime_ms / 1000,
        page_bytes=s.normal_pages * PAGE,
        wire_bytes=s.bytes,
        pause=s.pause_ms / 1000 if s.pause_ms is not None else None,
        prepare=precopy_at - start if precopy_at is not None else None,
        duration=done_at - start if done_at is not None else None,
    )


# ------------------------------------------------------------------------------------ calibration


def theil_sen(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(slope, intercept) of the median line through `points`: the median of the pairwise slopes,
    then the median intercept. None when no two points differ in x."""
    slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.combinations(points, 2) if x2 != x1]
    if not slopes:
        return None
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * x for x, y in points)


def _fit_class(cls: StreamClass, obs: Sequence[Observed], paused: Callable[[Observed], float]) -> Throughput:
    """Page rate and walk cost from pre-copy time = walk x GiB + page bytes / rate, fitted per GiB
    of guest (so guests of several sizes line up); the compression ratio as a median. `paused(o)`:
    the share of o's page bytes sent in its pause (not in the pre-copy time)."""
    base = default_throughput(cls)
    ratios = [o.wire_bytes / o.page_bytes for o in obs if o.page_bytes > 0 and o.wire_bytes > 0]
    ratio = statistics.median(ratios) if ratios else base.wire_ratio
    pts = [((o.page_bytes - paused(o)) / (o.guest.memory / GIB), o.precopy / (o.guest.memory / GIB))
           for o in obs if o.precopy > 0]
    line = theil_sen(pts) if len(pts) >= 2 else None
    if line is not None and line[0] > 0:
        slope, walk = line
        if walk < 0:  # no sign of a walk cost: all of the time goes to the pages
            walk = 0.0
            slope = statistics.median(y / x for x, y in pts if x > 0)
        return Throughput(page_rate=1 / slope, wire_ratio=ratio, walk_per_gib=walk, samples=len(obs))
    # One point (or no spread): keep the default walk cost, the rest of the time is the pages'.
    rates = [x / (y - base.walk_per_gib) for x, y in pts if x > 0 and y > base.walk_per_gib]
    rate = statistics.median(rates) if rates else base.page_rate
    return Throughput(page_rate=rate, wire_ratio=ratio, walk_per_gib=base.walk_per_gib, samples=len(obs))


def _median(xs: Iterable[float | None], default: float) -> float:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return max(0.0, statistics.median(vals)) if vals else default


def calibrate(history: Iterable[Observed], config: pol.PolicyConfig | None = None) -> ModelParams:
    """Fit the model's free numbers to past migrations (defaults for whatever history lacks).

    Twice: the page rate is fitted on the pre-copy time, which excludes the pause, so the page
    bytes sent in the pause ((downtime - switchover) x page rate) come off once both are known."""
    obs = list(history)
    if not obs:
        return ModelParams()
    d = FixedCosts()
    by_class: dict[StreamClass, list[Observed]] = {}
    for o in obs:
        by_class.setdefault(o.stream_class, []).append(o)
    plain = [o.setup for o in obs if not o.route.encrypted]
    tls = [o.setup for o in obs if o.route.encrypted]
    fixed = dataclasses.replace(
        d,
        setup=_median(plain, d.setup),
        setup_tls=_median(tls, d.setup_tls),
        prepare=_median((o.prepare for o in obs), d.prepare),
        finish=_median((o.duration - o.prepare - o.total if o.duration is not None and o.prepare is not None
                        else None for o in obs), d.finish),
        switchover=0.0,
        pending_share=1.0,
    )
    params = ModelParams(fixed=fixed, classes=(), samples=len(obs))
    for _ in range(2):
        rates = {c: params.throughput(c).page_rate for c in by_class} if params.classes else {}
        switchover = params.fixed.switchover

        def paused(o: Observed, rates: dict[StreamClass, float] = rates, sw: float = switchover) -> float:
            rate = rates.get(o.stream_class)
            return max(0.0, o.downtime - sw) * rate if rate else 0.0

        classes = tuple((c, _fit_class(c, os, paused)) for c, os in sorted(by_class.items(), key=lambda kv: str(kv[0])))
        bare = dataclasses.replace(params.fixed, switchover=0.0, pending_share=1.0)
        params = dataclasses.replace(params, classes=classes, fixed=bare)
        # QEMU's downtime and the guest's pause: each a fixed part plus a share of the time the
        # replay says the pending pages take (bare: exactly that time).
        sims = [_simulate(o.guest, o.route, params, config) for o in obs]
        pending = [_priced(sim, bare).downtime for sim in sims]
        share, switchover = _pending_line([(x, o.downtime) for x, o in zip(pending, obs, strict=True)], d.switchover)
        pause_share, pause_base = _pending_line(
            [(x, o.pause) for x, o in zip(pending, obs, strict=True) if o.pause is not None], d.pause_base)
        params = dataclasses.replace(params, fixed=dataclasses.replace(
            bare, switchover=switchover, pending_share=share, pause_base=pause_base, pause_share=pause_share))
    past = []
    for o, sim in zip(obs, sims, strict=True):  # the last pass's replays: only the fixed costs changed since
        r = _priced(sim, params.fixed)
        past.append(Past(o.stream_class, o.guest.memory, o.guest.dirty_rate, o.guest.throttleable,
                         _times(r) if r.converged else None,
                         (o.duration, o.total, o.pause, o.downtime)))
    return dataclasses.replace(params, past=tuple(past))


def _pending_line(pts: Sequence[tuple[float, float]], default: float) -> tuple[float, float]:
    """(share, fixed) of a median line through (replayed pending time, observed); with no rising
    relation (or a share over 2: the pause sends slower than pre-copy) just the median, no share."""
    line = theil_sen(pts) if len(pts) >= 2 else None
    if line is not None and 0 < line[0] <= 2 and line[1] >= 0:
        return line
    return 0.0, _median((y for _, y in pts), default)


# ------------------------------------------------------------------------------------ planner API


Cost = Callable[[Guest, Route], float]


@dataclass
class Predictor:
    """Calibrated once, asked many times (a planner's cost function): predictions are cached per
    (guest, route), which repeat across a plan's candidate moves."""

    params: ModelParams = field(default_factory=ModelParams)
    config: pol.PolicyConfig = field(default_factory=lambda: pol.preset("balanced"))
    _cache: dict[tuple[Guest, Route], Prediction] = field(default_factory=dict, repr=False)

    @staticmethod
    def from_history(history: Iterable[Observed], config: pol.PolicyConfig | None = None) -> Predictor:
        config = config or pol.preset("balanced")
        return Predictor(calibrate(history, config), config)

    def predict(self, guest: Guest, route: Route) -> Prediction:
        key = (guest, route)
        if key not in self._cache:
            self._cache[key] = predict(guest, route, self.params, self.config)
        return self._cache[key]

    def seconds(self, guest: Guest, route: Route) -> float:
        """Predicted seconds from request to done; infinite when it would not converge."""
        p = self.predict(guest, route)
        return p.duration if p.converged else math.inf

    def cost(self, guest_of: Callable[[str], Guest], route_of: Callable[[str, str], Route]) -> Callable[[str, str, str], float]:
        """`cost(vm, src, dst)` in seconds, for a planner that names VMs and hosts."""
        return lambda vm, src, dst: self.seconds(guest_of(vm), route_of(src, dst))
