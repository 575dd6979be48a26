"""Pure pre-copy convergence policy: downtime schedule, vCPU throttling, post-copy or abort.

Like Nova's migration monitor (a downtime ramp, a completion timeout) and vSphere's SDPS (slow
the vCPUs only while the guest dirties memory as fast as the link carries it, or while rounds
make no progress on a pause that would not fit the budget anyway). No I/O and no
clock: the caller feeds an `Observation` every 100-250 ms and after each new round, applies the
returned actions, and passes the returned state back in next time.

Why these defaults (see shared/README.md):
- QEMU switches over once pending <= bandwidth x downtime-limit. An idle guest still re-dirties
  ~1-1.5 % of its RAM, so QEMU's 300 ms default lets it pause for ~200 ms (2 GiB, 1 Gbit); with
  a 30 ms limit the same migration paused for 1 ms. So the schedule starts at 30 ms and only
  rises when the guest keeps QEMU from getting there.
- The ramp is geometric: each step multiplies the pending bytes QEMU accepts at switchover by
  the same factor, spending more time at the low limits where most guests converge.
- The ramp starts after the first full pass: before it, pending is most of RAM and no limit
  can be met, while a limit raised early would make QEMU settle for a longer pause later.
- The budget (500 ms) is vSphere's switchover goal and Nova's maximum downtime.
- Throttle levels halve the CPU share left to vCPUs (0.2, 0.6, 0.8, 0.9, 0.95): the dirty
  rate of a CPU-bound writer scales with its CPU share, so each step halves it. 95 % is the
  largest fraction whose CFS period stays <= 20 ms with the 1 ms minimum quota (measured
  largest stall 20-75 ms on this HZ=250 kernel, see kvmotion/host/throttle.py) and it is what
  made a guest dirtying 1 GB/s converge over 1 Gbit in 3.4 s; QEMU's own auto-converge goes
  to 99 % and stalls vCPUs ~1 s at a time.
- Convergence assist (ThrottleConfig.assist_*): with a 30 ms start, each round a guest still
  dirtying a good share r of the link re-sends r of the last one, so the low limit costs about
  r/(1-r) x the pause it saves. Throttling such a guest from the end of the first pass pays that
  back; above 60 % the client saw gaps over issue 3's 50 ms bar, hence the cap (figures:
  bench/README.md, "What was tuned" and "Stream settings").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

from kvmotion.api.migration import Compression
from kvmotion.core.errors import InvalidInput
from kvmotion.migration.stats import RoundStats
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus

GIB = 1 << 30
MIB = 1 << 20


# ---------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SetDowntimeLimit:
    """migrate-set-parameters downtime-limit (milliseconds)."""

    ms: int


@dataclass(frozen=True)
class SetThrottle:
    """Take this fraction of CPU time away from every vCPU (0 = release, 0.95 = 5 % left)."""

    fraction: float

    @property
    def percent(self) -> float:
        return self.fraction * 100


@dataclass(frozen=True)
class StartPostcopy:
    """migrate-start-postcopy (the postcopy-ram capability must have been set before migrate)."""

    reason: str


@dataclass(frozen=True)
class Abort:
    """migrate_cancel: the VM keeps running on the source."""

    reason: str


Action = SetDowntimeLimit | SetThrottle | StartPostcopy | Abort


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ThrottleConfig:
    """When and how hard to slow the vCPUs (SDPS-like: only while dirty rate > link rate)."""

    enabled: bool = True
    # Throttle when dirty rate >= this x link rate. Not 1.0: QEMU counts a page once per sync,
    # so a guest rewriting its working set faster than a round sends it *measures* at about the
    # link rate, never above it (seen on the lab: 119 MB/s dirty on a 120 MB/s link).
    trigger_ratio: float = 0.95
    trigger_rounds: int = 2  # ...for this many consecutive rounds before the first step
    initial: float = 0.2  # first level
    share_factor: float = 0.5  # each further level keeps this share of the vCPU time left
    max: float = 0.95  # cap
    jump: bool = False  # True: go straight to the level the measured rates call for
    target_ratio: float = 0.5  # with jump: aim for dirty rate <= this x link rate
    release_ratio: float = 0.5  # step down when one level lower would keep dirty <= this x link
    release_rounds: int = 2
    settle: float = 1.0  # s after a change before judging it: QEMU's dirty rate is a >= 1 s average
    # Convergence assist: a guest that dirties at least `assist_ratio` x what the link carries
    # (unthrottled) makes each round re-send that share of the last one, so the pause shrinks
    # slowly and every round the low downtime limit asks for costs time. From the end of the
    # first pass, such a guest goes straight to the lowest level that keeps it under
    # `assist_target` x link (at most `assist_max` or `max`; see the module notes): the
    # last rounds then shrink fast, and the migration ends sooner *and* with a shorter pause
    # than QEMU's 300 ms limit gives an unthrottled guest (bench/README.md). 0 turns it off.
    assist_ratio: float = 0.25
    assist_target: float = 0.1
    assist_max: float = 0.6

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.max < 1:
            raise InvalidInput(
                f"invalid throttle levels: need 0 < initial ({self.initial}) <= max ({self.max}) < 1"
            )
        if not 0 < self.share_factor < 1:
            raise InvalidInput(f"invalid throttle share factor {self.share_factor}: use a value in (0, 1)")
        if self.trigger_ratio <= 0 or not 0 < self.release_ratio < self.trigger_ratio:
            raise InvalidInput(
                f"invalid throttle ratios: need 0 < release ({self.release_ratio}) < trigger ({self.trigger_ratio})"
            )
        if self.trigger_rounds < 1 or self.release_rounds < 1:
            raise InvalidInput("throttle trigger and release need at least 1 round")
        if not 0 < self.target_ratio <= self.trigger_ratio:
            raise InvalidInput(f"invalid throttle target ratio {self.target_ratio}: use (0, trigger ratio]")
        if self.assist_ratio < 0 or not 0 < self.assist_target or (
            self.assist_ratio and not self.assist_target < self.assist_ratio
        ):
            raise InvalidInput(
                f"invalid throttle assist ratios: need 0 < target ({self.assist_target}) < ratio "
                f"({self.assist_ratio}), or ratio 0 (off)"
            )
        if not 0 < self.assist_max < 1:
            raise InvalidInput(f"invalid throttle assist cap {self.assist_max}: use a fraction in (0, 1)")

    def levels(self) -> tuple[float, ...]:
        """(0.0, initial, ..., max): each level keeps `share_factor` of the previous CPU share."""
        out = [0.0, self.initial]
        while out[-1] < self.max:
            nxt = 1 - (1 - out[-1]) * self.share_factor
            # Fold a last sliver into the cap rather than add a near-duplicate level.
            out.append(self.max if nxt >= self.max or (self.max - nxt) < 0.02 else round(nxt, 4))
        return tuple(out)


@dataclass(frozen=True)
class PolicyConfig:
    """A convergence policy. Downtimes in ms (as QEMU takes them), durations in seconds."""

    name: str = "balanced"
    max_downtime_ms: int = 500  # the budget: the schedule never goes above it
    start_downtime_ms: int = 30
    downtime_steps: int = 10
    step_interval_per_gib: float = 4.0  # s between steps per GiB of guest RAM (Nova: 75)
    step_interval_min: float = 1.0
    completion_timeout_per_gib: float = 150.0  # KubeVirt's figure (Nova: 800)
    completion_timeout_min: float = 60.0
    allow_postcopy: bool = False
    give_up_rounds: int = 4  # stuck rounds at full budget and throttle before giving up (0 = never)
    min_progress: float = 0.1  # a round that cuts the predicted downtime by less is not progress
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)

    def __post_init__(self) -> None:
        if self.max_downtime_ms < 1 or self.start_downtime_ms < 1:
            raise InvalidInput(
                f"invalid downtime limits {self.start_downtime_ms}/{self.max_downtime_ms} ms: use at least 1 ms"
            )
        if self.downtime_steps < 0:
            raise InvalidInput(f"invalid downtime step count {self.downtime_steps}: use 0 or more")
        if min(self.step_interval_per_gib, self.step_interval_min) < 0:
            raise InvalidInput("downtime step intervals cannot be negative")
        if self.completion_timeout_per_gib <= 0 and self.completion_timeout_min <= 0:
            raise InvalidInput("the completion timeout must be positive")
        if self.give_up_rounds < 0 or not 0 <= self.min_progress < 1:
            raise InvalidInput("give_up_rounds must be >= 0 and min_progress in [0, 1)")


PRESETS: dict[str, PolicyConfig] = {
    # Default: a low start so idle guests pause for tens of ms, SDPS-style progressive throttle.
    "balanced": PolicyConfig(),
    # Minimise total time: a higher start, a quick ramp, throttle as soon as the guest dirties
    # half the link rate (QEMU auto-converge's trigger) and straight to the level needed.
    "fast": PolicyConfig(
        name="fast",
        start_downtime_ms=100,
        downtime_steps=5,
        step_interval_per_gib=1.0,
        step_interval_min=0.5,
        completion_timeout_per_gib=100.0,
        completion_timeout_min=30.0,
        give_up_rounds=3,
        throttle=ThrottleConfig(trigger_ratio=0.5, trigger_rounds=1, initial=0.5, jump=True, release_ratio=0.25,
                                assist_target=0.1, assist_max=0.875),
    ),
    # Minimise guest impact: slow ramp, late and mild throttle. At 80 % the largest vCPU stall
    # measured 8-28 ms on this HZ=250 kernel (CFS charges busy threads per 4 ms tick).
    "gentle": PolicyConfig(
        name="gentle",
        downtime_steps=10,
        step_interval_per_gib=8.0,
        step_interval_min=2.0,
        completion_timeout_per_gib=300.0,
        completion_timeout_min=120.0,
        give_up_rounds=6,
        throttle=ThrottleConfig(trigger_rounds=3, max=0.8, release_ratio=0.6, settle=2.0, assist_ratio=0.0),
    ),
}


def preset(name: str) -> PolicyConfig:
    """The config named by `--policy`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInput(f"unknown policy {name!r}: use one of {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class Plan:
    """What a config means for one guest: fixed at the start of its migration."""

    memory: int
    schedule_ms: tuple[int, ...]  # downtime limit at each step; the last is the budget
    step_interval: float
    completion_timeout: float
    throttle_levels: tuple[float, ...]  # (0.0, ..., max); (0.0,) when throttling is off

    @property
    def budget_ms(self) -> int:
        return self.schedule_ms[-1]


def make_plan(config: PolicyConfig, memory: int) -> Plan:
    if memory <= 0:
        raise InvalidInput(f"invalid guest memory size {memory}: must be positive")
    gib = memory / GIB
    budget = config.max_downtime_ms
    start = min(config.start_downtime_ms, budget)
    steps = config.downtime_steps if start < budget else 0
    schedule: list[int] = []
    for i in range(steps + 1):
        value = budget if i == steps else round(start * (budget / start) ** (i / steps))
        if not schedule or value > schedule[-1]:
            schedule.append(value)
    return Plan(
        memory=memory,
        schedule_ms=tuple(schedule),
        step_interval=max(config.step_interval_min, config.step_interval_per_gib * gib),
        completion_timeout=max(config.completion_timeout_min, config.completion_timeout_per_gib * gib),
        throttle_levels=config.throttle.levels() if config.throttle.enabled else (0.0,),
    )


class Phase(str, Enum):
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"  # we (or QEMU) switched to post-copy: nothing left to steer
    ABORTED = "aborted"
    FINISHED = "finished"  # QEMU reports completed, failed or cancelled


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers between ticks."""

    plan: Plan
    phase: Phase = Phase.PRECOPY
    step: int = 0  # index into plan.schedule_ms
    anchor: float | None = None  # elapsed time when the first pass ended: the ramp starts there
    last_step_at: float = 0.0
    throttle_level: int = 0  # index into plan.throttle_levels
    throttle_changed_at: float = -math.inf
    evaluated_round: int = 0  # last round whose statistics were judged
    last_predicted: float | None = None  # s, predicted downtime at the previous round's end
    improving: bool = False  # the last round cut the predicted downtime by >= min_progress
    over: int = 0  # consecutive rounds asking for more throttle
    under: int = 0  # consecutive rounds allowing less
    stuck: int = 0  # consecutive rounds without progress at full budget and throttle
    stuck_ref: float | None = None  # predicted downtime when the stuck streak began
    reason: str | None = None  # why we aborted or switched to post-copy

    @property
    def downtime_ms(self) -> int:
        return self.plan.schedule_ms[self.step]

    @property
    def throttle(self) -> float:
        return self.plan.throttle_levels[self.throttle_level]


@dataclass(frozen=True)
class Observation:
    """One tick's input. `elapsed`: seconds since `migrate` was issued, on the caller's clock."""

    elapsed: float
    sample: MigrationSample
    last_round: RoundStats | None = None  # the most recent round closed (RoundTracker.latest_round)


@dataclass(frozen=True)
class Decision:
    state: PolicyState
    actions: tuple[Action, ...] = ()


# ------------------------------------------------------------------------------------------ logic


def start(config: PolicyConfig, memory: int) -> Decision:
    """Initial state and the actions to take before issuing `migrate`."""
    plan = make_plan(config, memory)
    state = PolicyState(plan=plan)
    return Decision(state, (SetDowntimeLimit(state.downtime_ms),))


def tick(config: PolicyConfig, state: PolicyState, obs: Observation) -> Decision:
    """Advance the policy by one observation."""
    sample = obs.sample
    if state.phase in (Phase.ABORTED, Phase.FINISHED):
        return Decision(state)
    if sample.status.is_terminal:
        return Decision(dataclasses.replace(state, phase=Phase.FINISHED))
    if state.phase is Phase.POSTCOPY:
        return Decision(state)  # post-copy cannot be steered or cancelled safely: wait for the end
    if sample.status.is_postcopy:
        return Decision(dataclasses.replace(state, phase=Phase.POSTCOPY, throttle_level=0))
    if sample.status.is_switching_over:
        return Decision(state)  # the source is pausing: any change now would only add noise

    if obs.elapsed >= state.plan.completion_timeout:
        return _give_up(config, state, obs, _timeout_reason(state, obs))
    if sample.status is not MigrationStatus.ACTIVE or sample.ram is None:
        return Decision(state)

    actions: list[Action] = []
    if state.anchor is None and sample.sync_count >= 2:
        state = dataclasses.replace(state, anchor=obs.elapsed, last_step_at=obs.elapsed)

    rnd = obs.last_round
    if rnd is not None and rnd.round > state.evaluated_round and rnd.link_rate > 0:
        state, more, hopeless = _judge_round(config, state, rnd, obs.elapsed)
        actions += more
        if hopeless:
            return _give_up(config, state, obs, _hopeless_reason(state, rnd, obs.elapsed), actions)

    if (
        state.anchor is not None
        and state.step < len(state.plan.schedule_ms) - 1
        and obs.elapsed - state.last_step_at >= state.plan.step_interval
        and not state.improving
    ):
        state = dataclasses.replace(state, step=state.step + 1, last_step_at=obs.elapsed)
        actions.append(SetDowntimeLimit(state.downtime_ms))
    return Decision(state, tuple(actions))


def _judge_round(
    config: PolicyConfig, state: PolicyState, rnd: RoundStats, now: float
) -> tuple[PolicyState, list[Action], bool]:
    """Throttle up/down and progress bookkeeping at the end of a round. Returns (state, actions, hopeless)."""
    tc = config.throttle
    plan = state.plan
    link, dirty, predicted = rnd.link_rate, rnd.dirty_rate, rnd.predicted_downtime
    budget = plan.budget_ms / 1000
    improving = state.last_predicted is not None and predicted < state.last_predicted * (1 - config.min_progress)
    at_budget = state.step == len(plan.schedule_ms) - 1
    top = len(plan.throttle_levels) - 1
    level = state.throttle_level
    settled = now - state.throttle_changed_at >= tc.settle
    converging_now = predicted <= state.downtime_ms / 1000  # QEMU switches at its next check
    outrun = dirty >= link * tc.trigger_ratio and not converging_now
    # No progress while even the budget would not fit: a longer limit cannot help, only slower vCPUs.
    stalled = (
        state.last_predicted is not None
        and predicted >= state.last_predicted * (1 - config.min_progress)
        and predicted > budget
    )
    actions: list[Action] = []
    over, under, changed_at = state.over, state.under, state.throttle_changed_at

    assist = level if converging_now else _assist_level(tc, plan.throttle_levels, level, dirty, link)
    lower_dirty = _share(plan, level - 1) / _share(plan, level) * dirty if level > 0 else 0.0

    wants_assist = assist > level
    if top > 0 and (outrun or stalled or wants_assist):
        over, under = over + 1, 0
        # The first pass is a long average (seconds): one is enough. Later rounds can be short
        # and noisy: a single fast one (a transient spike) does not throttle an unthrottled guest.
        need = 1 if (level > 0 or (wants_assist and rnd.first_round <= 1)) else tc.trigger_rounds
        if level < top and settled and over >= need:
            up = _level_up(tc, plan.throttle_levels, level, dirty, link) if (outrun or stalled) else level
            level = max(up, assist)
            actions.append(SetThrottle(plan.throttle_levels[level]))
            over, changed_at = 0, now
    elif (
        level > 0
        and lower_dirty <= link * tc.release_ratio
        and not (tc.assist_ratio and lower_dirty >= link * tc.assist_ratio)  # it would assist again
    ):
        over, under = 0, under + 1
        if under >= tc.release_rounds and settled:
            level -= 1
            actions.append(SetThrottle(plan.throttle_levels[level]))
            under, changed_at = 0, now
    else:
        over = under = 0

    # Hopeless: full budget, full throttle (or none allowed), the pause still too long, and no
    # round has cut it by min_progress since the streak began.
    stuck, stuck_ref = 0, None
    if at_budget and level == top and predicted > budget and now - changed_at >= tc.settle:
        ref = state.stuck_ref if state.stuck_ref is not None else predicted
        if predicted < ref * (1 - config.min_progress):
            stuck, stuck_ref = 0, None
        else:
            stuck, stuck_ref = state.stuck + 1, ref
    new_state = dataclasses.replace(
        state,
        evaluated_round=rnd.round,
        last_predicted=predicted,
        improving=improving,
        throttle_level=level,
        throttle_changed_at=changed_at,
        over=over,
        under=under,
        stuck=stuck,
        stuck_ref=stuck_ref,
    )
    hopeless = config.give_up_rounds > 0 and stuck >= config.give_up_rounds
    return new_state, actions, hopeless


def _share(plan: Plan, level: int) -> float:
    return 1 - plan.throttle_levels[level]


def _assist_level(tc: ThrottleConfig, levels: tuple[float, ...], level: int, dirty: float, link: float) -> int:
    """The level the convergence assist asks for (never below `level`): the lowest that keeps the
    guest's dirty rate under assist_target x link, capped at assist_max; `level` if the guest
    dirties less than assist_ratio x link even unthrottled."""
    unthrottled = dirty / (1 - levels[level])
    if not tc.assist_ratio or len(levels) < 2 or unthrottled < link * tc.assist_ratio:
        return level
    cap = max(i for i, f in enumerate(levels) if f <= tc.assist_max)
    for i in range(1, cap + 1):
        if unthrottled * (1 - levels[i]) <= link * tc.assist_target:
            return max(level, i)
    return max(level, cap)


def _level_up(tc: ThrottleConfig, levels: tuple[float, ...], level: int, dirty: float, link: float) -> int:
    """Next level: one up, or (jump) the lowest level expected to bring dirty <= target x link."""
    if not tc.jump or dirty <= 0:
        return level + 1
    unthrottled = dirty / (1 - levels[level])  # dirty rate scales with the vCPU's CPU share
    for i in range(level + 1, len(levels)):
        if unthrottled * (1 - levels[i]) <= link * tc.target_ratio:
            return i
    return len(levels) - 1


def _give_up(
    config: PolicyConfig, state: PolicyState, obs: Observation, reason: str, actions: list[Action] | None = None
) -> Decision:
    """Post-copy if allowed (and QEMU is iterating), else abort; always release the throttle first."""
    out: list[Action] = [a for a in (actions or []) if not isinstance(a, SetThrottle)]
    if state.throttle_level > 0 or any(isinstance(a, SetThrottle) for a in actions or []):
        out.append(SetThrottle(0.0))
    if config.allow_postcopy and obs.sample.status is MigrationStatus.ACTIVE:
        out.append(StartPostcopy(reason))
        phase = Phase.POSTCOPY
    else:
        out.append(Abort(reason))
        phase = Phase.ABORTED
    return Decision(dataclasses.replace(state, phase=phase, throttle_level=0, reason=reason), tuple(out))


# ------------------------------------------------------------------------------------- messages


def _mbs(rate: float) -> str:
    return f"{rate / 1e6:.0f} MB/s"


def _ms(seconds: float) -> str:
    return "forever" if math.isinf(seconds) else f"{seconds * 1000:.0f} ms"


def _timeout_reason(state: PolicyState, obs: Observation) -> str:
    plan = state.plan
    text = (
        f"completion timeout: {obs.elapsed:.0f} s >= {plan.completion_timeout:.0f} s allowed for "
        f"{plan.memory / GIB:.2f} GiB"
    )
    ram = obs.sample.ram
    if ram is not None:
        link = ram.link_rate
        predicted = ram.remaining / link if link > 0 else math.inf
        text += (
            f"; {ram.remaining / MIB:.0f} MiB pending at {_mbs(link)} = {_ms(predicted)} pause "
            f"(budget {plan.budget_ms} ms), guest dirtying {_mbs(ram.dirty_rate)}"
        )
    return text + f", vCPU throttle {state.throttle * 100:.0f}%"


def _hopeless_reason(state: PolicyState, rnd: RoundStats, now: float) -> str:
    plan = state.plan
    throttle = (
        f"vCPU throttle at its {plan.throttle_levels[-1] * 100:.0f}% cap"
        if len(plan.throttle_levels) > 1
        else "vCPU throttling disabled"
    )
    return (
        f"cannot meet the {plan.budget_ms} ms downtime budget: guest dirties {_mbs(rnd.dirty_rate)}, "
        f"link carries {_mbs(rnd.link_rate)}, {rnd.remaining / MIB:.0f} MiB still pending = "
        f"{_ms(rnd.predicted_downtime)} pause after {state.stuck} rounds without progress "
        f"(round {rnd.round}, {now:.1f} s, {throttle})"
    )


# ------------------------------------------------------------------------------ stream compression


# Compress the pages (zstd, QEMU's level 1) when the link carries less than this (bytes/s):
# 2.5 Gbit/s. A faster link carries raw pages sooner than the threads compress them (bench/README.md).
COMPRESS_BELOW = 2_500_000_000 // 8


def stream_compression(link_rate: int | None, postcopy: bool) -> Compression:
    """What the migration stream should be compressed with, given the source's egress rate towards
    the destination (bytes/s; None when unknown). QEMU compresses only multifd streams, and
    multifd does not go with post-copy."""
    if postcopy or link_rate is None or link_rate >= COMPRESS_BELOW:
        return Compression.NONE
    return Compression.ZSTD
