#!/usr/bin/env python3
"""Where a kvmotion migration's pause goes, run by run (a diagnostic, not a comparison).

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/switchover.py [--memory 1G] [--link 1gbit|none]
        [--dirty idle|100M|max|sparse] [--runs 3] [--plain]

One guest in a two-host lab, migrated host-a -> host-b through the agents with the default policy,
booted afresh each run, the client's 1 ms UDP probe running. Per run: the client's largest gap,
kvmotion's pause (source stopped -> destination resumed), QEMU's downtime, resumed -> the
client's first reply, the stream's compression, rounds, throttle, migrate -> running on the
destination and MiB sent. This is what bench/README.md's tables on compression and receive
buffers were read from (with builds that switched those off). JSON to bench/results/switchover.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.benchmodel import Cell, RunResult, parse_dirty, parse_link
from kvmotion.core.errors import KvmotionError
from kvmotion.core.units import parse_size

RESULTS = Path(__file__).parent / "results"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def row(r: RunResult) -> str:
    return (f"| {_ms(r.client_gap_ms)} | {_ms(r.pause_ms)} | {_ms(r.downtime_ms)} | {_ms(r.resume_to_reply_ms)} "
            f"| {r.compression} | {r.rounds} | {r.throttle_max:.0%} | {_ms(r.to_resume_ms)} | {r.bytes >> 20} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--link", default="1gbit", help="1gbit, 10gbit, a rate, or none (unshaped)")
    ap.add_argument("--dirty", default="idle", help="idle, a rate such as 100M (bytes/s), max or sparse (flat out)")
    ap.add_argument("--wss", default="256M", help="memory writer's working set")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--plain", dest="encrypted", action="store_false",
                    help="no TLS (default: TLS with the cluster CA, kvmotion's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "switchover.json")
    args = ap.parse_args()
    try:
        rate, stride = parse_dirty(args.dirty)
        cell = Cell(memory=parse_size(args.memory), dirty_rate=rate, wss=parse_size(args.wss),
                    link_rate=parse_link(args.link), stride=stride)
    except KvmotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    results: list[RunResult] = []
    print(f"{cell.key}, {args.runs} run(s)")
    print("| client gap ms | pause ms | QEMU downtime ms | resume -> reply ms | compression | rounds | throttle "
          "| to resume ms | MiB sent |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    with harness.bench_lab(cell.link_rate, args.encrypted) as lab, tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):
            try:
                r = harness.run_kvmotion(lab, cell, 75.0, Path(folder)).result
            except KvmotionError as exc:
                print(f"run failed: {exc}", flush=True)
                continue
            finally:
                harness.remove_vm(lab)
            results.append(r)
            print(row(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "switchover", "command": " ".join(sys.argv), "cell": cell.key,
                                    "runs": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0 if len(results) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
