#!/usr/bin/env python3
"""kvmotion vs the same QEMU as libvirt drives it vs QEMU's bare defaults: live migration, one run.

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/compare.py [--plain] \
        [--grid 512M:idle,1G:idle,512M:100M,1G:100M,512M:max,512M:sparse] [--links 1gbit,none] [--runs 1] \
        [--timeout 60]

Per cell (memory:dirty rate, on each link) the three methods run alternately on the same guest
(same kernel, initramfs, command line, workload echo[+mem]) in the same two-host lab. The memory
writer rewrites whole pages (a rate, or max: flat out) or, "sparse", flat out one word in 64 of
each page after its first write: pages dirtied for a 64th of the CPU, faster than 1 Gbit/s even
under TCG, where the whole-page writer cannot outrun the link on every machine.
- kvmotion: the agents' migration API with the default policy (plain or TLS: same for all three);
- libvirt: `virsh migrate --live` semantics over QMP: max-bandwidth unlimited, downtime-limit
  300 ms (QEMU's default), no auto-converge; the destination is resumed once the source completes;
- qemu-default: QEMU's bare defaults (128 MiB/s, 300 ms).
A baseline that has not completed after --timeout seconds is cancelled and counts as not converged.
Figures: QEMU's total-time and downtime, the largest gap in the client's 1 ms UDP echo probe
(migrate -> destination resumed + 1 s), bytes sent, rounds; ratios kvmotion/baseline and the
physical lower bound (non-zero guest pages ÷ link rate). JSON to bench/results/compare.json, the
table to bench/results/compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.benchmodel import Cell, Method, RunResult, markdown_table, parse_dirty, parse_link, verdict
from kvmotion.core.errors import KvmotionError
from kvmotion.core.units import parse_size

RESULTS = Path(__file__).parent / "results"


def parse_grid(text: str, links: list[int | None], wss: int) -> list[Cell]:
    cells = []
    for link in links:
        for item in text.split(","):
            mem, _, dirty = item.partition(":")
            rate, stride = parse_dirty(dirty or "idle")
            cells.append(Cell(memory=parse_size(mem), dirty_rate=rate, wss=wss, link_rate=link, stride=stride))
    return cells


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else "unknown"
    except OSError:
        return "unknown"


def run_cell(lab: harness.BenchLab, cell: Cell, methods: list[Method], runs: int, timeout: float,
             folder: Path, log) -> list[RunResult]:
    out: list[RunResult] = []
    for i in range(runs):
        # rotate the order so no method always runs first (machine load, page cache)
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        for m in order:
            t0 = time.monotonic()
            try:
                if m is Method.KVMOTION:
                    try:
                        r = harness.run_kvmotion(lab, cell, timeout, folder).result
                    finally:
                        harness.remove_vm(lab)
                else:
                    r = harness.run_baseline(lab, cell, m, timeout, folder)
            except KvmotionError as exc:
                log(f"  {cell.key} {m.value}: run failed: {exc}")
                continue
            out.append(r)
            log(
                f"  {cell.key:22} {m.value:12} {'converged' if r.converged else 'NOT converged':13} "
                f"total {r.total_ms or float('nan'):7.0f} ms  to resume {r.to_resume_ms or float('nan'):7.0f} ms  "
                f"downtime {r.downtime_ms or float('nan'):5.0f} ms  "
                f"client gap {r.client_gap_ms:6.1f} ms  {r.bytes / 2**20:7.0f} MiB  rounds {r.rounds:3d}  "
                f"throttle {r.throttle_max * 100:3.0f}%  ({time.monotonic() - t0:.0f} s)"
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="512M:idle,1G:idle,512M:100M,1G:100M,512M:max,512M:sparse",
                    help="memory:dirty cells (dirty: idle, a rate such as 100M, max = flat out, "
                         "sparse = flat out rewriting one word in 64 of each page)")
    ap.add_argument("--links", default="1gbit,none", help="link rates (1gbit, 10gbit, none = unshaped)")
    ap.add_argument("--methods", default=",".join(m.value for m in Method))
    ap.add_argument("--wss", default="256M", help="memory writer working set")
    ap.add_argument("--runs", type=int, default=1, help="runs per method and cell")
    ap.add_argument("--timeout", type=float, default=60.0, help="s before an unfinished baseline is cancelled")
    enc = ap.add_mutually_exclusive_group()
    enc.add_argument("--plain", dest="encrypted", action="store_false", default=True,
                     help="no TLS for any of the three (default: TLS with the cluster CA, kvmotion's default)")
    enc.add_argument("--encrypted", dest="encrypted", action="store_true", help="TLS for all three (the default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    args = ap.parse_args()

    links = [parse_link(x) for x in args.links.split(",")]
    cells = parse_grid(args.grid, links, parse_size(args.wss))
    methods = [Method(m) for m in args.methods.split(",")]
    from kvmotion.guest.image import ensure_image
    from kvmotion.qemu import accel as accel_mod

    accel = accel_mod.choose(ensure_image).accel.value
    began = time.monotonic()
    results: list[RunResult] = []
    meta = {
        "benchmark": "live-migration: kvmotion vs libvirt-style QEMU vs QEMU defaults",
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "accel": accel,
        "cpus": os.cpu_count(),
        "qemu": qemu_version(),
        "encrypted": args.encrypted,
        "timeout_s": args.timeout,
        "runs_per_cell": args.runs,
        "wss": args.wss,
    }

    def log(line: str) -> None:
        print(line, flush=True)

    def write() -> None:
        done = [c for c in cells if any(r.cell == c.key for r in results)]
        data = dict(meta, duration_s=round(time.monotonic() - began, 1), cells=[
            {
                "cell": c.key, "memory": c.memory, "dirty_rate": c.dirty_rate, "stride": c.stride, "wss": c.wss,
                "link_rate": c.link_rate,
                "runs": [r.to_json() for r in results if r.cell == c.key],
                "verdict": verdict(c, [r for r in results if r.cell == c.key]).__dict__,
            }
            for c in done
        ])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(
            f"`{meta['command']}` — {accel.upper()}, {meta['cpus']} CPUs, {meta['qemu']}, "
            f"{'TLS' if args.encrypted else 'plain (no TLS)'} for all methods, {args.runs} run(s) per cell, "
            f"baseline timeout {args.timeout:.0f} s\n\n" + markdown_table(done, results)
        )

    log(f"compare: {len(cells)} cells x {len(methods)} methods x {args.runs} run(s), {accel.upper()}, "
        f"{'TLS' if args.encrypted else 'plain'}")
    try:
        with tempfile.TemporaryDirectory(prefix="kvbench") as tmp:
            for link in links:
                with harness.bench_lab(link, args.encrypted) as lab:
                    log(f"lab {lab.topo.name}: link {'unshaped' if link is None else f'{link * 8 / 1e9:g} Gbit/s'}")
                    for cell in (c for c in cells if c.link_rate == link):
                        results += run_cell(lab, cell, methods, args.runs, args.timeout, Path(tmp), log)
                        write()
    except KeyboardInterrupt:
        return harness.interrupted("compare", write, f"the finished cells are in {args.out}")
    write()
    print()
    print(args.out.with_suffix(".md").read_text())
    print(f"written to {args.out} and {args.out.with_suffix('.md')} ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
