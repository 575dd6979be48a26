#!/usr/bin/env python3
"""Disk throughput from inside a guest: a datastore disk (NBD) next to a local raw file.

    flock /tmp/kvmotion-qemu.lock .venv/bin/python bench/storage.py [--seconds 5] [--rounds 3] \\
        [--size 256M] [--memory 256M] [--plain] [--out bench/results/storage.json]

One guest (kvmotion's VM runtime, the agent's VmManager) with two disks of the same size on the
same host file system, both pre-filled with the same data:
  /dev/vda  on a datastore: `kvmotion datastore serve` on loopback (nbdkit + kvmotion's Python
            plugin with fenced leases), attached through QEMU's NBD client as for any VM: over
            TLS through the datastore's front end, ds1 and host "bench" (this process, its QEMU
            identity) joined to a throw-away center on loopback, or in plain text with --plain
            (an --insecure center and datastore)
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

from kvmotion.api.joined import StateRoot
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
STEP_TIMEOUT = 60.0


def _kvmotion(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmotion.cli.main", *args]


@dataclass
class Center:
    """`kvmotion center serve` on loopback (--insecure with --plain), as its own process group."""

    data: Path
    port: int
    log: Path
    tls: bool = True
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        from kvmotion.api.center import pinned_ca

        argv = _kvmotion("center", "serve", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data),
                         *(() if self.tls else ("--insecure",)))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                pinned_ca(self.url, None, timeout=1)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the center did not start: {self.log.read_text()[-500:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def join_all(center: Center, ds: Datastore, tmp: Path) -> StateRoot:
    """As a user with separate machines would: the admin logs in (this process's CLI identity, by
    KVMOTION_CONFIG), ds1 joins with the first start's token, and so does host `bench`, whose
    joined root this process then serves (its identity, and ds1 from the center)."""
    from kvmotion.api import joined, userconfig
    from kvmotion.api.joined import ClusterCache
    from kvmotion.host.join import join
    from kvmotion.lab.cluster import read_first_start

    secrets = read_first_start(center.log)
    os.environ["KVMOTION_CONFIG"] = str(tmp / "admin" / "config")
    login = subprocess.run(_kvmotion("login", center.url, "--user", "admin", "--ca-sha256", secrets.ca_sha256,
                                     "--password-stdin"), input=secrets.password + "\n", capture_output=True, text=True,
                           timeout=STEP_TIMEOUT)
    if login.returncode != 0:
        raise RuntimeError(f"the admin's login failed: {login.stderr.strip()}")
    userconfig.forget()
    ds_join = subprocess.run(_kvmotion("datastore", "join", center.url, "--token", secrets.token, "--name", "ds1",
                                       "--address", "127.0.0.1", "--port", str(ds.port), "--state-dir", str(ds.state)),
                             capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if ds_join.returncode != 0:
        raise RuntimeError(f"ds1's join failed: {ds_join.stderr.strip()}")
    root = join(center.url, secrets.token, HOST, "127.0.0.1", StateRoot(tmp / "host"), qemu_key_gid=confine.qemu_gid())
    # What the host's first heartbeat would bring: the center's datastores.
    datastores = tuple(userconfig.center_datastores())
    root.root.save_cache(ClusterCache(settings=root.answer.settings, hosts=(root.answer.host,), datastores=datastores,
                                      updated=time.time()))
    joined.activate(root.root)
    return root.root


@dataclass
class Datastore:
    """`kvmotion datastore serve` of ds1 joined into `state`, on loopback, as its own process group."""

    state: Path
    port: int
    log: Path
    tls: bool = True
    proc: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        """The disk files (the joined root's disks/)."""
        return self.state / "disks"

    @property
    def ref(self) -> DatastoreRef:
        return DatastoreRef.make("ds1", f"{'nbds' if self.tls else 'nbd'}://127.0.0.1:{self.port}")

    def start(self) -> None:
        from kvmotion.api.datastore import client_for

        argv = _kvmotion("datastore", "serve", "--state-dir", str(self.state), *(() if self.tls else ("--insecure",)))
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
    from kvmotion.api.datastore import client_for
    from kvmotion.api.registry import Registry

    center = Center(data=tmp / "center", port=free_port_pair(), log=tmp / "center.log", tls=not args.plain)
    ds = Datastore(state=tmp / "ds1", port=free_port_pair(), log=tmp / "datastore.log", tls=not args.plain)
    center.start()
    try:
        root = join_all(center, ds, tmp)
        ds.start()
    except BaseException:
        center.stop()
        raise
    local = root.path / "disks" / "local.img"  # a local disk is a file in the host's disk folder
    with open(local, "wb") as f:  # noqa: ASYNC230 - set-up, before anything runs
        f.truncate(size)
    mgr = VmManager(HostConfig(name=HOST, state_dir=root.path, run_dir=tmp / "run", portgroups={},
                               accel=accel_mod.choose(ensure_image)))
    runs: dict[str, dict[str, list[FioResult]]] = {m.value: {t: [] for t in TARGETS} for m, _ in CASES}
    spec = VmSpec(name="stbench", memory=parse_size(args.memory), workloads=(Workload.IDLE,),
                  disks=(DiskSpec(source=DISK, datastore="ds1"), DiskSpec(source=local.name)))
    try:
        assert Registry().get("ds1") == ds.ref  # recorded by ds1's join
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
            center.stop()
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
    tmp.chmod(0o711)  # an unprivileged QEMU reaches its certificate in tmp/host (and nothing else: no listing)
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
