#!/usr/bin/env python3
"""Disk throughput from inside a guest: a datastore disk (NBD) next to a local raw file.

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/storage.py [--seconds 5] [--rounds 3] \\
        [--size 256M] [--memory 256M] [--plain] [--out bench/results/storage.json]

One guest (kvmotion's VM runtime, the agent's VmManager) with two disks of the same size on the
same host file system, both pre-filled with the same data:
  /dev/vda  on a datastore: `kvmotion datastore serve` on loopback (nbdkit + kvmotion's Python
            plugin with fenced leases), attached through QEMU's NBD client as for any VM: over
            TLS through the datastore's front end, with certificates from a throw-away cluster
            CA (host "bench", its QEMU identity), or in plain text with --plain (--insecure)
  /dev/vdb  a local raw file (QEMU's file driver, aio=threads, the host's page cache)
Inside the guest, kvm-fio (src/kvm-fio.c, run through the serial console) does sequential 64 KiB
and random 4 KiB reads and writes with O_DIRECT at queue depth 1 for --seconds each. Rounds
alternate which disk goes first, so machine load hits both alike; the medians and the ratio
datastore/local are printed and written to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmotion.api.registry import DatastoreRef
from kvmotion.api.spec import DiskSpec, VmSpec, Workload
from kvmotion.core.units import format_size, parse_size
from kvmotion.guest.fio import FioError, FioMode, FioResult, fio_command, parse_fio_line
from kvmotion.guest.image import ensure_image
from kvmotion.qemu import accel as accel_mod
from kvmotion.qemu import confine

REPO = Path(__file__).resolve().parent.parent
DISK = "bench.img"
# (mode, request size): what the datastore issue asks for.
CASES: tuple[tuple[FioMode, int], ...] = (
    (FioMode.SEQWRITE, 64 << 10),
    (FioMode.SEQREAD, 64 << 10),
    (FioMode.RANDWRITE, 4 << 10),
    (FioMode.RANDREAD, 4 << 10),
)
TARGETS = {"datastore": "/dev/vda", "local": "/dev/vdb"}


def free_port_pair() -> int:
    """A port P with P and P+1 free on loopback (NBD and the control API)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair on loopback")


HOST = "bench"  # the VmManager's host name: its certificate is the one the datastore sees


def issue_certificates(cluster: Path) -> None:
    """A cluster CA of our own: datastore ds1 on loopback, host `bench` (and its QEMUs), user admin."""
    from kvmotion.api.identity import Role
    from kvmotion.api.pki import init_ca, issue_datastore_cert, issue_host_cert, issue_user_cert

    init_ca(cluster / "ca")
    issue_datastore_cert(cluster / "ca", "ds1", ["127.0.0.1"], cluster / "datastores" / "ds1")
    issue_host_cert(cluster / "ca", HOST, ["127.0.0.1"], cluster / "hosts" / HOST, qemu_key_gid=confine.qemu_gid())
    issue_user_cert(cluster / "ca", "admin", Role.ADMIN, cluster / "users" / "admin")


@dataclass
class Datastore:
    """`kvmotion datastore serve ds1` on loopback, as its own process group."""

    root: Path
    port: int
    log: Path
    tls: bool = True
    proc: subprocess.Popen | None = None

    @property
    def ref(self) -> DatastoreRef:
        return DatastoreRef.make("ds1", f"{'nbds' if self.tls else 'nbd'}://127.0.0.1:{self.port}")

    def start(self) -> None:
        from kvmotion.api.datastore import client_for

        argv = [sys.executable, "-m", "kvmotion.cli.main", "datastore", "serve", "ds1", "--root", str(self.root),
                "--listen", f"127.0.0.1:{self.port}", *(() if self.tls else ("--insecure",))]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out, start_new_session=True)
        with client_for(self.ref, timeout=1) as client:
            deadline = time.monotonic() + 30
            while not client.reachable():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the datastore did not start: {self.log.read_text()[-500:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Console:
    """The guest's serial console (QEMU's chardev socket): run a shell line, wait for kvm-fio's answer."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""

    def run_fio(self, line: str, timeout: float) -> FioResult:
        self.buf = b""
        self.sock.sendall(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            *lines, self.buf = self.buf.split(b"\n")
            for raw in lines:
                found = parse_fio_line(raw.decode(errors="replace"))
                if isinstance(found, FioError):
                    raise RuntimeError(f"kvm-fio failed in the guest: {found.mode} {found.message}")
                if found is not None:
                    return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no answer from the guest to {line!r} within {timeout:.0f} s")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the guest's console closed")
            self.buf += chunk

    def check_serial(self, device: str, expected: str) -> None:
        """The guest names its disks in probe order: make sure /dev/vdX is the disk we think."""
        marker = f"KVMOTION-SERIAL-{random.randint(0, 1 << 30)}"
        answer = re.compile(rf"{marker}=(\w+)\r?\n".encode())  # the shell's echo of the line has "=$(" there
        self.buf = b""
        self.sock.sendall(f"echo {marker}=$(cat /sys/block/{device.removeprefix('/dev/')}/serial)\n".encode())
        deadline = time.monotonic() + 10
        while not (m := answer.search(self.buf)):
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.buf += self.sock.recv(65536)
            except TimeoutError:
                raise RuntimeError(f"the guest did not say which disk {device} is: {self.buf[-200:]!r}") from None
        if m.group(1).decode() != expected:
            raise RuntimeError(f"{device} is the disk with serial {m.group(1).decode()}, not {expected}")

    def close(self) -> None:
        self.sock.close()


def prefill(paths: list[Path], size: int) -> None:
    """The same bytes in every disk (random, so reads never see holes or zero pages)."""
    chunk = os.urandom(4 << 20)
    for path in paths:
        with open(path, "r+b") as f:
            for off in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - off)])
            f.flush()
            os.fsync(f.fileno())


async def measure(tmp: Path, args: argparse.Namespace) -> dict[str, dict[str, list[FioResult]]]:
    from kvmotion.host.vms import HostConfig, VmManager

    size = parse_size(args.size)
    local = tmp / "state" / "disks" / "local.img"  # a local disk is a file in the host's disk folder
    local.parent.mkdir(parents=True)
    with open(local, "wb") as f:  # noqa: ASYNC230 - set-up, before anything runs
        f.truncate(size)
    from kvmotion.api.datastore import client_for
    from kvmotion.api.registry import Registry

    ds = Datastore(root=tmp / "ds1", port=free_port_pair(), log=tmp / "datastore.log", tls=not args.plain)
    ds.root.mkdir()
    if ds.tls:
        issue_certificates(tmp / "cluster")
    ds.start()
    mgr = VmManager(HostConfig(name=HOST, state_dir=tmp / "state", run_dir=tmp / "run", portgroups={},
                               accel=accel_mod.choose(ensure_image)))
    runs: dict[str, dict[str, list[FioResult]]] = {m.value: {t: [] for t in TARGETS} for m, _ in CASES}
    spec = VmSpec(name="stbench", memory=parse_size(args.memory), workloads=(Workload.IDLE,),
                  disks=(DiskSpec(source=DISK, datastore="ds1"), DiskSpec(source=local.name)))
    try:
        Registry().add(ds.ref)
        with client_for(ds.ref) as client:  # as user admin
            client.create_disk(DISK, size)
        prefill([ds.root / DISK, local], size)
        await mgr.recover()  # starts lease renewal: the run outlasts the lease TTL
        await mgr.create(spec)
        await mgr.start(spec.name, wait_ready=True, timeout=90)
        console = Console(tmp / "run" / "vms" / spec.name / "serial.sock")
        try:
            for i, device in enumerate(TARGETS.values()):
                console.check_serial(device, f"kvm{i}")  # cmdline.py gives disk i serial kvm<i>
            for rnd in range(args.rounds):
                order = list(TARGETS) if rnd % 2 == 0 else list(reversed(TARGETS))
                for mode, bs in CASES:
                    for target in order:
                        line = fio_command(mode, TARGETS[target], bs, args.seconds, size)
                        result = await asyncio.to_thread(console.run_fio, line, args.seconds + 60)
                        runs[mode.value][target].append(result)
                        print(f"  round {rnd + 1} {mode.value:9} {bs >> 10:2d} KiB {target:9}: "
                              f"{result.mb_s:8.2f} MB/s {result.iops:8.0f} IOPS", flush=True)
        finally:
            console.close()
        await mgr.stop(spec.name)
    finally:
        try:
            if spec.name in {v.name for v in mgr.list()} and mgr.status(spec.name).pid is not None:
                await mgr.stop(spec.name, force=True)  # the manager's shutdown would leave it running
            await mgr.shutdown()
        finally:
            ds.stop()
    return runs


def summarize(runs: dict[str, dict[str, list[FioResult]]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for mode, bs in CASES:
        row: dict[str, object] = {"bs": bs}
        for target, results in runs[mode.value].items():
            row[target] = {
                "median_mb_s": statistics.median(r.mb_s for r in results),
                "median_iops": statistics.median(r.iops for r in results),
                "runs_mb_s": [r.mb_s for r in results],
            }
        ds_med, local_med = row["datastore"]["median_mb_s"], row["local"]["median_mb_s"]  # type: ignore[index]
        row["ratio_datastore_to_local"] = ds_med / local_med if local_med else None
        out[f"{mode.value}_{bs >> 10}k"] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each kvm-fio run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every case, alternating the disks' order")
    ap.add_argument("--size", default="256M", help="size of each disk (= the span the guest uses)")
    ap.add_argument("--memory", default="256M", help="guest memory")
    ap.add_argument("--plain", action="store_true", help="serve the datastore with --insecure (plain NBD), as before TLS")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "storage.json"))
    args = ap.parse_args()
    ensure_image()
    tmp = Path(tempfile.mkdtemp(prefix="kvmotion-stbench-"))
    tmp.chmod(0o711)  # an unprivileged QEMU reaches its certificate in tmp/cluster (and nothing else: no listing)
    os.environ["KVMOTION_CLUSTER_DIR"] = str(tmp / "cluster")  # a registry of our own, not the cluster's
    load_before = os.getloadavg()[0]
    try:
        runs = asyncio.run(measure(tmp, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cases = summarize(runs)
    result = {
        "benchmark": "guest disk throughput: datastore (NBD) vs local raw file",
        "date": time.strftime("%Y-%m-%d"),
        "tool": "kvm-fio in the guest, O_DIRECT, queue depth 1, no fsync",
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "disk_size": args.size,
        "guest_memory": args.memory,
        "accel": accel_mod.choose(ensure_image).accel.value,
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "datastore": ("kvmotion datastore serve on loopback (nbdkit + Python plugin), QEMU NBD client, "
                      + ("plain NBD (--insecure)" if args.plain else "NBD over TLS through the datastore's front end")),
        "tls": not args.plain,
        "local": "raw file, QEMU file driver aio=threads, host page cache",
        "cases": cases,
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"guest disk throughput, {args.rounds} rounds x {args.seconds} s, disks {format_size(parse_size(args.size))}, "
          f"{result['accel']}, datastore {'plain' if args.plain else 'over TLS'}, medians:")
    for name, row in cases.items():
        d, loc = row["datastore"], row["local"]
        print(f"  {name:14} datastore {d['median_mb_s']:8.2f} MB/s {d['median_iops']:7.0f} IOPS | local "
              f"{loc['median_mb_s']:8.2f} MB/s {loc['median_iops']:7.0f} IOPS | ratio {row['ratio_datastore_to_local']:.2f}")
    print(f"  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
