#!/usr/bin/env python3
"""Cancelling a live migration in pre-copy: does the source QEMU survive it? kvmotion vs QEMU's own cancel.

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/cancel.py [--runs 30] [--methods kvmotion,qemu] \
        [--link 20M] [--wss 128M]

QEMU 10.0.2 with multifd over TLS can abort the source (error_setv assertion) when a migration is
cancelled while its senders are blocked writing to a slow link (kvmotion/qemu/cancel.py says why):
the guest is then lost, which is what a cancel must never do. One guest dirtying its working set
flat out migrates over a shaped link, TLS and three zstd multifd channels as kvmotion chooses on a
slow link; once pre-copy has sent 4 MiB (plus a random 0-0.5 s), it is cancelled:
- kvmotion: `POST /v1/migrations/ID/cancel` on the source agent (a user's cancel);
- qemu: the same stream set up over QMP on the bench's own QEMUs, then `migrate_cancel`, as
  libvirt's `virsh domjobabort` does.
Each run records whether the source QEMU still runs the guest afterwards and how long the cancel
took; a lost guest is booted again. JSON to bench/results/cancel.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.benchmodel import Cell
from bench.compare import qemu_version
from kvmotion.api.agent import AgentClient
from kvmotion.api.migration import Compression, MigrationRequest, OptionsBody, StreamSettings
from kvmotion.core.errors import KvmotionError
from kvmotion.core.units import parse_rate, parse_size
from kvmotion.migration import stream as st

RESULTS = Path(__file__).parent / "results"
MIN_SENT = 4 << 20  # bytes pre-copy has sent before the cancel
EXTRA_WAIT = 0.5  # s: up to this much more, at random, so the cancel lands anywhere in the stream's cycle
CANCEL_TIMEOUT = 60.0


@dataclass(frozen=True)
class CancelRun:
    method: str
    run: int
    sent: int  # bytes pre-copy had sent when the cancel was asked for
    status: str  # how the migration ended (cancelled, failed, ...)
    survived: bool  # the source QEMU runs the guest afterwards
    cancel_ms: float  # from the cancel request to the migration's end
    error: str | None = None


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and (os.kill(pid, 0) or True)
    except ProcessLookupError:
        return False


def _wait(what: str, probe, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise KvmotionError(f"{what} within {timeout:.0f} s")
        time.sleep(every)
    return value


# ------------------------------------------------------------------------------------- kvmotion
def _keep(lab: harness.BenchLab, folder: Path) -> None:
    """The agents' logs and the source QEMU's, for the post-mortem of a lost guest."""
    folder.mkdir(parents=True, exist_ok=True)
    for host in ("host-a", "host-b"):
        src = lab.cluster.log(host)
        if src.exists():
            shutil.copy(src, folder / f"{host}.log")
    qemu_log = lab.serial_log("host-a").with_name("qemu.log")
    if qemu_log.exists():
        shutil.copy(qemu_log, folder / "host-a-qemu.log")


def kvmotion_runs(lab: harness.BenchLab, cell: Cell, runs: int, rng: random.Random, log,
                  keep: Path | None = None) -> list[CancelRun]:
    a, b = lab.agent("host-a"), lab.agent("host-b")
    try:
        return _kvmotion_runs(lab, cell, runs, rng, log, keep, a, b)
    finally:
        a.close()
        b.close()


def _kvmotion_runs(lab: harness.BenchLab, cell: Cell, runs: int, rng: random.Random, log, keep: Path | None,
                   a: AgentClient, b: AgentClient) -> list[CancelRun]:
    spec = harness.guest_spec(cell, lab.topo)
    out: list[CancelRun] = []
    booted = False
    for i in range(runs):
        if not booted:
            harness.remove_vm(lab)
            offset = harness.log_size(lab.serial_log("host-a"))
            a.create(spec)
            a.start(harness.VM, wait_ready=True, timeout=harness.BOOT_TIMEOUT)
            harness.wait_guest(lab.serial_log("host-a"), cell, offset=offset)
            booted = True
        pid = a.vm(harness.VM).pid
        body = MigrationRequest(vm=harness.VM, destination="host-b", options=OptionsBody())
        mid = a.request("POST", "/v1/migrations", body=body, timeout=60)["id"]  # type: ignore[index]

        def record(mid: str = mid):
            return a.request("GET", f"/v1/migrations/{mid}")

        def sent_enough():
            rec = record()
            if rec["phase"] in ("done", "failed", "cancelled"):  # type: ignore[index]
                raise KvmotionError(f"the migration ended before the cancel: {rec['phase']} {rec.get('error')}")  # type: ignore[index,union-attr]
            return rec if rec["phase"] == "precopy" and rec["progress"]["transferred"] >= MIN_SENT else None  # type: ignore[index]

        _wait("pre-copy sent 4 MiB", sent_enough, 60)
        time.sleep(rng.uniform(0, EXTRA_WAIT))
        sent = record()["progress"]["transferred"]  # type: ignore[index]
        t0 = time.monotonic()
        a.request("POST", f"/v1/migrations/{mid}/cancel")
        rec = _wait("the migration ended", lambda: (r := record())["phase"] in ("failed", "cancelled", "done") and r,
                    CANCEL_TIMEOUT, every=0.02)
        took = (time.monotonic() - t0) * 1000
        status = a.vm(harness.VM)
        survived = status.state.value == "running" and status.pid == pid and _alive(pid)
        out.append(CancelRun("kvmotion", i, sent, rec["phase"], survived, round(took, 1),
                             None if survived else rec.get("error")))
        log(f"kvmotion {i}: {rec['phase']} after {took:.0f} ms, source {'runs on' if survived else 'LOST'}")
        if not survived and keep is not None:
            _keep(lab, keep / f"kvmotion-{i}")
        if rec["phase"] == "done":
            raise KvmotionError("the migration completed before the cancel reached it: use a slower link")
        booted = survived
        if survived:
            _wait("host-b has no shadow left", lambda: harness.VM not in [v.name for v in b.vms()], 30)
    harness.remove_vm(lab)
    return out


# ------------------------------------------------------------------------------------- QEMU alone
async def _qemu_runs(lab: harness.BenchLab, cell: Cell, runs: int, rng: random.Random, folder: Path,
                     log) -> list[CancelRun]:
    spec = harness.guest_spec(cell, lab.topo).replace(name=harness.BASELINE_VM)
    settings = StreamSettings(multifd_channels=st.MULTIFD_CHANNELS, compression=Compression.ZSTD)
    ip = lab.topo.host("host-b").mgmt_ip
    out: list[CancelRun] = []
    src: harness.BareQemu | None = None
    try:
        for i in range(runs):
            if src is None:
                src = harness.BareQemu(lab, "host-a", spec, folder, incoming=False)
                sq = await src.connect()
                await asyncio.to_thread(harness.wait_guest, src.paths.serial_log, cell, src.alive)
                await harness.tls_creds(sq, "client", lab, "host-a")
            dst = harness.BareQemu(lab, "host-b", spec, folder, incoming=True)
            try:
                dq = await dst.connect()
                await harness.tls_creds(dq, "server", lab, "host-b")
                for q in (sq, dq):
                    await q.execute("migrate-set-capabilities", capabilities=st.capabilities(False, settings))
                    await q.execute("migrate-set-parameters", **st.multifd_params(settings), **{"tls-creds": "bench-tls"})
                await sq.execute("migrate-set-parameters", **{"tls-hostname": "host-b",
                                                              "max-bandwidth": harness.LIBVIRT_UNLIMITED})
                await dq.execute("migrate-incoming", uri=f"tcp:{ip}:0")
                port = (await dq.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
                await sq.execute("migrate", uri=f"tcp:{ip}:{port}")
                deadline = time.monotonic() + 60
                while True:
                    info = await sq.execute("query-migrate")
                    sent = int(info.get("ram", {}).get("transferred", 0))  # type: ignore[union-attr]
                    if info["status"] != "active" and info["status"] != "setup":  # type: ignore[index]
                        raise KvmotionError(f"the migration ended before the cancel: {info['status']}")  # type: ignore[index]
                    if sent >= MIN_SENT:
                        break
                    if time.monotonic() > deadline:
                        raise KvmotionError("pre-copy did not send 4 MiB within 60 s")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0, EXTRA_WAIT))
                sent = int((await sq.execute("query-migrate")).get("ram", {}).get("transferred", sent))  # type: ignore[union-attr]
                t0 = time.monotonic()
                status = "lost"
                try:
                    await sq.execute("migrate_cancel")
                    while (status := (await sq.execute("query-migrate"))["status"]) not in ("cancelled", "failed", "completed"):  # type: ignore[index]
                        if time.monotonic() - t0 > CANCEL_TIMEOUT:
                            break
                        await asyncio.sleep(0.02)
                except KvmotionError:
                    pass  # the monitor went away with QEMU
                took = (time.monotonic() - t0) * 1000
                await asyncio.sleep(0.5)  # an abort comes as the cleanup runs, just after "cancelled"
                survived = src.alive()
                if survived and (await sq.execute("query-status"))["status"] != "running":  # type: ignore[index]
                    await sq.execute("cont")  # QEMU resumes a cancelled pre-copy itself; only in case
            finally:
                if getattr(dst, "qmp", None) is not None:
                    await dst.qmp.close()
                dst.close()
            out.append(CancelRun("qemu", i, sent, status, survived, round(took, 1), None if survived else "source QEMU exited"))
            log(f"qemu {i}: {status} after {took:.0f} ms, source {'runs on' if survived else 'LOST'}")
            if not survived:
                await src.qmp.close()
                src.close()
                src = None
    finally:
        if src is not None:
            await src.qmp.close()
            src.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="cancels per method")
    ap.add_argument("--methods", default="kvmotion,qemu")
    ap.add_argument("--link", default="20M", help="the vMotion links' rate (bytes/s)")
    ap.add_argument("--wss", default="128M", help="memory writer working set")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "cancel.json")
    ap.add_argument("--keep-logs", type=Path, help="copy the lab's logs here when a guest is lost")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if not set(methods) <= {"kvmotion", "qemu"}:
        ap.error(f"--methods: kvmotion and/or qemu, not {args.methods}")
    cell = Cell(memory=256 << 20, dirty_rate=0, wss=parse_size(args.wss), link_rate=parse_rate(args.link))
    rng = random.Random(args.seed)
    began = time.monotonic()
    results: list[CancelRun] = []

    def log(line: str) -> None:
        print(line, flush=True)

    def write() -> None:
        summary = {}
        for m in methods:
            rs = [r for r in results if r.method == m]
            took = sorted(r.cancel_ms for r in rs if r.survived)
            summary[m] = {"runs": len(rs), "lost": sum(not r.survived for r in rs),
                          "median_cancel_ms": took[len(took) // 2] if took else None}
        data = {"benchmark": "cancel in pre-copy: does the source survive",
                "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
                "qemu": qemu_version(), "cpus": os.cpu_count(), "cell": cell.key, "duration_s": round(time.monotonic() - began, 1),
                "summary": summary, "runs": [asdict(r) for r in results]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    try:
        with tempfile.TemporaryDirectory(prefix="kvbench") as tmp, harness.bench_lab(cell.link_rate, True) as lab:
            for m in methods:
                if m == "kvmotion":
                    results += kvmotion_runs(lab, cell, args.runs, rng, log, args.keep_logs)
                else:
                    results += asyncio.run(_qemu_runs(lab, cell, args.runs, rng, Path(tmp), log))
                write()
    except KeyboardInterrupt:
        return harness.interrupted("cancel", write, f"the runs so far are in {args.out}")
    write()
    print(json.dumps(json.loads(args.out.read_text())["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
