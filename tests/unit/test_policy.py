"""Convergence policy against a closed-loop model of QEMU pre-copy and hand-made sample sequences."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.migration import policy as pol
from kvmotion.migration.policy import (
    Abort,
    Observation,
    Phase,
    PolicyConfig,
    SetDowntimeLimit,
    SetThrottle,
    StartPostcopy,
    ThrottleConfig,
)
from kvmotion.migration.stats import RoundTracker
from kvmotion.qemu.migstatus import MigrationSample

MIB = 1 << 20
PAGE = 4096
GBIT_LINK = 117e6  # bytes/s a 1 Gbit link carries (shared/README: 0.96 Gbit/s measured)


@dataclass
class Guest:
    memory: int
    wss: int  # bytes the workload keeps rewriting
    dirty_rate: float  # bytes/s at full CPU speed
    quiet_after: float = math.inf  # s: the workload stops dirtying then

    def rate(self, t: float) -> float:
        return self.dirty_rate if t < self.quiet_after else 0.0


@dataclass
class QemuModel:
    """Pre-copy as migration.c/ram.c run it, at 10 ms resolution.

    A round sends what the last bitmap sync found dirty; QEMU syncs again when what is left drops
    under bandwidth x downtime-limit, and completes if what the sync found is still under it.
    dirty-pages-rate is refreshed at syncs at least 1 s apart and counts each page once per sync,
    as in ram.c: a guest rewriting its working set within a round measures at ~ the link rate.
    """

    guest: Guest
    link: float
    limit_ms: int = 300
    throttle: float = 0.0
    t: float = 0.0
    sent: int = 0
    status: str = "active"
    downtime: float | None = None
    postcopy_left: float = 0.0
    pending: float = field(init=False)
    bitmap: float = 0.0
    sync_count: int = 1
    dirty_pages_rate: int = 0
    rate_since: float = 0.0
    dirtied_since: float = 0.0

    def __post_init__(self) -> None:
        self.pending = float(self.guest.memory)

    def advance(self, seconds: float, dt: float = 0.01) -> None:
        end = self.t + seconds
        while self.t < end - 1e-9 and self.status in ("active", "postcopy-active"):
            if self.status == "postcopy-active":
                self.postcopy_left -= self.link * dt
                self.sent += int(self.link * dt)
                if self.postcopy_left <= 0:
                    self.status = "completed"
                self.t += dt
                continue
            dirty = self.guest.rate(self.t) * (1 - self.throttle) * dt
            self.bitmap = min(self.guest.wss, self.bitmap + dirty)
            send = min(self.pending, self.link * dt)
            self.pending -= send
            self.sent += int(send)
            self.t += dt
            threshold = self.link * self.limit_ms / 1000
            if self.pending < threshold:
                self.sync_count += 1
                self.dirtied_since += self.bitmap
                self.pending += self.bitmap
                self.bitmap = 0.0
                if self.t - self.rate_since >= 1.0:
                    self.dirty_pages_rate = int(self.dirtied_since / (self.t - self.rate_since) / PAGE)
                    self.rate_since, self.dirtied_since = self.t, 0.0
                if self.pending < threshold:
                    self.downtime = self.pending / self.link
                    self.sent += int(self.pending)
                    self.pending = 0.0
                    self.status = "completed"

    def start_postcopy(self) -> None:
        self.status = "postcopy-active"
        self.postcopy_left = self.pending + self.bitmap

    def qmp(self) -> dict:
        data: dict = {"status": self.status, "total-time": int(self.t * 1000), "setup-time": 2}
        data["ram"] = {
            "transferred": self.sent,
            "remaining": int(self.pending),
            "total": self.guest.memory,
            "duplicate": 0,
            "normal": self.sent // PAGE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": self.link * 8 / 1e6,
            "dirty-sync-count": self.sync_count,
            "page-size": PAGE,
        }
        if self.status == "completed" and self.downtime is not None:
            data["downtime"] = int(self.downtime * 1000) + 1
        else:
            data["expected-downtime"] = int(self.pending / self.link * 1000)
        return data


@dataclass
class Run:
    actions: list[tuple[float, object]]
    model: QemuModel
    state: pol.PolicyState

    def of(self, kind: type) -> list:
        return [a for _, a in self.actions if isinstance(a, kind)]


def run(config: PolicyConfig, guest: Guest, link: float = GBIT_LINK, tick: float = 0.2, limit: float = 600) -> Run:
    """Drive the policy against the model until QEMU finishes or the policy aborts."""
    model = QemuModel(guest, link)
    decision = pol.start(config, guest.memory)
    actions: list[tuple[float, object]] = []
    tracker = RoundTracker()

    def apply(acts: tuple) -> None:
        for act in acts:
            actions.append((model.t, act))
            if isinstance(act, SetDowntimeLimit):
                model.limit_ms = act.ms
            elif isinstance(act, SetThrottle):
                model.throttle = act.fraction
            elif isinstance(act, StartPostcopy):
                model.start_postcopy()

    apply(decision.actions)
    state = decision.state
    while model.t < limit:
        model.advance(tick)
        sample = MigrationSample.from_qmp(model.qmp(), at=model.t)
        tracker, _ = tracker.observe(sample, model.throttle)
        decision = pol.tick(config, state, Observation(model.t, sample, tracker.latest_round))
        state = decision.state
        apply(decision.actions)
        if state.phase in (Phase.ABORTED, Phase.FINISHED) or model.status == "completed":
            break
    return Run(actions, model, state)


# ------------------------------------------------------------------------------------- scenarios


def test_idle_guest_converges_at_the_low_limit_without_throttle() -> None:
    # 1.5 % of 512 MiB re-dirtied during the ~4.6 s first pass (shared/README).
    guest = Guest(memory=512 * MIB, wss=8 * MIB, dirty_rate=0.015 * 512 * MIB / 4.6)
    r = run(pol.preset("balanced"), guest)
    assert r.model.status == "completed"
    assert r.of(SetDowntimeLimit) == [SetDowntimeLimit(30)]
    assert r.of(SetThrottle) == []
    assert r.model.downtime is not None and r.model.downtime <= 0.030
    assert r.state.phase is Phase.FINISHED


def test_guest_dirtying_twice_the_link_is_throttled_stepwise_and_converges() -> None:
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=2 * GBIT_LINK)
    config = pol.preset("balanced")
    r = run(config, guest)
    assert r.model.status == "completed"
    fractions = [a.fraction for a in r.of(SetThrottle)]
    levels = config.throttle.levels()
    # The first pass already shows the guest outrunning the link: straight to the assist's level
    # (60 %), then one level at a time, never down while it keeps dirtying, never above the cap.
    assert fractions[0] == config.throttle.assist_max
    assert all(levels.index(b) == levels.index(a) + 1 for a, b in itertools.pairwise(fractions))
    assert fractions == sorted(fractions) and max(fractions) <= config.throttle.max
    assert r.model.downtime is not None and r.model.downtime <= config.max_downtime_ms / 1000
    # Without the throttle this guest never gets below its 256 MiB working set (2.3 s).
    assert r.model.downtime < 0.5


@pytest.mark.parametrize("share", [0.45, 0.7])
def test_assist_beats_libvirts_settings_on_time_and_pause(share: float) -> None:
    # A guest dirtying a good share of the link (but less than it): what libvirt does (QEMU's
    # 300 ms limit, no throttle) switches at a long pause; the default policy's 30 ms start alone
    # would need more rounds than that and take longer. With the assist it takes less time *and*
    # pauses for a fraction of libvirt's pause.
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=share * GBIT_LINK)
    libvirt = PolicyConfig(name="libvirt", max_downtime_ms=300, start_downtime_ms=300, downtime_steps=0,
                           throttle=ThrottleConfig(enabled=False))
    no_assist = dataclasses.replace(pol.preset("balanced"), throttle=ThrottleConfig(assist_ratio=0.0))
    lv, plain, kv = (run(c, guest, tick=0.1) for c in (libvirt, no_assist, pol.preset("balanced")))
    assert lv.model.status == plain.model.status == kv.model.status == "completed"
    assert plain.model.t > lv.model.t  # the low limit alone costs time
    assert kv.model.t < lv.model.t and kv.model.downtime < lv.model.downtime / 4
    assert [a.fraction for a in kv.of(SetThrottle)][:1] == [pol.preset("balanced").throttle.assist_max]


def test_throttle_cap_reached_then_schedule_ramps_to_the_budget() -> None:
    # Capped at 50 % the guest still dirties as fast as the link carries: only the ramp helps.
    # Its 48 MiB working set needs a 430 ms pause, which fits the 500 ms budget.
    config = dataclasses.replace(pol.preset("balanced"), throttle=ThrottleConfig(max=0.5))
    guest = Guest(memory=512 * MIB, wss=48 * MIB, dirty_rate=2 * GBIT_LINK)
    r = run(config, guest)
    assert r.model.status == "completed"
    assert [a.fraction for a in r.of(SetThrottle)] == [0.5]  # the assist asks for more: the cap at once
    limits = [a.ms for a in r.of(SetDowntimeLimit)]
    assert limits == list(pol.make_plan(config, guest.memory).schedule_ms)
    assert limits[-1] == config.max_downtime_ms
    assert 0.4 < r.model.downtime <= config.max_downtime_ms / 1000
    # The ramp waited for the first pass (~4.6 s) and then one step interval (2 s for 512 MiB) per step.
    first_raise = next(t for t, a in r.actions if isinstance(a, SetDowntimeLimit) and a.ms > 30)
    assert first_raise >= guest.memory / GBIT_LINK + 2.0


def test_hopeless_guest_is_aborted_early_with_figures() -> None:
    # 40x the link: even at 95 % the guest dirties twice what the link carries.
    config = pol.preset("balanced")
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=40 * GBIT_LINK)
    r = run(config, guest)
    assert r.state.phase is Phase.ABORTED
    aborts = r.of(Abort)
    assert len(aborts) == 1 and r.of(StartPostcopy) == []
    reason = aborts[0].reason
    assert "cannot meet the 500 ms downtime budget" in reason
    assert "MB/s" in reason and "MiB" in reason and "95%" in reason
    abort_time = next(t for t, a in r.actions if isinstance(a, Abort))
    assert abort_time < pol.make_plan(config, guest.memory).completion_timeout
    # The throttle is released before giving up, and it had reached its cap first.
    assert r.actions[-2][1] == SetThrottle(0.0)
    assert max(a.fraction for a in r.of(SetThrottle)) == config.throttle.max


def test_postcopy_replaces_abort_when_allowed() -> None:
    config = dataclasses.replace(pol.preset("balanced"), allow_postcopy=True)
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=40 * GBIT_LINK)
    r = run(config, guest)
    assert r.of(Abort) == []
    assert len(r.of(StartPostcopy)) == 1 and "cannot meet" in r.of(StartPostcopy)[0].reason
    assert r.actions[-1][1] == r.of(StartPostcopy)[0] and r.actions[-2][1] == SetThrottle(0.0)
    assert r.model.status == "completed" and r.state.phase is Phase.FINISHED


def test_completion_timeout_aborts() -> None:
    config = dataclasses.replace(
        pol.preset("balanced"), give_up_rounds=0, throttle=ThrottleConfig(enabled=False)
    )
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=4 * GBIT_LINK)
    r = run(config, guest)
    timeout = pol.make_plan(config, guest.memory).completion_timeout
    assert timeout == 0.5 * config.completion_timeout_per_gib  # 512 MiB x 150 s/GiB
    aborts = r.of(Abort)
    assert len(aborts) == 1 and aborts[0].reason.startswith("completion timeout")
    t_abort = next(t for t, a in r.actions if isinstance(a, Abort))
    assert timeout <= t_abort < timeout + 0.5
    assert r.of(SetThrottle) == []


def test_completion_timeout_switches_to_postcopy_when_allowed() -> None:
    config = dataclasses.replace(
        pol.preset("balanced"), give_up_rounds=0, allow_postcopy=True, throttle=ThrottleConfig(enabled=False)
    )
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=4 * GBIT_LINK)
    r = run(config, guest)
    assert r.of(Abort) == []
    assert r.of(StartPostcopy)[0].reason.startswith("completion timeout")
    assert r.model.status == "completed"


@pytest.mark.parametrize("name", sorted(pol.PRESETS))
def test_no_preset_ever_exceeds_budget_or_cap(name: str) -> None:
    config = pol.preset(name)
    rng = random.Random(f"budget-{name}")
    for _ in range(12):
        memory = rng.choice([256, 512, 1024]) * MIB
        guest = Guest(
            memory=memory,
            wss=int(memory * rng.uniform(0.001, 0.6)),
            dirty_rate=GBIT_LINK * rng.choice([0.0, 0.1, 0.6, 1.2, 3, 10, 50]),
            quiet_after=rng.choice([math.inf, rng.uniform(2, 30)]),
        )
        r = run(config, guest, link=GBIT_LINK * rng.choice([0.5, 1, 4]), tick=rng.choice([0.1, 0.25]))
        assert all(a.ms <= config.max_downtime_ms for a in r.of(SetDowntimeLimit))
        assert all(0 <= a.fraction <= config.throttle.max for a in r.of(SetThrottle))
        if r.model.downtime is not None:
            # QEMU only switches under the limit we set, so the pause fits the budget.
            assert r.model.downtime <= config.max_downtime_ms / 1000
        assert r.state.phase in (Phase.FINISHED, Phase.ABORTED)


def test_fast_preset_finishes_a_heavy_guest_sooner_than_balanced() -> None:
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=8 * GBIT_LINK)
    fast, balanced = run(pol.preset("fast"), guest), run(pol.preset("balanced"), guest)
    assert fast.model.status == balanced.model.status == "completed"
    assert fast.model.t < balanced.model.t
    # Both go straight to their assist's cap: fast takes 87.5 % of the CPU at once, balanced 60 %.
    assert fast.of(SetThrottle)[0].fraction == 0.875 and balanced.of(SetThrottle)[0].fraction == 0.6


def test_gentle_never_throttles_above_its_cap() -> None:
    guest = Guest(memory=512 * MIB, wss=256 * MIB, dirty_rate=40 * GBIT_LINK)
    r = run(pol.preset("gentle"), guest)
    assert max(a.fraction for a in r.of(SetThrottle) if a.fraction > 0) == 0.8
    assert r.state.phase is Phase.ABORTED


# --------------------------------------------------------------------- hand-made sample sequences


def sample(t: float, sync: int, remaining: int, dirty_rate: float, link: float = GBIT_LINK, sent: int | None = None):
    return MigrationSample.from_qmp(
        {
            "status": "active",
            "total-time": int(t * 1000),
            "ram": {
                "transferred": int(link * t) if sent is None else sent,
                "remaining": remaining,
                "total": 1 << 30,
                "dirty-pages-rate": int(dirty_rate / PAGE),
                "mbps": link * 8 / 1e6,
                "dirty-sync-count": sync,
                "page-size": PAGE,
            },
        },
        at=t,
    )


def feed(config: PolicyConfig, samples: list[MigrationSample]) -> tuple[pol.PolicyState, list[tuple[float, object]]]:
    decision = pol.start(config, 1 << 30)
    state, tracker, out = decision.state, RoundTracker(), []
    for s in samples:
        tracker, _ = tracker.observe(s)
        decision = pol.tick(config, state, Observation(s.at, s, tracker.latest_round))
        state = decision.state
        out += [(s.at, a) for a in decision.actions]
    return state, out


def test_throttle_is_released_stepwise_when_the_guest_stops_dirtying() -> None:
    config = pol.preset("balanced")
    big = 800 * MIB  # the guest's working set: pending stays there while it outruns the link
    busy = [sample(2.0 * i, 1 + i, big, 3 * GBIT_LINK) for i in range(1, 12)]
    state, acts = feed(config, busy)
    up = [a.fraction for _, a in acts if isinstance(a, SetThrottle)]
    levels = config.throttle.levels()
    first = levels.index(config.throttle.assist_max)  # the first step is the assist's level
    assert up == list(levels[first : first + len(up)]) and len(up) >= 3
    # Now the pending data shrinks round after round, as it does once the guest is quiet.
    quiet = [sample(2.0 * i, 1 + i, int(big * 0.85 ** (i - 11)), 0.01 * GBIT_LINK) for i in range(12, 30)]
    state, acts = feed_from(config, state, busy[-1], quiet)
    down = [a.fraction for _, a in acts if isinstance(a, SetThrottle)]
    assert down == sorted(down, reverse=True) and down[-1] == 0.0
    assert all(b < a for a, b in zip([up[-1], *down], down, strict=False))  # one level at a time
    assert state.throttle_level == 0


def feed_from(config, state, last, samples):
    tracker, _ = RoundTracker().observe(last)
    out = []
    for s in samples:
        tracker, _ = tracker.observe(s)
        decision = pol.tick(config, state, Observation(s.at, s, tracker.latest_round))
        state = decision.state
        out += [(s.at, a) for a in decision.actions]
    return state, out


def test_a_transient_spike_does_not_throttle() -> None:
    # trigger_rounds = 2: one (short) round over the link rate after the first pass is not enough.
    config = pol.preset("balanced")
    seq = [sample(1.0, 1, 900 * MIB, 0), sample(9.0, 2, 300 * MIB, 0.1 * GBIT_LINK),
           sample(11.5, 3, 290 * MIB, 3 * GBIT_LINK)]
    seq += [sample(11.5 + i, 3 + i, 300 * MIB >> i, 0.2 * GBIT_LINK) for i in range(1, 4)]
    _, acts = feed(config, seq)
    assert not [a for _, a in acts if isinstance(a, SetThrottle)]


def test_the_first_pass_alone_calls_for_the_assist() -> None:
    # An 8 s first pass during which the guest dirtied 40 % of what the link carried: its average
    # is no spike. Each later round would re-send 40 % of the last: throttle to the assist level.
    config = pol.preset("balanced")
    tc = config.throttle
    _, acts = feed(config, [sample(1.0, 1, 900 * MIB, 0), sample(9.0, 2, 300 * MIB, 0.4 * GBIT_LINK)])
    level = [a.fraction for _, a in acts if isinstance(a, SetThrottle)]
    # 0.4 x (1 - level) <= assist_target (0.1) would take 80 %; the assist stops at its cap.
    assert 0.4 * (1 - tc.assist_max) > tc.assist_target
    assert level == [tc.assist_max]
    # A guest dirtying less than assist_ratio x link converges quickly on its own: no throttle.
    _, acts = feed(config, [sample(1.0, 1, 900 * MIB, 0), sample(9.0, 2, 300 * MIB, 0.2 * GBIT_LINK)])
    assert not [a for _, a in acts if isinstance(a, SetThrottle)]
    # gentle has the assist off.
    gentle = pol.preset("gentle")
    _, acts = feed(gentle, [sample(1.0, 1, 900 * MIB, 0), sample(9.0, 2, 300 * MIB, 0.4 * GBIT_LINK)])
    assert not [a for _, a in acts if isinstance(a, SetThrottle)]


def test_no_throttle_when_the_pending_data_already_fits_the_limit() -> None:
    # Dirtying fast but a tiny working set: QEMU switches over at its next check anyway.
    config = pol.preset("balanced")
    seq = [sample(5.0 + i, 2 + i, 1 * MIB, 3 * GBIT_LINK) for i in range(6)]
    _, acts = feed(config, seq)
    assert not [a for _, a in acts if isinstance(a, SetThrottle)]


def test_schedule_holds_while_pending_shrinks() -> None:
    config = pol.preset("balanced")
    # Each round halves the pending data: QEMU is converging at the current limit.
    seq, remaining = [], 400 * MIB
    for i in range(10):
        seq.append(sample(5.0 + 3 * i, 2 + i, remaining, 0.5 * GBIT_LINK))
        remaining //= 2
    _, acts = feed(config, seq)
    assert [a for _, a in acts if isinstance(a, SetDowntimeLimit)] == []
    # The same rounds without progress: the ramp moves every step interval (4 s for 1 GiB).
    flat = [dataclasses.replace(s, ram=dataclasses.replace(s.ram, remaining=400 * MIB)) for s in seq]
    _, acts = feed(config, flat)
    assert [a.ms for _, a in acts if isinstance(a, SetDowntimeLimit)] == [40, 53, 70, 92]  # at 11, 17, 23, 29 s


def test_nothing_happens_before_active_or_after_completion() -> None:
    config = pol.preset("balanced")
    state = pol.start(config, 1 << 30).state
    setup = MigrationSample.from_qmp({"status": "setup"}, at=0.05)
    d = pol.tick(config, state, Observation(0.05, setup))
    assert d.actions == () and d.state == state
    done = MigrationSample.from_qmp({"status": "completed", "total-time": 4000, "downtime": 12}, at=4.0)
    d = pol.tick(config, state, Observation(4.0, done))
    assert d.actions == () and d.state.phase is Phase.FINISHED
    assert pol.tick(config, d.state, Observation(999.0, done)).actions == ()


def test_qemu_switching_to_postcopy_on_its_own_is_followed() -> None:
    config = pol.preset("balanced")
    state = pol.start(config, 1 << 30).state
    s = MigrationSample.from_qmp({"status": "postcopy-active", "ram": {"remaining": 5}}, at=9.0)
    assert pol.tick(config, state, Observation(9.0, s)).state.phase is Phase.POSTCOPY


# ------------------------------------------------------------------------------------- config


def test_plan_scales_with_memory_and_is_geometric() -> None:
    config = pol.preset("balanced")
    small, big = pol.make_plan(config, 256 * MIB), pol.make_plan(config, 8 << 30)
    assert small.schedule_ms[0] == 30 and small.schedule_ms[-1] == 500 and len(small.schedule_ms) == 11
    ratios = [b / a for a, b in itertools.pairwise(small.schedule_ms)]
    assert max(ratios) - min(ratios) < 0.05
    assert small.step_interval == config.step_interval_min
    assert big.step_interval == 8 * config.step_interval_per_gib
    assert big.completion_timeout == 8 * config.completion_timeout_per_gib
    assert small.completion_timeout == config.completion_timeout_min


def test_budget_below_the_start_clamps_the_schedule() -> None:
    config = dataclasses.replace(pol.preset("balanced"), max_downtime_ms=20)
    assert pol.make_plan(config, 1 << 30).schedule_ms == (20,)
    assert pol.start(config, 1 << 30).actions == (SetDowntimeLimit(20),)


def test_throttle_levels_halve_the_cpu_share() -> None:
    assert ThrottleConfig().levels() == (0.0, 0.2, 0.6, 0.8, 0.9, 0.95)
    assert ThrottleConfig(max=0.5).levels() == (0.0, 0.2, 0.5)
    assert ThrottleConfig(initial=0.5, max=0.95).levels() == (0.0, 0.5, 0.75, 0.875, 0.95)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ThrottleConfig(initial=0.0),
        lambda: ThrottleConfig(max=1.0),
        lambda: ThrottleConfig(release_ratio=1.5),
        lambda: PolicyConfig(max_downtime_ms=0),
        lambda: PolicyConfig(downtime_steps=-1),
        lambda: PolicyConfig(min_progress=1.0),
    ],
)
def test_invalid_configs_are_refused(make) -> None:
    with pytest.raises(InvalidInput):
        make()


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInput, match="balanced, fast, gentle"):
        pol.preset("turbo")


def test_stream_compression_only_where_the_link_is_slower_than_the_compressors():
    from kvmotion.migration.policy import COMPRESS_BELOW, Compression, stream_compression

    assert stream_compression(125_000_000, postcopy=False) is Compression.ZSTD  # 1 Gbit/s
    assert stream_compression(COMPRESS_BELOW - 1, postcopy=False) is Compression.ZSTD
    assert stream_compression(COMPRESS_BELOW, postcopy=False) is Compression.NONE
    assert stream_compression(1_250_000_000, postcopy=False) is Compression.NONE  # 10 Gbit/s
    assert stream_compression(None, postcopy=False) is Compression.NONE  # unknown link
    # post-copy runs without multifd, the only stream QEMU compresses
    assert stream_compression(125_000_000, postcopy=True) is Compression.NONE
