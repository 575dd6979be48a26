"""The benchmarks' pure part: cell labels, lower bound, verdicts against issue 6's bars."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.benchmodel import GBIT, PAGE, SPARSE_STRIDE, Cell, Method, RunResult, markdown_table, parse_dirty, verdict

GIB = 1 << 30


def _run(method: Method, cell: Cell, *, total: float | None, gap: float, converged: bool = True,
         zero_pages: int = 0) -> RunResult:
    return RunResult(
        method=method.value, cell=cell.key, converged=converged, total_ms=total if converged else None,
        downtime_ms=10.0 if converged else None, client_gap_ms=gap, end_to_end_ms=(total or 60000) + 200,
        bytes=100 << 20, zero_pages=zero_pages, normal_pages=0, rounds=3, memory=cell.memory,
        link_rate=cell.link_rate, encrypted=False, to_resume_ms=(total + 5) if (converged and total) else None,
    )


def test_cell_labels_and_dirty_parsing():
    assert parse_dirty("idle") == (None, 1) and parse_dirty("max") == (0, 1)
    assert parse_dirty("100M") == (100_000_000, 1) and parse_dirty("sparse") == (0, SPARSE_STRIDE)
    assert Cell(GIB, None, 0, GBIT).key == "1G/idle/1gbit"
    assert Cell(512 << 20, 100_000_000, 256 << 20, None).key == "512M/100M/s/unshaped"
    assert Cell(512 << 20, 0, 256 << 20, GBIT).dirty_label == "max"
    assert Cell(512 << 20, 0, 256 << 20, GBIT, SPARSE_STRIDE).key == "512M/sparse/1gbit"
    assert Cell(512 << 20, 100_000_000, 256 << 20, GBIT, SPARSE_STRIDE).dirty_label == "100M/s sparse"


def test_lower_bound_is_nonzero_pages_over_link_rate():
    cell = Cell(GIB, None, 0, GBIT)
    zero = GIB // PAGE - (100 << 20) // PAGE  # 100 MiB of the guest is not zero
    r = _run(Method.KVMOTION, cell, total=900, gap=50, zero_pages=zero)
    assert r.nonzero_bytes == 100 << 20
    assert r.lower_bound_ms == pytest.approx((100 << 20) / GBIT * 1000)
    assert _run(Method.KVMOTION, Cell(GIB, None, 0, None), total=1, gap=1).lower_bound_ms is None


def test_idle_1g_needs_half_of_libvirts_gap_and_the_bound():
    cell = Cell(GIB, None, 0, GBIT)
    zero = GIB // PAGE - (80 << 20) // PAGE  # bound = 671 ms
    lib = _run(Method.LIBVIRT, cell, total=800, gap=200, zero_pages=zero)
    qd = _run(Method.QEMU, cell, total=800, gap=150, zero_pages=zero)
    good = verdict(cell, [_run(Method.KVMOTION, cell, total=790, gap=100, zero_pages=zero), lib, qd])
    assert good.ok and good.gap_ratio_libvirt == pytest.approx(0.5) and good.bound_ok
    not_half = verdict(cell, [_run(Method.KVMOTION, cell, total=790, gap=101, zero_pages=zero), lib, qd])
    assert not not_half.gap_ok and not not_half.ok
    slow = verdict(cell, [_run(Method.KVMOTION, cell, total=880, gap=90, zero_pages=zero),
                          _run(Method.LIBVIRT, cell, total=900, gap=200, zero_pages=zero)])
    assert slow.total_ok and slow.bound_ok is False and not slow.ok  # 880 > 1.3 x 671


def test_other_cells_need_no_worse_and_ignore_baselines_that_never_switched_over():
    cell = Cell(512 << 20, 0, 256 << 20, GBIT)
    kv = _run(Method.KVMOTION, cell, total=5000, gap=120)
    stuck = _run(Method.LIBVIRT, cell, total=None, gap=3.0, converged=False)
    v = verdict(cell, [kv, stuck, _run(Method.QEMU, cell, total=None, gap=2.0, converged=False)])
    assert v.ok and v.bound_ok is None and v.gap_ratio_libvirt is None
    worse = verdict(cell, [kv, _run(Method.LIBVIRT, cell, total=4000, gap=200)])
    assert worse.gap_ok and not worse.total_ok and not worse.ok
    failed = verdict(cell, [_run(Method.KVMOTION, cell, total=None, gap=1, converged=False), stuck])
    assert not failed.kvmotion_converged and not failed.ok


def test_markdown_table_has_a_row_per_method_and_a_verdict_per_cell():
    cell = Cell(512 << 20, None, 0, None)
    runs = [_run(m, cell, total=300, gap=40) for m in Method]
    text = markdown_table([cell], runs)
    assert text.count("| 512M/idle/unshaped |") == 4
    assert "| ok |" in text
