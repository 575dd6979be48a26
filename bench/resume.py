#!/usr/bin/env python3
"""Where a client's gap goes after a VM resumes: the same pause with and without a migration.

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/resume.py [--runs 3] [--blocks 2] [--memory 512M] [--pause-ms 40]

One guest (kvmotion's command line, workload echo) in a two-host lab, the client's 1 ms UDP probe
running. Alternately: (warm) `stop`, wait --pause-ms, `cont` on the same QEMU; (migrated) a
libvirt-style migration to the other host, the destination resumed at once. Reports, per case,
QEMU stop -> resume and resume -> the client's first echo reply. A TCG destination starts with an
empty translation cache, so the guest's first packets after resume run through freshly
translated code; the warm case shows what the same resume costs without that, and the prelearn
case (the switch told the MAC's new port before the resume) separates network re-learning from it.
Each block runs the guest twice: with virtio-net's guest announce (QEMU's default: the resumed
guest sends its own gratuitous ARPs first) and without (kvmotion's default: QEMU's RARP only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.benchmodel import Cell
from kvmotion.core.units import parse_size
from kvmotion.net.announce import build_rarp, send_frame

RESULTS = Path(__file__).parent / "results"


async def _run(lab: harness.BenchLab, cell: Cell, runs: int, pause: float, folder: Path,
               guest_announce: bool) -> dict[str, list[tuple[float, float]]]:
    spec = harness.guest_spec(cell, lab.topo, guest_announce=guest_announce)
    hosts = ["host-a", "host-b"]
    cur = harness.BareQemu(lab, hosts[0], spec, folder / "0", incoming=False)
    rows: dict[str, list[tuple[float, float]]] = {"warm": [], "migrated": [], "migrated+prelearn": []}
    probe = None
    try:
        q = await cur.connect()
        await asyncio.to_thread(harness.wait_guest, cur.paths.serial_log, cell, cur.alive)
        probe = harness.ClientProbe(lab, folder, "resume")
        await asyncio.sleep(1.0)
        marks: list[tuple[str, float, float]] = []  # case, stop, resume (QEMU's wall clock)
        for i in range(2 * runs):
            # warm: the same QEMU stops and continues
            async with q.listen("STOP", "RESUME") as ev:
                await q.execute("stop")
                stop = (await ev.wait_for("STOP", timeout=5)).timestamp
                await asyncio.sleep(pause)
                await q.execute("cont")
                resume = (await ev.wait_for("RESUME", timeout=5)).timestamp
            marks.append(("warm", stop, resume))
            await asyncio.sleep(1.0)
            # migrated: libvirt-style to the other host, destination resumed at once; every other
            # time the switch first learns the MAC on the destination's port (a RARP sent from the
            # destination host's uplink, as a hypervisor's switch would send it) before the resume
            prelearn = i % 2 == 1
            dst_host = hosts[(i + 1) % 2]
            dst = harness.BareQemu(lab, dst_host, spec, folder / str(i + 1), incoming=True)
            dq = await dst.connect()
            await dq.execute("migrate-incoming", uri=f"tcp:{lab.topo.host(dst_host).mgmt_ip}:0")
            port = (await dq.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
            await q.execute("migrate-set-parameters", **{"max-bandwidth": harness.LIBVIRT_UNLIMITED})
            await q.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            async with q.listen("STOP", "MIGRATION") as sev, dq.listen("RESUME") as dev:
                await q.execute("migrate", uri=f"tcp:{lab.topo.host(dst_host).mgmt_ip}:{port}")
                stop = None
                while True:
                    e = await sev.get(120)
                    if e.name == "STOP":
                        stop = e.timestamp
                    elif e.data.get("status") == "completed":
                        if prelearn:
                            h = lab.topo.host(dst_host)
                            await asyncio.to_thread(send_frame, h.vm_uplink, build_rarp(harness.MAC), h.ns)
                        await dq.execute("cont")
                        break
                    elif e.data.get("status") in ("failed", "cancelled"):
                        raise RuntimeError(f"migration {e.data.get('status')}")
                resume = (await dev.wait_for("RESUME", timeout=10)).timestamp
            marks.append(("migrated+prelearn" if prelearn else "migrated", stop or resume, resume))
            await cur.qmp.close()
            cur.close()
            cur, q = dst, dq
            await asyncio.sleep(1.5)
        report = await asyncio.to_thread(probe.stop)
        for case, stop, resume in marks:
            rows[case].append(((resume - stop) * 1000, harness.resume_to_reply_ms(report, resume) or float("nan")))
    finally:
        if probe is not None:
            probe.kill()
        if getattr(cur, "qmp", None) is not None:
            await cur.qmp.close()
        cur.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2, help="rounds of (guest announce on, off), --runs each")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--pause-ms", type=float, default=40.0)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("--out", type=Path, default=RESULTS / "resume.json")
    args = ap.parse_args()
    from bench.benchmodel import parse_link
    from kvmotion.guest.image import ensure_image
    from kvmotion.qemu import accel as accel_mod

    link = parse_link(args.link)
    cell = Cell(memory=parse_size(args.memory), dirty_rate=None, wss=0, link_rate=link)
    with tempfile.TemporaryDirectory(prefix="kvbench") as tmp, harness.bench_lab(link, False) as lab:
        rows: dict[str, list[tuple[float, float]]] = {}
        for block in range(args.blocks):
            for announce in (True, False):
                folder = Path(tmp) / f"{block}-{'on' if announce else 'off'}"
                folder.mkdir()
                got = asyncio.run(_run(lab, cell, args.runs, args.pause_ms / 1000, folder, announce))
                for case, v in got.items():
                    rows.setdefault(f"{case}, guest announce {'on' if announce else 'off'}", []).extend(v)
    accel = accel_mod.choose(ensure_image).accel.value
    out = {"benchmark": "resume to first client reply", "accel": accel, "memory": args.memory, "link": args.link,
           "command": " ".join(["bench/resume.py", *sys.argv[1:]]),
           "cases": {k: [{"stop_to_resume_ms": a, "resume_to_reply_ms": b} for a, b in v] for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"resume -> first client reply ({accel.upper()}, {args.memory} idle guest, echo)")
    for case, v in rows.items():
        print(f"  {case}: stop->resume {[round(a, 1) for a, _ in v]} ms; resume->first reply "
              f"{[round(b, 1) for _, b in v]} ms (median {statistics.median(b for _, b in v):.1f})")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
