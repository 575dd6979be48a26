"""query-migrate parsing, round derivation and the migration summary."""

from __future__ import annotations

import json
import math

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.migration.stats import MigrationStats, RoundStats, RoundTracker
from kvmotion.qemu.migstatus import MigrationSample, MigrationStatus, RamStats

MIB = 1 << 20

# Shaped like QEMU 10.0.2's answers (fields it omits in each state are left out).
SETUP = {"status": "setup", "setup-time": 0}
ACTIVE = {
    "status": "active",
    "total-time": 2150,
    "setup-time": 12,
    "expected-downtime": 300,
    "ram": {
        "transferred": 241_000_000,
        "remaining": 300 * MIB,
        "total": 537_526_272,
        "duplicate": 20_000,
        "normal": 58_000,
        "normal-bytes": 237_568_000,
        "dirty-pages-rate": 12_000,
        "mbps": 940.5,
        "dirty-sync-count": 1,
        "precopy-bytes": 241_000_000,
        "downtime-bytes": 0,
        "postcopy-bytes": 0,
        "page-size": 4096,
        "pages-per-second": 28_000,
        "postcopy-requests": 0,
        "multifd-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    },
}
COMPLETED = {
    "status": "completed",
    "total-time": 4870,
    "setup-time": 12,
    "downtime": 9,
    "cpu-throttle-percentage": 0,
    "ram": dict(ACTIVE["ram"], transferred=560_000_000, remaining=0, **{"dirty-sync-count": 4, "downtime-bytes": 2_100_000}),
}


def test_setup_sample_without_ram_parses() -> None:
    s = MigrationSample.from_qmp(SETUP, at=0.01)
    assert s.status is MigrationStatus.SETUP and s.ram is None
    assert s.total_time_ms is None and s.downtime_ms is None and s.sync_count == 0
    assert s.time == 0.01


def test_empty_answer_means_no_migration() -> None:
    s = MigrationSample.from_qmp({})
    assert s.status is MigrationStatus.NONE and s.time is None


def test_active_sample_fields_and_rates() -> None:
    s = MigrationSample.from_qmp(ACTIVE)
    assert s.status is MigrationStatus.ACTIVE and not s.status.is_terminal
    assert s.time == 2.15  # QEMU's total-time when no caller clock is given
    assert s.expected_downtime_ms == 300 and s.setup_time_ms == 12
    ram = s.ram
    assert ram is not None
    assert ram.dirty_rate == 12_000 * 4096
    assert ram.link_rate == pytest.approx(940.5e6 / 8)
    assert ram.dirty_sync_count == 1 and ram.page_size == 4096


def test_missing_page_size_defaults_to_4k_and_unknown_status_is_tolerated() -> None:
    s = MigrationSample.from_qmp({"status": "postcopy-device", "ram": {"dirty-pages-rate": 10}})
    assert s.status is MigrationStatus.UNKNOWN
    assert s.ram is not None and s.ram.dirty_rate == 10 * 4096


def test_status_properties() -> None:
    assert MigrationStatus.COMPLETED.is_terminal and MigrationStatus.CANCELLED.is_terminal
    assert MigrationStatus.POSTCOPY_PAUSED.is_postcopy and not MigrationStatus.ACTIVE.is_postcopy
    assert MigrationStatus.DEVICE.is_switching_over


@pytest.mark.parametrize("bad", [{"status": "active", "total-time": "soon"}, {"ram": [1, 2]}, [1]])
def test_malformed_answers_raise_invalid_input(bad) -> None:
    with pytest.raises(InvalidInput):
        MigrationSample.from_qmp(bad)


def active(t: float, sync: int, transferred: int, remaining: int, dirty_pages: int = 0, mbps: float = 900.0, throttle=None):
    data = {
        "status": "active",
        "total-time": int(t * 1000),
        "ram": {
            "transferred": transferred,
            "remaining": remaining,
            "total": 512 * MIB,
            "dirty-pages-rate": dirty_pages,
            "mbps": mbps,
            "dirty-sync-count": sync,
            "page-size": 4096,
        },
    }
    if throttle is not None:
        data["cpu-throttle-percentage"] = throttle
    return MigrationSample.from_qmp(data, at=100.0 + t)


def test_round_between_two_samples() -> None:
    start = active(0.5, 1, 10 * MIB, 500 * MIB)
    end = active(4.5, 2, 10 * MIB + 480_000_000, 60 * MIB, dirty_pages=30_000)
    r = RoundStats.between(start, end)
    assert r.round == 1 and r.first_round == 1 and r.syncs == 1
    assert r.started_at == 100.5 and r.wall_time == pytest.approx(4.0)
    assert r.bytes_sent == 480_000_000
    assert r.link_rate == pytest.approx(120e6)
    assert r.dirty_rate == 30_000 * 4096
    assert r.remaining == 60 * MIB
    assert r.predicted_downtime == pytest.approx(60 * MIB / 120e6)
    assert r.dirty_to_link == pytest.approx(30_000 * 4096 / 120e6)


def test_a_pass_shorter_than_qemu_s_dirty_rate_window_estimates_it_from_what_the_sync_found() -> None:
    # QEMU reports dirty-pages-rate 0 until it has measured over 1 s; a 0.7 s first pass left
    # 230 MiB pending: the guest dirtied at least that much during it
    r = RoundStats.between(active(0.1, 1, 0, 512 * MIB), active(0.8, 2, 250_000_000, 230 * MIB))
    assert r.dirty_rate == pytest.approx(230 * MIB / 0.7)
    assert r.dirty_to_link == pytest.approx(230 * MIB / 250_000_000)
    # an idle guest's pass: the few pages it re-dirtied give a rate far below the link's
    idle = RoundStats.between(active(0.1, 1, 0, 512 * MIB), active(0.8, 2, 250_000_000, 2 * MIB))
    assert idle.dirty_to_link < 0.01
    # once QEMU has measured, its figure is used as it is
    measured = RoundStats.between(active(0.1, 1, 0, 512 * MIB), active(1.3, 2, 250_000_000, 230 * MIB, dirty_pages=100))
    assert measured.dirty_rate == 100 * 4096


def test_short_round_falls_back_to_qemu_rate() -> None:
    start = active(5.0, 3, 1000, 5 * MIB)
    end = active(5.05, 5, 2000, 4 * MIB, mbps=800.0)
    r = RoundStats.between(start, end)
    assert r.round == 4 and r.first_round == 3 and r.syncs == 2
    assert r.link_rate == pytest.approx(100e6)


def test_round_needs_a_sync_between_the_samples() -> None:
    with pytest.raises(InvalidInput):
        RoundStats.between(active(1, 2, 0, 1), active(2, 2, 10, 1))
    with pytest.raises(InvalidInput):
        RoundStats.between(MigrationSample.from_qmp(SETUP), active(2, 2, 10, 1))


def test_nothing_pending_predicts_no_downtime_and_a_dead_link_forever() -> None:
    base = dict(round=2, first_round=2, started_at=0.0, wall_time=1.0, bytes_sent=0, dirty_rate=0.0, throttle=0.0)
    assert RoundStats(link_rate=1e6, remaining=0, **base).predicted_downtime == 0
    assert math.isinf(RoundStats(link_rate=0.0, remaining=10, **base).predicted_downtime)


def test_tracker_closes_rounds_and_tracks_throttle() -> None:
    samples = [
        MigrationSample.from_qmp(SETUP, at=100.0),
        active(0.2, 1, 1 * MIB, 511 * MIB),
        active(2.2, 1, 230 * MIB, 282 * MIB),
        active(4.6, 2, 512 * MIB, 100 * MIB, dirty_pages=25_000),  # first pass done
        active(4.8, 2, 535 * MIB, 80 * MIB, dirty_pages=25_000, throttle=20),
        active(5.6, 3, 620 * MIB, 40 * MIB, dirty_pages=9_000),
    ]
    tracker = RoundTracker()
    closed = []
    for s in samples:
        tracker, r = tracker.observe(s, throttle=0.5 if s.time and s.time > 104.7 else 0.0)
        closed.append(r)
    assert [r.round if r else None for r in closed] == [None, None, None, 1, None, 2]
    first, second = tracker.rounds
    assert first.wall_time == pytest.approx(4.4) and first.bytes_sent == 511 * MIB
    assert first.throttle == 0.0
    assert second.throttle == 0.5  # ours (50 %) beat QEMU's 20 % during that round
    assert tracker.latest_round is second and tracker.throttle_max == 0.5
    assert second.remaining == 40 * MIB


def test_summary_and_json_round_trip() -> None:
    tracker = RoundTracker()
    for s in (active(0.2, 1, MIB, 511 * MIB), active(4.6, 2, 512 * MIB, 9 * MIB, dirty_pages=400)):
        tracker, _ = tracker.observe(s, throttle=0.2)
    tracker, _ = tracker.observe(MigrationSample.from_qmp(COMPLETED, at=104.9))
    stats = tracker.summary()
    assert stats.status is MigrationStatus.COMPLETED
    assert stats.total_time == 4.87 and stats.downtime == 0.009 and stats.setup_time == 0.012
    assert stats.rounds == 4 and stats.bytes_transferred == 560_000_000
    assert stats.downtime_bytes == 2_100_000 and stats.zero_pages == 20_000
    assert stats.memory == 537_526_272 and stats.throttle_max == 0.2
    assert stats.mean_link_rate == pytest.approx(241_000_000 / (4.87 - 0.012 - 0.009))
    assert stats.peak_dirty_rate == 12_000 * 4096
    # The completed sample closes the last rounds (the final sync happens at switchover).
    assert [(r.first_round, r.round) for r in stats.round_log] == [(1, 1), (2, 3)]
    assert stats.round_log[-1].remaining == 0
    text = json.dumps(stats.to_json())
    again = MigrationStats.from_json(json.loads(text))
    assert again == stats


def test_from_json_refuses_garbage() -> None:
    with pytest.raises(InvalidInput):
        MigrationStats.from_json({"status": "completed"})
    good = MigrationStats.from_samples(MigrationSample.from_qmp(COMPLETED)).to_json()
    with pytest.raises(InvalidInput):
        MigrationStats.from_json(dict(good, surprise=1))


def test_summary_of_a_failed_migration_keeps_the_error() -> None:
    failed = MigrationSample.from_qmp({"status": "failed", "error-desc": "Unable to write to socket"})
    stats = MigrationStats.from_samples(failed)
    assert stats.status is MigrationStatus.FAILED and stats.error == "Unable to write to socket"
    assert stats.downtime is None and stats.bytes_transferred == 0
    assert RamStats() == RamStats.from_qmp({})
    with pytest.raises(InvalidInput):
        RoundTracker().summary()


def test_a_compressed_round_knows_the_pages_it_moved() -> None:
    def sample(t: float, sync: int, transferred: int, normal_pages: int) -> MigrationSample:
        data = {"status": "active", "total-time": int(t * 1000),
                "ram": {"transferred": transferred, "remaining": 40 * MIB, "total": 512 * MIB, "normal": normal_pages,
                        "dirty-pages-rate": 50_000, "mbps": 1000.0, "dirty-sync-count": sync, "page-size": 4096}}
        return MigrationSample.from_qmp(data, at=t)

    # 100 MB crossed the wire in 1 s carrying 100_000 pages (409.6 MB): compressed 4.1x
    r = RoundStats.between(sample(1.0, 1, 0, 0), sample(2.0, 2, 100_000_000, 100_000))
    assert r.bytes_sent == 100_000_000 and r.link_rate == pytest.approx(100e6)
    assert r.page_rate == pytest.approx(409.6e6)
    assert RoundStats.from_json(r.to_json()) == r
    # uncompressed, page headers make the wire carry a little more than the pages: the wire's rate
    r = RoundStats.between(sample(1.0, 1, 0, 0), sample(2.0, 2, 410_000_000, 100_000))
    assert r.page_rate == r.link_rate == pytest.approx(410e6)
