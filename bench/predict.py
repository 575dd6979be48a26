#!/usr/bin/env python3
"""How well kvmotion.migration.predict foresees real migrations: median |predicted - actual| / actual.

Reads bench/compare.py results (kvmotion's runs) and/or folders of migration records (a source
agent's `migrations/*.json`), then predicts each migration from a model calibrated on all the
others (leave-one-out; `--leave cell` also leaves out every run of the same cell and file, i.e.
a guest and link never seen before; `--history` calibrates on another session's runs only). No QEMU
needed. "downtime" is the guest's: source stopped -> destination resumed (kvmotion's pause);
QEMU's own figure (`qemu_downtime`) ends when the source has sent the last byte, before the
destination has loaded it.

    bench/predict.py bench/results/compare*.json --out bench/results/predict.json
    bench/predict.py TODAY.json --history YESTERDAY.json

Inputs taken from a compare run: guest memory, zero pages (QEMU's count), the guest writer's rate
measured just before the migration (`writer_rate`; idle: 0) and its working set (the cell's wss),
the shaped link rate (unshaped: unknown), TLS, the compression kvmotion chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.migration import Compression, record_from_json
from kvmotion.migration.predict import PAGE, Guest, Observed, Prediction, Route, calibrate, observed_from_record, predict

# downtime: the guest's (source stopped -> destination resumed, kvmotion's pause); qemu_downtime:
# QEMU's figure, which ends when the source has sent its last byte, before the destination loads it.
METRICS = ("duration", "total", "downtime", "qemu_downtime")


@dataclass(frozen=True)
class Case:
    source: str  # file it came from
    cell: str  # compare cell, or the record's VM
    observed: Observed


def cases_from_compare(path: Path, data: dict) -> list[Case]:
    out = []
    for cell in data.get("cells", ()):
        for r in cell.get("runs", ()):
            if r.get("method") != "kvmotion" or not r.get("converged") or r.get("total_ms") is None:
                continue
            phases = dict(r.get("phases_ms") or ())
            memory = int(r["memory"])
            writer = r.get("writer_rate")
            guest = Guest(memory=memory, zero_fraction=min(1.0, r["zero_pages"] * PAGE / memory),
                          dirty_rate=float(writer or 0.0), working_set=int(cell["wss"]) if writer else None)
            obs = Observed(
                guest=guest,
                route=Route(link_rate=r.get("link_rate"), encrypted=bool(r.get("encrypted"))),
                compression=Compression(r.get("compression", "none")),
                total=r["total_ms"] / 1000,
                setup=(r.get("setup_ms") or 0.0) / 1000,
                downtime=(r.get("downtime_ms") or 0.0) / 1000,
                page_bytes=int(r["normal_pages"]) * PAGE,
                wire_bytes=int(r["bytes"]),
                pause=r["pause_ms"] / 1000 if r.get("pause_ms") is not None else None,
                prepare=phases["precopy"] / 1000 if "precopy" in phases else None,
                duration=phases["done"] / 1000 if "done" in phases else None,
            )
            out.append(Case(path.name, r["cell"], obs))
    return out


def cases_from_records(folder: Path) -> list[Case]:
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            rec = record_from_json(json.loads(p.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        obs = observed_from_record(rec)
        if obs is not None:
            out.append(Case(folder.name, rec.vm, obs))
    return out


def load(paths: Sequence[Path]) -> list[Case]:
    cases: list[Case] = []
    for path in paths:
        if path.is_dir():
            cases += cases_from_records(path)
            continue
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "cells" not in data:
            raise SystemExit(f"{path}: not a bench/compare.py result (no 'cells') nor a folder of records")
        cases += cases_from_compare(path, data)
    return cases


def actual(o: Observed, metric: str) -> float | None:
    return {"duration": o.duration, "total": o.total, "downtime": o.pause, "qemu_downtime": o.downtime}[metric]


def predicted(p: Prediction, metric: str) -> float:
    return {"duration": p.duration, "total": p.total, "downtime": p.pause, "qemu_downtime": p.downtime}[metric]


def rel_error(pred: float, act: float | None) -> float | None:
    if act is None or act <= 0:
        return None
    return abs(pred - act) / act


def median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def evaluate(cases: Sequence[Case], leave: str, earlier: Sequence[Case] | None = None) -> list[dict]:
    """Each case predicted from the others (leave-one-out) or, given `earlier`, from those alone
    (twins: the same cell name there)."""
    rows = []
    fixed = calibrate([c.observed for c in earlier]) if earlier is not None else None
    for i, case in enumerate(cases):
        if earlier is not None:
            others = [c for c in earlier if not (leave == "cell" and c.cell == case.cell)]
            twin_cases = [c for c in earlier if c.cell == case.cell]
        else:
            others = [c for j, c in enumerate(cases) if j != i
                      and not (leave == "cell" and (c.source, c.cell) == (case.source, case.cell))]
            twin_cases = [c for j, c in enumerate(cases) if j != i and (c.source, c.cell) == (case.source, case.cell)]
        history = [c.observed for c in others]
        params = fixed if fixed is not None and leave == "one" else calibrate(history)
        o = case.observed
        p = predict(o.guest, o.route, params)
        row: dict = {"source": case.source, "cell": case.cell, "converged": p.converged, "rounds": p.rounds,
                     "predicted_bytes": p.bytes, "actual_bytes": o.wire_bytes}
        for m in METRICS:
            row[f"predicted_{m}_ms"] = round(predicted(p, m) * 1000, 1)
            act = actual(o, m)
            row[f"actual_{m}_ms"] = None if act is None else round(act * 1000, 1)
            row[f"error_{m}"] = rel_error(predicted(p, m), act)
            # Baseline: the median of the same history, no model.
            past = median([actual(h, m) for h in history])
            row[f"baseline_error_{m}"] = rel_error(past, act) if past is not None else None
            # Noise floor: the median of the other runs of the same cell and file (same guest,
            # link and build): what a predictor that knew the conditions exactly would miss by.
            twins = median([actual(c.observed, m) for c in twin_cases])
            row[f"twins_error_{m}"] = rel_error(twins, act) if twins is not None else None
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict], kind: str = "error") -> dict:
    return {m: median([r[f"{kind}_{m}"] for r in rows]) for m in METRICS}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="compare.py JSON results or folders of migration records")
    ap.add_argument("--leave", choices=("one", "cell"), default="one",
                    help="leave out the migration predicted (one) or every run of its cell and file (cell)")
    ap.add_argument("--history", type=Path, nargs="+", metavar="PATH",
                    help="calibrate on these (an earlier session's runs) and predict every migration of PATHS")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(Path(__file__).parent.joinpath("results").glob("compare*.json"))
    for p in [*paths, *(args.history or ())]:
        if not p.exists():
            print(f"{p}: no such file or folder", file=sys.stderr)
            return 2
    cases = load(paths)
    earlier = load(args.history) if args.history else None
    if len(cases) < 2 or (earlier is not None and not earlier):
        print(f"need at least 2 finished migrations to predict and some to calibrate on, found {len(cases)}"
              + (f" and {len(earlier)}" if earlier is not None else ""), file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rows = evaluate(cases, args.leave, earlier)
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(f"{r['source']} {r['cell']}", []).append(r)
    by_cell_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_cell_kind.setdefault(r["cell"], []).append(r)
    report = {
        "benchmark": "migration prediction: median |predicted - actual| / actual, "
                     + ("calibrated on --history" if earlier is not None else "leave-" + args.leave + "-out"),
        "command": " ".join(["bench/predict.py", *sys.argv[1:]]) if argv is None else "bench/predict.py " + " ".join(argv),
        "sources": [str(p) for p in paths],
        "history": [str(p) for p in args.history or ()],
        "migrations": len(rows),
        "seconds": round(time.monotonic() - t0, 1),
        "median_rel_error": summarize(rows),
        "baseline_median_rel_error": summarize(rows, "baseline_error"),  # predicting the history's median
        "twins_median_rel_error": summarize(rows, "twins_error"),  # predicting the same cell's other runs' median
        "by_cell": {k: {"runs": len(v), **summarize(v)} for k, v in sorted(by_cell_kind.items())},
        "by_source_cell": {k: {"runs": len(v), **summarize(v)} for k, v in sorted(cells.items())},
        "runs": rows,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(json.dumps({k: report[k] for k in ("migrations", "median_rel_error", "baseline_median_rel_error",
                                                        "twins_median_rel_error")}, indent=1))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
