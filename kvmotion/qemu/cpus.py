"""CPU models a host can give a VM: those its QEMU lists, 'host' under KVM, or the cluster's baseline.

QEMU lists its models with `-cpu help` (no VM, a few ms); the list is read once per binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from kvmotion.core.errors import InvalidInput, SetupError
from kvmotion.qemu.accel import Accel

QEMU = "qemu-system-x86_64"
_listed: dict[tuple[str, int], frozenset[str]] = {}  # (binary path, mtime) -> its models


def parse_cpu_help(text: str) -> frozenset[str]:
    """Model names from `qemu-system-x86_64 -cpu help`: the first word of each line under
    'Available CPUs:' up to the blank line before the CPUID flags."""
    models: set[str] = set()
    inside = False
    for line in text.splitlines():
        if line.strip() == "Available CPUs:":
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            models.add(line.split()[0])
    return frozenset(models)


def listed_models(binary: str = QEMU) -> frozenset[str]:
    """The CPU models this QEMU binary knows (cached per binary; a replaced binary is read again)."""
    path = shutil.which(binary)
    if path is None:
        raise SetupError(f"{binary} is not installed: cannot tell which CPU models this host runs")
    key = (os.path.realpath(path), os.stat(path).st_mtime_ns)
    if key not in _listed:
        out = subprocess.run([path, "-cpu", "help"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        models = parse_cpu_help(out.stdout)
        if out.returncode != 0 or not models:
            raise SetupError(f"{binary} -cpu help listed no CPU models: {(out.stderr or out.stdout).strip()[:200]}")
        _listed[key] = models
    return _listed[key]


def check_runnable_cpu(model: str, accel: Accel, listed: frozenset[str], baseline: str | None, host: str) -> str:
    """`model` if this host can run it, else InvalidInput naming it (pure)."""
    if model == "host":
        if accel is Accel.KVM:
            return model
        raise InvalidInput(f"CPU model host needs KVM, and host {host} runs VMs under {accel.value.upper()}: "
                           "name a model such as qemu64 or the cluster's baseline")
    if model == baseline or model in listed:
        return model
    raise InvalidInput(f"CPU model {model!r} is unknown to QEMU on host {host}: see `{QEMU} -cpu help`")
