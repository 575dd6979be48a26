"""Pure parts of the client probe: stream checking, gap analysis, report JSON."""

import math

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.net.probe import (
    CHUNK,
    Gap,
    ProbeReport,
    StreamChecker,
    TcpResult,
    UdpSample,
    largest_gap,
    largest_gap_outside,
    make_chunk,
    parse_target,
    reply_times,
    summarize_udp,
)


def _stream(seqs):
    return b"".join(make_chunk(s, 0.0) for s in seqs)


def test_chunk_size():
    assert len(make_chunk(12345, 1.5)) == CHUNK


def test_clean_stream_in_odd_pieces():
    data = _stream(range(100))
    c = StreamChecker()
    for i in range(0, len(data), 37):
        c.feed(data[i : i + 37], now=i / 1000)
    assert (c.ok, c.lost, c.duplicated, c.reordered, c.corrupted) == (100, 0, 0, 0, 0)
    assert c.next_seq == 100 and c.pending_bytes == 0


def test_lost_duplicated_reordered_corrupted():
    c = StreamChecker()
    c.feed(_stream([0, 1, 3, 4]), 0.0)  # 2 missing
    assert c.lost == 1
    c.feed(_stream([2]), 0.0)  # ... it turns up late
    assert (c.lost, c.reordered) == (0, 1)
    c.feed(_stream([4]), 0.0)  # seen already
    assert c.duplicated == 1
    bad = bytearray(make_chunk(5, 0.0))
    bad[-1] ^= 0xFF
    c.feed(bytes(bad), 0.0)
    assert c.corrupted == 1
    c.feed(_stream([6]), 0.0)  # back in step after the corrupted chunk took seq 5's place
    assert c.lost == 0 and c.next_seq == 7


def _timeline(outage=(0.5, 0.8), n=1000, interval=0.001, rtt=0.0002):
    out = []
    for k in range(n):
        t = round(k * interval, 6)
        lost = outage[0] <= t < outage[1]
        out.append(UdpSample(k, t, None if lost else rtt))
    return out


def test_largest_gap_is_the_outage():
    samples = _timeline((0.5, 0.8))
    gap = largest_gap(samples)
    # last reply before: probe sent at 0.499; first after: probe sent at 0.800
    assert gap.start == pytest.approx(0.4992) and gap.end == pytest.approx(0.8002)
    assert gap.duration == pytest.approx(0.301)


def test_gap_within_window_and_outside_windows():
    samples = _timeline((0.5, 0.8))
    assert largest_gap(samples, 0.0, 0.4).duration == pytest.approx(0.001)
    assert largest_gap(samples, 0.6, 0.7).duration == pytest.approx(0.1)  # window inside the outage
    # the switchover window covers the outage: what is left is ordinary spacing
    assert largest_gap_outside(samples, [(0.49, 0.81)]).duration == pytest.approx(0.001, abs=3e-4)
    # a window that ends before the outage does: the overhang counts
    overhang = largest_gap_outside(samples, [(0.49, 0.7)])
    assert overhang.start == pytest.approx(0.7) and overhang.duration == pytest.approx(0.1002)


def test_trailing_outage_counts():
    samples = _timeline((0.9, 2.0))
    assert largest_gap(samples).end == pytest.approx(0.999)


def test_summary_counts_and_percentiles():
    samples = _timeline((0.5, 0.8))
    s = summarize_udp(samples, duplicates=2, reordered=1)
    assert (s.sent, s.received, s.lost, s.duplicates, s.reordered) == (1000, 700, 300, 2, 1)
    assert s.rtt_p50_ms == pytest.approx(0.2) and s.rtt_max_ms == pytest.approx(0.2)
    assert reply_times(samples)[0] == pytest.approx(0.0002)
    empty = summarize_udp([])
    assert empty.sent == 0 and math.isnan(empty.rtt_p50_ms)


def test_report_json_roundtrip():
    samples = tuple(_timeline((0.5, 0.6), n=700))
    report = ProbeReport(
        target="10.77.1.10:7000",
        interval_s=0.001,
        started_wall=1.7e9,
        started_mono=1234.5,
        duration_s=0.7,
        send_lateness_max_s=0.0004,
        scheduling="fifo:10",
        udp=summarize_udp(samples),
        tcp=TcpResult(True, True, None, 700, 700, 0, 0, 0, 0, Gap(0.5, 0.61)),
        samples=samples,
    )
    back = ProbeReport.from_json(report.to_json())
    assert back == report
    assert back.tcp is not None and back.tcp.clean
    assert "largest gap 101.0 ms" in back.summary_line()


def test_parse_target():
    assert parse_target("10.77.1.10:7000") == ("10.77.1.10", 7000)
    for bad in ("10.77.1.10", ":7000", "x:0", "x:70000", "x:port"):
        with pytest.raises(InvalidInput):
            parse_target(bad)
