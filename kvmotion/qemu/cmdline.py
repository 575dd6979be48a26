"""VM spec + host context -> QEMU command line (pure).

Same spec, same command line on every host: the destination's shadow VM must have exactly the
source's devices for QEMU's migration stream to load, so all host-specific parts (sockets, TAP
names, disk transports) come in through `HostContext` and never change device layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.spec import VmSpec
from kvmotion.qemu.accel import Accel
from kvmotion.qemu.confine import SANDBOX

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


SERIAL_LOG_FDSET = 0  # -add-fd set of the serial log; local disk i is set 1 + i


def fdset_path(set_id: int) -> str:
    return f"/dev/fdset/{set_id}"


def disk_fdset(index: int) -> int:
    return 1 + index


@dataclass(frozen=True)
class QemuFds:
    """Descriptors the agent opens for QEMU, inherited at these numbers: QEMU itself then needs
    no access to the VM's run folder, its disk files or /dev/net/tun (it may run unprivileged)."""

    qmp: int  # listening unix socket at VmPaths.qmp
    serial: int  # listening unix socket at VmPaths.serial
    serial_log: int  # VmPaths.serial_log, open for appending
    taps: tuple[int, ...] = ()  # one per NIC, in NIC order: attached to the NIC's TAP
    disks: tuple[int | None, ...] = ()  # one per disk, in disk order: a local file open read-write, None for NBD

    def passed(self) -> tuple[int, ...]:
        return (self.qmp, self.serial, self.serial_log, *self.taps, *(fd for fd in self.disks if fd is not None))


@dataclass(frozen=True)
class HostContext:
    """What the host contributes to a VM's command line."""

    accel: Accel
    kernel: Path
    initramfs: Path
    kernel_cmdline: str
    fds: QemuFds
    disk_nodes: tuple[dict, ...]  # QEMU -blockdev protocol-node options, one per disk, in disk order
    incoming: bool = False  # shadow VM: wait for a migration stream (set later via migrate-incoming)
    paused: bool = False  # -S: do not run until told (a shadow resumes only at commit)
    objects: tuple[dict, ...] = ()  # QEMU -object options (JSON), e.g. TLS credentials the disk nodes name


def process_tag(spec: VmSpec) -> str:
    """Marks kvmotion's QEMU processes so a restarted agent can recognize its own."""
    return f"kvmotion:{spec.name}"


def _plain(value: str) -> str:
    """A value spliced into one of QEMU's KEY=VALUE,... strings: it must not be able to add a key.

    The spec's and host's values are validated before they get here; this is a second line."""
    if not value or "," in value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} cannot go into a QEMU option string")
    return value


def _json(options: dict) -> str:
    """-device / -netdev in QEMU's JSON syntax: every value stays one property's value."""
    return json.dumps(options, sort_keys=True)


def build_argv(spec: VmSpec, paths: VmPaths, ctx: HostContext, binary: str = "qemu-system-x86_64") -> list[str]:
    fds = ctx.fds
    if len(fds.taps) != len(spec.nics):
        raise ValueError("one TAP per NIC")
    if len(ctx.disk_nodes) != len(spec.disks) or len(fds.disks) != len(spec.disks):
        raise ValueError("one disk node and one disk descriptor (or None) per disk")
    cpu = "host" if ctx.accel is Accel.KVM and spec.cpu_model == "host" else spec.cpu_model
    for value in (spec.name, cpu):  # paths only appear as -add-fd labels, escaped (_opt)
        _plain(value)
    argv = [
        binary,
        # Named threads (mig/src/send_0, ...): a stalled migration is cancelled by them (qemu/cancel.py).
        "-name", f"{spec.name},debug-threads=on,process={process_tag(spec)}",
        "-machine", f"{MACHINE},accel={ctx.accel.value}",
        "-cpu", cpu,
        "-m", f"{spec.memory >> 20}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-sandbox", SANDBOX,
        "-kernel", str(ctx.kernel),
        "-initrd", str(ctx.initramfs),
        "-append", ctx.kernel_cmdline,
        # Sockets and files by descriptor (QemuFds); the pid file is the agent's (QemuProcess.start).
        "-add-fd", f"fd={fds.serial_log},set={SERIAL_LOG_FDSET},opaque={_opt(paths.serial_log)}",
        "-chardev",
        f"socket,id=ser0,fd={fds.serial},server=on,wait=off,logfile={fdset_path(SERIAL_LOG_FDSET)},logappend=on",
        "-serial", "chardev:ser0",
        "-chardev", f"socket,id=qmp0,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        # A guest must never reboot into a second life behind our back: exit and let the agent see it.
        "-no-reboot",
        "-msg", "timestamp=on",
    ]
    for obj in ctx.objects:
        argv += ["-object", json.dumps(obj, sort_keys=True)]
    for i, fd in enumerate(fds.disks):
        if fd is not None:
            argv += ["-add-fd", f"fd={fd},set={disk_fdset(i)},opaque=disk{i}"]
    for i, node in enumerate(ctx.disk_nodes):
        proto = dict(node, **{"node-name": f"disk{i}-proto"})
        fmt = {"driver": "raw", "node-name": f"disk{i}", "file": f"disk{i}-proto"}
        argv += ["-blockdev", json.dumps(proto, sort_keys=True), "-blockdev", json.dumps(fmt, sort_keys=True)]
        # werror/rerror=stop: an I/O error (a fenced write, a datastore restart) pauses the VM
        # instead of failing the guest's I/O; `cont` retries the request once the cause is gone.
        argv += ["-device", _json({"driver": "virtio-blk-pci", "drive": f"disk{i}", "id": f"vblk{i}", "serial": f"kvm{i}",
                                   "werror": "stop", "rerror": "stop"})]
    for i, (nic, tap) in enumerate(zip(spec.nics, fds.taps, strict=True)):  # checked above
        argv += ["-netdev", _json({"type": "tap", "id": f"net{i}", "fd": str(tap)})]
        argv += ["-device", _json({"driver": "virtio-net-pci", "netdev": f"net{i}", "id": f"vnet{i}", "mac": nic.mac,
                                   "guest_announce": nic.guest_announce})]
    if ctx.incoming:
        argv += ["-incoming", "defer"]
    if ctx.paused:
        argv += ["-S"]
    return argv


def local_file_node(index: int) -> dict:
    """-blockdev protocol options for local raw disk `index`, a file the agent passes open (QemuFds.disks)."""
    return {"driver": "file", "filename": fdset_path(disk_fdset(index)), "aio": "threads",
            "cache": {"direct": False, "no-flush": False}}


def _opt(value: object) -> str:
    """A value inside a QemuOpts option list: commas doubled."""
    return str(value).replace(",", ",,")
