"""VM spec + host context -> QEMU command line (pure).

Same spec, same command line on every host: the destination's shadow VM must have exactly the
source's devices for QEMU's migration stream to load, so all host-specific parts (sockets, TAP
names, disk transports) come in through `HostContext` and never change device layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmotion.qemu.accel import Accel
from kvmotion.qemu.spec import VmSpec

# pc (i440fx) over q35: fewer devices to emulate, so faster TCG boot; virtio-pci works on both.
MACHINE = "pc"


@dataclass(frozen=True)
class VmPaths:
    """Runtime files of one VM on one host."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def serial(self) -> Path:
        return self.root / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.root / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"


@dataclass(frozen=True)
class HostContext:
    """What the host contributes to a VM's command line."""

    accel: Accel
    kernel: Path
    initramfs: Path
    kernel_cmdline: str
    taps: tuple[str, ...]  # one per NIC, in NIC order
    disk_nodes: tuple[dict, ...]  # QEMU -blockdev protocol-node options, one per disk, in disk order
    incoming: bool = False  # shadow VM: wait for a migration stream (set later via migrate-incoming)
    paused: bool = False  # -S: do not run until told (a shadow resumes only at commit)
    objects: tuple[dict, ...] = ()  # QEMU -object options (JSON), e.g. TLS credentials the disk nodes name


def process_tag(spec: VmSpec) -> str:
    """Marks kvmotion's QEMU processes so a restarted agent can recognize its own."""
    return f"kvmotion:{spec.name}"


def build_argv(spec: VmSpec, paths: VmPaths, ctx: HostContext, binary: str = "qemu-system-x86_64") -> list[str]:
    if len(ctx.taps) != len(spec.nics):
        raise ValueError("one TAP per NIC")
    if len(ctx.disk_nodes) != len(spec.disks):
        raise ValueError("one disk node per disk")
    cpu = "host" if ctx.accel is Accel.KVM and spec.cpu_model == "host" else spec.cpu_model
    argv = [
        binary,
        "-name", f"{spec.name},process={process_tag(spec)}",
        "-machine", f"{MACHINE},accel={ctx.accel.value}",
        "-cpu", cpu,
        "-m", f"{spec.memory >> 20}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(ctx.kernel),
        "-initrd", str(ctx.initramfs),
        "-append", ctx.kernel_cmdline,
        "-chardev",
        f"socket,id=ser0,path={paths.serial},server=on,wait=off,logfile={paths.serial_log},logappend=on",
        "-serial", "chardev:ser0",
        "-chardev", f"socket,id=qmp0,path={paths.qmp},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-pidfile", str(paths.pidfile),
        # A guest must never reboot into a second life behind our back: exit and let the agent see it.
        "-no-reboot",
        "-msg", "timestamp=on",
    ]
    for obj in ctx.objects:
        argv += ["-object", json.dumps(obj, sort_keys=True)]
    for i, node in enumerate(ctx.disk_nodes):
        proto = dict(node, **{"node-name": f"disk{i}-proto"})
        fmt = {"driver": "raw", "node-name": f"disk{i}", "file": f"disk{i}-proto"}
        argv += ["-blockdev", json.dumps(proto, sort_keys=True), "-blockdev", json.dumps(fmt, sort_keys=True)]
        # werror/rerror=stop: an I/O error (a fenced write, a datastore restart) pauses the VM
        # instead of failing the guest's I/O; `cont` retries the request once the cause is gone.
        argv += ["-device", f"virtio-blk-pci,drive=disk{i},id=vblk{i},serial=kvm{i},werror=stop,rerror=stop"]
    for i, (nic, tap) in enumerate(zip(spec.nics, ctx.taps)):
        argv += ["-netdev", f"tap,id=net{i},ifname={tap},script=no,downscript=no"]
        announce = "on" if nic.guest_announce else "off"
        argv += ["-device", f"virtio-net-pci,netdev=net{i},id=vnet{i},mac={nic.mac},guest_announce={announce}"]
    if ctx.incoming:
        argv += ["-incoming", "defer"]
    if ctx.paused:
        argv += ["-S"]
    return argv


def local_file_node(path: Path) -> dict:
    """-blockdev protocol options for a raw file on this host."""
    return {"driver": "file", "filename": str(path), "aio": "threads", "cache": {"direct": False, "no-flush": False}}
