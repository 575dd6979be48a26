"""kvmotion.migration.predict: the replay's properties, calibration on its own output, edge cases."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.api.migration import (
    Compression,
    Forecast,
    MigrationOptions,
    MigrationRecord,
    Phase,
    Summary,
    record_from_json,
)
from kvmotion.core.errors import InvalidInput
from kvmotion.core.jsonio import as_json
from kvmotion.migration import policy as pol
from kvmotion.migration.predict import (
    GIB,
    FixedCosts,
    Guest,
    ModelParams,
    Observed,
    Past,
    Prediction,
    Predictor,
    Route,
    StreamClass,
    Throughput,
    calibrate,
    observed_from_record,
    predict,
    replay,
    stream_class,
    theil_sen,
)

MIB = 1 << 20
GBIT = 125_000_000

memories = st.integers(min_value=256, max_value=16 * 1024).map(lambda m: m * MIB)
rates = st.floats(min_value=0, max_value=2e9)
links = st.sampled_from([None, GBIT // 10, GBIT, 2 * GBIT, 10 * GBIT, 25 * GBIT])
zeros = st.floats(min_value=0, max_value=0.95)
working_sets = st.one_of(st.none(), st.integers(min_value=1, max_value=4096).map(lambda m: m * MIB))
flags = st.booleans()


def _guest(memory: int, zero: float, dirty: float, wss: int | None, throttleable: bool) -> Guest:
    return Guest(memory=memory, zero_fraction=zero, dirty_rate=dirty, working_set=wss, throttleable=throttleable)


TICK = 0.1  # the source's control period: the replay's switchover lands on one of its ticks


def _longer_or_equal(a: float, b: float) -> bool:
    """a >= b up to one policy tick (a larger guest may switch over one tick earlier: 4.037 vs
    4.063 s was found); math.inf (no convergence) is the longest."""
    return a >= b - TICK if math.isfinite(b) else math.isinf(a)


# ----------------------------------------------------------------------------------- monotonic
# Memory and dirty rate are checked with the throttle off: the policy's throttle is not monotonic
# (a guest dirtying a little more can be throttled a level deeper and finish much sooner: 1.12 vs
# 1.24 GB/s on 4 GiB unshaped, 61 s vs 22 s), and the model replays the policy as it is.

NO_THROTTLE = dataclasses.replace(pol.preset("balanced"), throttle=pol.ThrottleConfig(enabled=False))


@settings(max_examples=150, deadline=None)
@given(memories, st.integers(min_value=1, max_value=8 * 1024), zeros, rates, working_sets, links, flags, flags)
def test_more_memory_is_never_faster(memory: int, extra_mib: int, zero: float, dirty: float,
                                     wss: int | None, link: int | None, tls: bool, throttleable: bool) -> None:
    route = Route(link, encrypted=tls)
    small = Predictor(config=NO_THROTTLE).seconds(_guest(memory, zero, dirty, wss, throttleable), route)
    large = Predictor(config=NO_THROTTLE).seconds(_guest(memory + extra_mib * MIB, zero, dirty, wss, throttleable), route)
    assert _longer_or_equal(large, small)


@settings(max_examples=150, deadline=None)
@given(memories, zeros, rates, st.floats(min_value=0, max_value=2e9), working_sets, links, flags, flags)
def test_a_faster_writer_is_never_faster(memory: int, zero: float, dirty: float, more: float,
                                         wss: int | None, link: int | None, tls: bool, throttleable: bool) -> None:
    route = Route(link, encrypted=tls)
    slow = Predictor(config=NO_THROTTLE).seconds(_guest(memory, zero, dirty, wss, throttleable), route)
    fast = Predictor(config=NO_THROTTLE).seconds(_guest(memory, zero, dirty + more, wss, throttleable), route)
    assert _longer_or_equal(fast, slow)


@settings(max_examples=150, deadline=None)
@given(memories, zeros, rates, working_sets, links, links, flags, flags)
def test_a_faster_link_is_never_slower_even_throttled(memory: int, zero: float, dirty: float, wss: int | None,
                                       a: int | None, b: int | None, tls: bool, throttleable: bool) -> None:
    if a is None or b is None:
        return  # an unknown link has no order
    slow_link, fast_link = sorted((a, b))
    guest = _guest(memory, zero, dirty, wss, throttleable)
    slow = Predictor().seconds(guest, Route(slow_link, encrypted=tls))
    fast = Predictor().seconds(guest, Route(fast_link, encrypted=tls))
    assert _longer_or_equal(slow, fast)


# ----------------------------------------------------------------------------------- edge cases


def test_an_idle_guest_goes_in_one_pass_and_pauses_for_the_fixed_cost() -> None:
    fixed = FixedCosts(setup=0.01, switchover=0.004, pause_base=0.024, prepare=0.1, finish=0.03)
    cls = StreamClass(GBIT, Compression.ZSTD, False)
    th = Throughput(page_rate=200e6, wire_ratio=0.25, walk_per_gib=0.1)
    p = predict(Guest(memory=GIB, zero_fraction=0.75), Route(GBIT, encrypted=False), ModelParams(fixed, ((cls, th),)))
    assert p.converged and p.reason is None and p.rounds == 1 and p.throttle_max == 0
    assert p.compression is Compression.ZSTD
    nonzero = GIB * 0.25
    assert p.page_bytes == int(nonzero) and p.bytes == int(nonzero * 0.25)
    assert p.downtime == pytest.approx(0.004)
    assert p.pause == pytest.approx(0.024)
    assert p.total == pytest.approx(0.01 + nonzero / 200e6 + 0.1 + 0.004)
    assert p.duration == pytest.approx(p.total + 0.13)


def test_a_writer_faster_than_the_link_is_throttled_until_it_converges() -> None:
    guest = Guest(memory=512 * MIB, zero_fraction=0.4, dirty_rate=300e6, working_set=256 * MIB)
    p = predict(guest, Route(GBIT, encrypted=False))
    assert p.converged and p.throttle_max > 0 and p.rounds > 1
    unthrottled = predict(guest, Route(GBIT, encrypted=False), config=dataclasses.replace(
        pol.preset("balanced"), throttle=pol.ThrottleConfig(enabled=False)))
    assert not unthrottled.converged or unthrottled.total > p.total


def test_a_writer_the_throttle_cannot_slow_is_reported_as_not_converging() -> None:
    guest = Guest(memory=GIB, dirty_rate=2e9, working_set=GIB, throttleable=False)
    p = predict(guest, Route(GBIT, encrypted=False))
    assert not p.converged and p.reason is not None and "downtime budget" in p.reason
    assert p.throttle_max == pol.preset("balanced").throttle.max  # the policy tried its utmost
    assert Predictor().seconds(guest, Route(GBIT, encrypted=False)) == math.inf


def test_post_copy_ends_a_hopeless_pre_copy_with_a_short_pause() -> None:
    guest = Guest(memory=GIB, dirty_rate=2e9, working_set=GIB, throttleable=False)
    p = predict(guest, Route(GBIT, encrypted=False, postcopy=True))
    assert not p.converged and p.reason is not None and p.reason.startswith("post-copy")
    assert p.compression is Compression.NONE  # no multifd with post-copy, so no compression
    assert 0 < p.downtime < 0.1


def test_bad_inputs_are_refused_in_one_line() -> None:
    for bad in (dict(memory=0), dict(memory=GIB, zero_fraction=1.5), dict(memory=GIB, dirty_rate=-1.0),
                dict(memory=GIB, dirty_rate=math.inf), dict(memory=GIB, working_set=-1)):
        with pytest.raises(InvalidInput):
            Guest(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Route(0)


def test_without_history_the_defaults_follow_the_link() -> None:
    assert calibrate([]) == ModelParams()
    slow = ModelParams().throughput(stream_class(Route(GBIT // 10, encrypted=False)))
    assert slow.page_rate == pytest.approx(GBIT // 10 * 0.95 / 0.25)  # the link bounds a compressed stream
    fast = ModelParams().throughput(stream_class(Route(25 * GBIT, encrypted=False)))
    assert fast.wire_ratio == 1.0 and fast.page_rate < 25 * GBIT  # the CPU bounds a fast one


def test_theil_sen_ignores_an_outlier() -> None:
    pts = [(x, 2 * x + 1) for x in range(10)] + [(5, 1000)]
    slope, intercept = theil_sen(pts) or (0, 0)
    assert slope == pytest.approx(2) and intercept == pytest.approx(1)
    assert theil_sen([(1, 1), (1, 2)]) is None


# ---------------------------------------------------------------------------------- calibration


TRUE_FIXED = FixedCosts(setup=0.004, setup_tls=0.09, switchover=0.006, pause_base=0.017, pause_share=1.4,
                        prepare=0.14, finish=0.045)
TRUE_CLASSES = (
    (StreamClass(GBIT, Compression.ZSTD, False), Throughput(page_rate=180e6, wire_ratio=0.2, walk_per_gib=0.12)),
    (StreamClass(None, Compression.NONE, False), Throughput(page_rate=450e6, wire_ratio=1.0, walk_per_gib=0.08)),
    (StreamClass(GBIT, Compression.ZSTD, True), Throughput(page_rate=120e6, wire_ratio=0.22, walk_per_gib=0.15)),
)


def _synthetic(params: ModelParams) -> list[Observed]:
    """Migrations as the model itself says they go, recorded the way the source records them."""
    out = []
    for link, tls in ((GBIT, False), (None, False), (GBIT, True)):
        for mem in (512 * MIB, GIB, 2 * GIB):
            for dirty in (0.0, 20e6, 60e6, 150e6):
                guest = Guest(memory=mem, zero_fraction=0.5, dirty_rate=dirty, working_set=256 * MIB)
                route = Route(link, encrypted=tls)
                p = predict(guest, route, params)
                assert p.converged
                out.append(Observed(guest=guest, route=route, compression=p.compression, total=p.total,
                                    setup=params.fixed.setup_tls if tls else params.fixed.setup,
                                    downtime=p.downtime, page_bytes=p.page_bytes, wire_bytes=p.bytes,
                                    pause=p.pause, prepare=params.fixed.prepare, duration=p.duration))
    return out


def test_calibration_recovers_the_parameters_that_made_the_history() -> None:
    truth = ModelParams(TRUE_FIXED, TRUE_CLASSES)
    fitted = calibrate(_synthetic(truth))
    assert fitted.samples == 36
    for name in ("setup", "setup_tls", "prepare", "finish"):
        assert getattr(fitted.fixed, name) == pytest.approx(getattr(TRUE_FIXED, name), rel=1e-6), name
    assert fitted.fixed.switchover == pytest.approx(TRUE_FIXED.switchover, abs=0.001)
    # The guest's pause is a line of its own: the destination's tail grows with what was pending.
    assert fitted.fixed.pause_base == pytest.approx(TRUE_FIXED.pause_base, abs=0.001)
    assert fitted.fixed.pause_share == pytest.approx(TRUE_FIXED.pause_share, rel=0.05)
    for cls, th in TRUE_CLASSES:
        got = fitted.throughput(cls)
        assert got.samples == 12
        assert got.page_rate == pytest.approx(th.page_rate, rel=0.03), cls
        assert got.walk_per_gib == pytest.approx(th.walk_per_gib, rel=0.1, abs=0.005), cls
        assert got.wire_ratio == pytest.approx(th.wire_ratio, rel=0.01), cls


def test_a_calibrated_model_predicts_its_own_history() -> None:
    truth = ModelParams(TRUE_FIXED, TRUE_CLASSES)
    history = _synthetic(truth)
    predictor = Predictor.from_history(history)
    for o in history:
        p = predictor.predict(o.guest, o.route)
        assert p.duration == pytest.approx(o.duration, rel=0.05)
        assert p.downtime == pytest.approx(o.downtime, rel=0.2, abs=0.002)


def _observed_like(p: Prediction, *, scale: float, memory: int, dirty: float) -> Observed:
    """A past migration of a guest like `p`'s whose times were `scale` x what the replay said."""
    return Observed(guest=Guest(memory=memory, zero_fraction=0.5, dirty_rate=dirty, working_set=256 * MIB),
                    route=p.route, compression=p.compression, total=p.total * scale, setup=0.005,
                    downtime=p.downtime * scale, page_bytes=p.page_bytes, wire_bytes=p.bytes, pause=p.pause * scale,
                    prepare=0.15, duration=p.duration * scale)


def test_alike_past_migrations_correct_the_replay_and_others_do_not() -> None:
    params = ModelParams(TRUE_FIXED, TRUE_CLASSES)
    guest = Guest(memory=GIB, zero_fraction=0.5, dirty_rate=60e6, working_set=256 * MIB)
    route = Route(GBIT)
    base = replay(guest, route, params)
    assert base.converged and base.alike == 0 and base.basis == "replay of the policy"

    def past(scale: float, memory: int = GIB, dirty: float = 60e6) -> Past:
        g = Guest(memory=memory, zero_fraction=0.5, dirty_rate=dirty, working_set=256 * MIB)
        r = replay(g, route, params)
        o = _observed_like(r, scale=scale, memory=memory, dirty=dirty)
        return Past(stream_class(route), memory, dirty, True, (r.duration, r.total, r.pause, r.downtime),
                    (o.duration, o.total, o.pause, o.downtime))

    # Three alike (memory and dirty rate within 1.5x) took twice, 2.2x and 3x the replay: the median ratio.
    alike = (past(2.0), past(2.2, memory=GIB * 5 // 4), past(3.0, dirty=50e6))
    p = predict(guest, route, dataclasses.replace(params, past=alike))
    assert p.alike == 3 and p.basis == "replay corrected by 3 alike past migrations"
    assert p.pause == pytest.approx(base.pause * 2.2, rel=0.02)
    assert p.duration == pytest.approx(base.duration * 2.2, rel=0.02)
    # Two are too few, and unlike ones (twice the memory, thrice the dirty rate, another link) do not count.
    unlike = (past(5.0, memory=2 * GIB), past(5.0, dirty=180e6),
              dataclasses.replace(past(5.0), stream=StreamClass(None, Compression.NONE, True)))
    assert predict(guest, route, dataclasses.replace(params, past=alike[:2] + unlike)) == base


def test_alike_migrations_that_converged_outweigh_a_replay_that_does_not() -> None:
    params = ModelParams(TRUE_FIXED, TRUE_CLASSES)
    # Beyond the link and deaf to the throttle, says the replay
    guest = Guest(memory=GIB, zero_fraction=0.5, dirty_rate=2e9, working_set=256 * MIB, throttleable=False)
    route = Route(GBIT)
    assert not replay(guest, route, params).converged
    past = tuple(Past(stream_class(route), GIB, 2e9, False, None, (d, d - 0.3, pause, pause / 2))
                 for d, pause in ((12.0, 0.05), (14.0, 0.07), (13.0, 0.09)))
    p = predict(guest, route, dataclasses.replace(params, past=past))
    assert p.converged and p.reason is None and p.alike == 3
    assert (p.duration, p.pause) == (13.0, 0.07)


def test_calibration_keeps_the_history_for_corrections() -> None:
    history = _synthetic(ModelParams(TRUE_FIXED, TRUE_CLASSES))
    fitted = calibrate(history)
    assert len(fitted.past) == len(history)
    assert all(x.replayed is not None for x in fitted.past)
    assert [x.actual[0] for x in fitted.past] == [o.duration for o in history]


def test_an_unseen_slower_link_is_bounded_by_the_link() -> None:
    params = ModelParams(TRUE_FIXED, TRUE_CLASSES)
    th = params.throughput(StreamClass(GBIT // 10, Compression.ZSTD, False))
    assert th.page_rate == pytest.approx(GBIT // 10 * 0.95 / 0.2)


# ---------------------------------------------------------------------------------- records


def _record(**changes: object) -> MigrationRecord:
    summary = Summary(total_ms=2500.0, downtime_ms=12.0, pause_ms=20.0, setup_ms=5.0, rounds=6, bytes=85_000_000,
                      zero_pages=50_000, normal_pages=140_000, mean_link_rate=40e6, peak_dirty_rate=100e6,
                      throttle_max=0.6, encrypted=False, converged=True, postcopy=False, compression="zstd")
    base = MigrationRecord(id="m1", vm="web1", source="host-a", destination="host-b", options=MigrationOptions(),
                           phase=Phase.DONE, started_at=100.0, ended_at=103.0, summary=summary,
                           phase_times=(("check", 100.0), ("precopy", 100.15), ("done", 102.7)),
                           encrypted=False, link_rate=GBIT)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_record_keeps_its_forecast_and_link_through_json() -> None:
    p = predict(Guest(memory=512 * MIB, zero_fraction=0.2, dirty_rate=100e6, working_set=256 * MIB), Route(GBIT))
    forecast = Forecast(duration_ms=p.duration * 1000, total_ms=p.total * 1000, downtime_ms=p.downtime * 1000,
                        rounds=p.rounds, bytes=p.bytes, converged=p.converged, memory=p.guest.memory,
                        zero_fraction=p.guest.zero_fraction, dirty_rate=p.guest.dirty_rate,
                        working_set=p.guest.working_set, link_rate=p.route.link_rate,
                        compression=p.compression.value, samples=0)
    rec = _record(forecast=forecast)
    again = record_from_json(json.loads(json.dumps(as_json(rec))))
    assert again == rec
    old = as_json(_record())
    del old["link_rate"], old["forecast"]  # a record written before these fields
    assert record_from_json(old).link_rate is None and record_from_json(old).forecast is None


def test_a_finished_record_is_an_observation() -> None:
    o = observed_from_record(_record())
    assert o is not None
    assert o.stream_class == StreamClass(GBIT, Compression.ZSTD, False)
    assert o.total == pytest.approx(2.5) and o.downtime == pytest.approx(0.012) and o.pause == pytest.approx(0.02)
    assert o.prepare == pytest.approx(0.15) and o.duration == pytest.approx(2.7)
    assert o.page_bytes == 140_000 * 4096 and o.wire_bytes == 85_000_000
    assert o.guest.dirty_rate == 100e6  # no forecast: the peak QEMU measured stands in
    assert observed_from_record(_record(phase=Phase.FAILED)) is None
    assert observed_from_record(_record(summary=None)) is None
