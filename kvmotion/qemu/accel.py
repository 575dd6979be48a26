"""Accelerator choice: KVM where the CPU has hardware virtualization and a probe shows KVM works, else TCG.

The decision is a pure function of the facts (CPU flags, /dev/kvm, probe result, user's choice) so
that the KVM path production hosts take is unit-tested on machines that can only run TCG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from kvmotion.core import paths
from kvmotion.core.errors import InvalidInput


class Accel(str, Enum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str


def decide(
    cpu_flags: frozenset[str],
    kvm_device: bool,
    probe_ok: bool | None,
    forced: str | None = None,
) -> AccelChoice:
    """Pick the accelerator. probe_ok is None when no probe ran (no point without vmx/svm and /dev/kvm)."""
    if forced:
        try:
            accel = Accel(forced.lower())
        except ValueError:
            raise InvalidInput(f"unknown accelerator {forced!r}: use kvm or tcg") from None
        return AccelChoice(accel, f"forced by the user ({accel.value})")
    hw = {"vmx", "svm"} & cpu_flags
    if not hw:
        return AccelChoice(Accel.TCG, "the CPU advertises no vmx/svm: using TCG (software emulation)")
    if not kvm_device:
        return AccelChoice(Accel.TCG, "/dev/kvm is missing: using TCG (software emulation)")
    if probe_ok is False:
        return AccelChoice(Accel.TCG, "KVM could not boot a test guest: using TCG (software emulation)")
    if probe_ok is None:
        return AccelChoice(Accel.TCG, "KVM was not probed: using TCG (software emulation)")
    return AccelChoice(Accel.KVM, f"hardware virtualization ({sorted(hw)[0]}) and a working /dev/kvm: using KVM")


def cpu_flags() -> frozenset[str]:
    """Flags of the first CPU in /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


class BootFiles(Protocol):
    """A guest's kernel and initramfs (kvmotion.guest.image.GuestImage)."""

    @property
    def kernel(self) -> Path: ...

    @property
    def initramfs(self) -> Path: ...


def _probe_kvm(guest: Callable[[], BootFiles], timeout: float = 20.0) -> bool:
    """Boot the guest image under KVM and wait for its READY line: /dev/kvm alone proves nothing
    (a paravirtual KVM exists that cannot boot a stock kernel)."""
    image = guest()
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-M", "pc", "-m", "256",
        "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", "console=ttyS0 panic=-1 kvmotion.wl=idle",
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
    return b"KVMOTION READY" in out


def choose(guest: Callable[[], BootFiles], forced: str | None = None) -> AccelChoice:
    """The accelerator for this host; the probe result is cached (it takes seconds). `guest`
    gives the guest image the probe boots (kvmotion.guest.image.ensure_image), called only for a probe."""
    forced = forced or os.environ.get("KVMOTION_ACCEL") or None
    flags = cpu_flags()
    kvm_device = os.path.exists("/dev/kvm")
    probe_ok: bool | None = None
    if not forced and {"vmx", "svm"} & flags and kvm_device:
        cache = paths.cache_dir() / "accel-probe.json"
        try:
            probe_ok = bool(json.loads(cache.read_text())["kvm_ok"])
        except (OSError, ValueError, KeyError):
            probe_ok = _probe_kvm(guest)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"kvm_ok": probe_ok}))
    choice = decide(flags, kvm_device, probe_ok, forced)
    return choice


_said: set[str] = set()


def say_once(choice: AccelChoice) -> None:
    """Tell the operator once per process which accelerator is used and why."""
    if choice.reason not in _said:
        _said.add(choice.reason)
        print(f"kvmotion: {choice.reason}", file=sys.stderr)
