#!/usr/bin/env python3
"""Boot time to the guest's READY line: kvmotion's VM runtime vs bare QEMU, same kernel and initramfs.

    .venv/bin/python bench/boot.py [--memory 512M] [--runs 3] [--out bench/results/boot.json]

Alternates the two (so machine load hits both alike) and prints median/min/max and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmotion.api.spec import VmSpec
from kvmotion.core.units import parse_size
from kvmotion.guest.cmdline import kernel_cmdline
from kvmotion.guest.image import ensure_image
from kvmotion.qemu import accel as accel_mod


def bare_qemu_boot(spec: VmSpec, accel: str, timeout: float = 60) -> float:
    """Plain qemu-system-x86_64 -serial stdio: seconds from exec to READY."""
    image = ensure_image()
    argv = ["qemu-system-x86_64", "-machine", f"pc,accel={accel}", "-cpu", spec.cpu_model, "-m", f"{spec.memory >> 20}M",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", kernel_cmdline(spec)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buf = b""
    try:
        while b"KVMOTION READY" not in buf:
            chunk = proc.stdout.read1(4096)  # type: ignore[union-attr]
            if not chunk or time.monotonic() - t0 > timeout:
                raise RuntimeError("bare QEMU guest never printed READY")
            buf += chunk
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


async def kvmotion_boot(spec: VmSpec, choice: accel_mod.AccelChoice) -> float:
    """kvmotion's runtime (VmManager, the agent's core): seconds from start() to READY."""
    from kvmotion.host.vms import HostConfig, VmManager

    with tempfile.TemporaryDirectory(prefix="kvb") as tmp:
        mgr = VmManager(HostConfig(name="bench", state_dir=Path(tmp) / "s", run_dir=Path(tmp) / "r", portgroups={}, accel=choice))
        await mgr.create(spec)
        t0 = time.monotonic()
        await mgr.start(spec.name, wait_ready=True, timeout=60)
        elapsed = time.monotonic() - t0
        await mgr.stop(spec.name, force=True)
        await mgr.shutdown()
        return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "boot.json"))
    args = ap.parse_args()
    choice = accel_mod.choose(ensure_image)
    spec = VmSpec(name="bootbench", memory=parse_size(args.memory))
    ensure_image()
    kv, bare = [], []
    for _ in range(args.runs):
        kv.append(asyncio.run(kvmotion_boot(spec, choice)))
        bare.append(bare_qemu_boot(spec, choice.accel.value))

    def stats(xs: list[float]) -> dict:
        return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "runs_s": xs}

    result = {
        "benchmark": "boot-to-ready",
        "memory": args.memory,
        "accel": choice.accel.value,
        "cpus": os.cpu_count(),
        "kvmotion": stats(kv),
        "bare_qemu": stats(bare),
        "ratio_kvmotion_to_bare": statistics.median(kv) / statistics.median(bare),
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"boot to READY, {args.memory}, {choice.accel.value}, {args.runs} runs each")
    print(f"  kvmotion : median {result['kvmotion']['median_s']:.2f} s (min {min(kv):.2f}, max {max(kv):.2f})")
    print(f"  bare QEMU: median {result['bare_qemu']['median_s']:.2f} s (min {min(bare):.2f}, max {max(bare):.2f})")
    print(f"  ratio kvmotion/bare: {result['ratio_kvmotion_to_bare']:.2f}")
    print(f"  written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
