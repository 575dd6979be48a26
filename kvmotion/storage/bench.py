"""Cost of the datastore's I/O path: our nbdkit Python plugin vs `nbdkit file` vs qemu-storage-daemon.

    python -m kvmotion.storage.bench [--size 1G] [--scale 1.0] [--repeat 3]

Each server exports the same kind of file (prefilled, in the page cache) on loopback; QEMU's own
NBD client drives it through `qemu-img bench` (what a VM's disk I/O goes through). "rand" is
qemu-img bench's strided mode with a large odd stride (it has no random mode), which defeats
readahead and merging the same way. Our plugin runs with a lease held, so every write pays for the
fence (lease lock + check). Prints the best of --repeat runs per cell.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core.units import parse_size
from kvmotion.storage import nbd_plugin_path
from kvmotion.storage.datastore import Datastore

DISK = "bench.img"
HOST = "bench-host"


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    write: bool
    depth: int
    count: int
    stride: int  # bytes between consecutive requests


def workloads(scale: float) -> list[Workload]:
    k4, k64 = 4 << 10, 64 << 10
    rand = 7919 * k4  # odd multiple of 4 KiB: wraps around the image in a scattered order
    return [
        Workload("seq 64K write qd16", k64, True, 16, int(8192 * scale), k64),
        Workload("seq 64K read qd16", k64, False, 16, int(8192 * scale), k64),
        Workload("rand 4K write qd16", k4, True, 16, int(40000 * scale), rand),
        Workload("rand 4K read qd16", k4, False, 16, int(40000 * scale), rand),
        Workload("rand 4K write qd1", k4, True, 1, int(10000 * scale), rand),
    ]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.args}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port}")


@contextmanager
def _server(argv: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _prefill(path: Path, size: int) -> None:
    chunk = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)


def servers(tmp: Path, size: int, port: int) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, export name)."""
    plain = tmp / "plain"
    plain.mkdir()
    _prefill(plain / DISK, size)
    ours = tmp / "ours"
    ours.mkdir()
    _prefill(ours / DISK, size)
    Datastore("bench", ours, ttl=3600).acquire(DISK, HOST, "bench")
    qsd_blockdev = f"driver=file,node-name=f0,filename={plain / DISK},aio=threads"
    return {
        "kvmotion plugin (python)": (
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "python", str(nbd_plugin_path()), f"root={ours}"],
            f"{DISK}@{HOST}",
        ),
        "nbdkit file (C)": (["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(plain / DISK)], ""),
        "qemu-storage-daemon": (
            ["qemu-storage-daemon", "--blockdev", qsd_blockdev,
             "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
             "--export", f"type=nbd,id=e0,node-name=f0,name={DISK},writable=on"],
            DISK,
        ),
    }


def run_bench(url: str, w: Workload) -> float:
    """Seconds qemu-img bench took for the workload."""
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(w.count), "-d", str(w.depth), "-s", str(w.block),
            "-S", str(w.stride)]  # fmt: skip
    if w.write:
        argv += ["-w", "--pattern=0x5a"]
    out = subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the best is shown")
    ap.add_argument("--port", type=int, default=19409)
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"kvmotion bench: {tool} is not installed", file=sys.stderr)
            return 7
    size = parse_size(args.size)
    loads = workloads(args.scale)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmotion-bench-") as tmp:
        for name, (cmd, export) in servers(Path(tmp), size, args.port).items():
            url = f"nbd://127.0.0.1:{args.port}/{export}"
            with _server(cmd, args.port):
                for w in loads:
                    best = min(run_bench(url, w) for _ in range(args.repeat))
                    results.setdefault(w.name, {})[name] = w.count / best
    names = list(next(iter(results.values())))
    print(f"{'workload':<22}" + "".join(f"{n:>28}" for n in names))
    for w in loads:
        cells = "".join(
            f"{results[w.name][n]:>14.0f} IOPS {results[w.name][n] * w.block / (1 << 20):>7.1f} MiB/s"
            for n in names
        )
        print(f"{w.name:<22}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
