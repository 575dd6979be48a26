"""The QEMU command line: devices in QEMU's JSON syntax mean what the option strings meant, no value
can add a property, and QEMU 10 takes the built devices."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.qemu.accel import Accel
from kvmotion.qemu.cmdline import HostContext, QemuFds, VmPaths, build_argv

SPEC = VmSpec(
    name="web1", memory=512 << 20, vcpus=2,
    disks=(DiskSpec.parse("ds1/web1.img"), DiskSpec.parse("boot.img:1G")),
    nics=(NicSpec.parse("pg=vm-net,mac=52:54:00:12:34:56,ip=10.77.1.10/24"),
          NicSpec.parse("pg=vm-net,mac=52:54:00:12:34:57,guest-announce=on")),
    workloads=(Workload.ECHO, Workload.MEMWRITER), params=WorkloadParams(mem_wss=64 << 20),
)
NULL_DISK = {"driver": "null-co"}

# What the code before issue 14 built for SPEC (build_argv at 77ef359, run and printed), in order.
OLD_DEVICES = [
    ("-device", "virtio-blk-pci,drive=disk0,id=vblk0,serial=kvm0,werror=stop,rerror=stop"),
    ("-device", "virtio-blk-pci,drive=disk1,id=vblk1,serial=kvm1,werror=stop,rerror=stop"),
    ("-netdev", "tap,id=net0,fd=10"),  # the TAP was opened by name (ifname=kvt0) then; now by the agent
    ("-device", "virtio-net-pci,netdev=net0,id=vnet0,mac=52:54:00:12:34:56,guest_announce=off"),
    ("-netdev", "tap,id=net1,fd=11"),
    ("-device", "virtio-net-pci,netdev=net1,id=vnet1,mac=52:54:00:12:34:57,guest_announce=on"),
]


def _argv(spec: VmSpec, root: Path, fds: QemuFds | None = None) -> list[str]:
    fds = fds or QemuFds(qmp=3, serial=4, serial_log=5, taps=tuple(range(10, 10 + len(spec.nics))),
                         disks=tuple(None for _ in spec.disks))
    ctx = HostContext(accel=Accel.TCG, kernel=Path("/k"), initramfs=Path("/i"), kernel_cmdline="quiet",
                      fds=fds, disk_nodes=tuple(NULL_DISK for _ in spec.disks))
    return build_argv(spec, VmPaths(root), ctx)


def _options(option: str, text: str) -> dict:
    """QEMU's KEY=VALUE,... device/netdev syntax as the JSON it means (on/off are booleans)."""
    head, *rest = text.split(",")
    out: dict = {"driver" if option == "-device" else "type": head}
    for part in rest:
        key, _, value = part.partition("=")
        out[key] = {"on": True, "off": False}.get(value, value) if key == "guest_announce" else value
    return out


def test_devices_mean_what_the_option_strings_meant() -> None:
    argv = _argv(SPEC, Path("/run/kv/web1"))
    built = [(w, json.loads(argv[i + 1])) for i, w in enumerate(argv) if w in ("-device", "-netdev")]
    assert built == [(opt, _options(opt, text)) for opt, text in OLD_DEVICES]
    assert argv[argv.index("-name") + 1] == "web1,debug-threads=on,process=kvmotion:web1"
    assert argv[argv.index("-cpu") + 1] == "qemu64"


def test_no_value_can_add_a_property() -> None:
    # Validation refuses these long before; model_construct skips it to test the command line alone.
    nic = NicSpec.model_construct(mac="52:54:00:12:34:56,romfile=/etc/shadow", portgroup="a", ip=None,
                                  guest_announce=False)
    spec = VmSpec.model_construct(**{**SPEC.__dict__, "disks": (), "nics": (nic,)})
    argv = _argv(spec, Path("/run/kv/web1"))
    devices = [json.loads(argv[i + 1]) for i, w in enumerate(argv) if w in ("-device", "-netdev")]
    assert devices[1]["mac"] == "52:54:00:12:34:56,romfile=/etc/shadow" and "romfile" not in devices[1]


@pytest.mark.parametrize("field, value", [("name", "web1,debug-threads=on"), ("cpu_model", "qemu64,+vmx"),
                                          ("cpu_model", "qemu64 x")])
def test_plain_option_strings_refuse_a_comma_or_whitespace(field: str, value: str) -> None:
    spec = VmSpec.model_construct(**{**SPEC.__dict__, "disks": (), "nics": (), field: value})
    with pytest.raises(ValueError, match="cannot go into a QEMU option string"):
        _argv(spec, Path("/run/kv/web1"))


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_qemu_takes_the_built_devices(tmp_path: Path) -> None:
    """QEMU paused (-S) with the built command line less the guest kernel, its sockets and log
    passed as descriptors as the agent does, the TAPs swapped for hub ports (no TAP needed); QMP
    reads the devices' properties back, then quits."""
    paths = VmPaths(tmp_path)
    qmp_sock, serial_sock = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    qmp_sock.bind(str(paths.qmp))
    serial_sock.bind(str(paths.serial))
    for sock in (qmp_sock, serial_sock):
        sock.listen(1)
    log = os.open(paths.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    fds = QemuFds(qmp=qmp_sock.fileno(), serial=serial_sock.fileno(), serial_log=log, taps=(98, 99),
                  disks=(None, None))
    argv = _argv(SPEC, tmp_path, fds)
    for opt in ("-kernel", "-initrd", "-append"):
        i = argv.index(opt)
        del argv[i:i + 2]
    for i, word in enumerate(argv):
        if word == "-netdev":
            argv[i + 1] = json.dumps({"type": "hubport", "id": json.loads(argv[i + 1])["id"], "hubid": 0})
    qmp = [{"execute": "qmp_capabilities"}]
    reads = [("vnet0", "mac"), ("vnet0", "guest_announce"), ("vnet1", "mac"), ("vnet1", "guest_announce"),
             ("vblk1", "serial"), ("vblk1", "werror"), ("vblk1", "drive")]
    qmp += [{"execute": "qom-get", "arguments": {"path": f"/machine/peripheral/{dev}", "property": prop}}
            for dev, prop in reads]
    qmp += [{"execute": "quit"}]
    try:
        out = subprocess.run([*argv, "-S", "-qmp", "stdio"], input="\n".join(map(json.dumps, qmp)),
                             capture_output=True, text=True, timeout=30, pass_fds=fds.passed()[:3])
    finally:
        qmp_sock.close()
        serial_sock.close()
        os.close(log)
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"return"')]
    assert [a["return"] for a in answers[1:1 + len(reads)]] == [
        "52:54:00:12:34:56", False, "52:54:00:12:34:57", True, "kvm1", "stop", "disk1"]
