"""The QEMU command line: devices in QEMU's JSON syntax mean what the option strings meant, no value
can add a property, and QEMU 10 takes the built devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmotion.qemu.accel import Accel
from kvmotion.qemu.cmdline import HostContext, VmPaths, build_argv
from kvmotion.qemu.spec import DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams

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
    ("-netdev", "tap,id=net0,ifname=kvt0,script=no,downscript=no"),
    ("-device", "virtio-net-pci,netdev=net0,id=vnet0,mac=52:54:00:12:34:56,guest_announce=off"),
    ("-netdev", "tap,id=net1,ifname=kvt1,script=no,downscript=no"),
    ("-device", "virtio-net-pci,netdev=net1,id=vnet1,mac=52:54:00:12:34:57,guest_announce=on"),
]


def _argv(spec: VmSpec, root: Path, taps: tuple[str, ...] = ("kvt0", "kvt1")) -> list[str]:
    ctx = HostContext(accel=Accel.TCG, kernel=Path("/k"), initramfs=Path("/i"), kernel_cmdline="quiet",
                      taps=taps, disk_nodes=tuple(NULL_DISK for _ in spec.disks))
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
    assert argv[argv.index("-name") + 1] == "web1,process=kvmotion:web1"
    assert argv[argv.index("-cpu") + 1] == "qemu64"


def test_no_value_can_add_a_property() -> None:
    # Validation refuses these long before; model_construct skips it to test the command line alone.
    nic = NicSpec.model_construct(mac="52:54:00:12:34:56,romfile=/etc/shadow", portgroup="a", ip=None,
                                  guest_announce=False)
    spec = VmSpec.model_construct(**{**SPEC.__dict__, "disks": (), "nics": (nic,)})
    argv = _argv(spec, Path("/run/kv/web1"), taps=("kvt0,script=/bin/evil",))
    devices = [json.loads(argv[i + 1]) for i, w in enumerate(argv) if w in ("-device", "-netdev")]
    assert devices[0]["ifname"] == "kvt0,script=/bin/evil" and devices[0]["script"] == "no"
    assert devices[1]["mac"] == "52:54:00:12:34:56,romfile=/etc/shadow" and "romfile" not in devices[1]


@pytest.mark.parametrize("field, value", [("name", "web1,debug-threads=on"), ("cpu_model", "qemu64,+vmx"),
                                          ("cpu_model", "qemu64 x")])
def test_plain_option_strings_refuse_a_comma_or_whitespace(field: str, value: str) -> None:
    spec = VmSpec.model_construct(**{**SPEC.__dict__, "disks": (), "nics": (), field: value})
    with pytest.raises(ValueError, match="cannot go into a QEMU option string"):
        _argv(spec, Path("/run/kv/web1"), taps=())
    with pytest.raises(ValueError, match="cannot go into a QEMU option string"):
        _argv(SPEC.replace(disks=(), nics=()), Path("/run/kv/web,1"), taps=())


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("unshare") is None
                    or os.geteuid() != 0, reason="needs qemu-system-x86_64, unshare and root (a TAP in a private netns)")
def test_qemu_takes_the_built_devices(tmp_path: Path) -> None:
    """QEMU paused (-S) with the built command line less the guest kernel, in a network namespace of
    its own (its TAPs vanish with it); QMP reads the devices' properties back, then quits."""
    argv = _argv(SPEC, tmp_path)
    for opt in ("-kernel", "-initrd", "-append"):
        i = argv.index(opt)
        del argv[i:i + 2]
    qmp = [{"execute": "qmp_capabilities"}]
    reads = [("vnet0", "mac"), ("vnet0", "guest_announce"), ("vnet1", "mac"), ("vnet1", "guest_announce"),
             ("vblk1", "serial"), ("vblk1", "werror"), ("vblk1", "drive")]
    qmp += [{"execute": "qom-get", "arguments": {"path": f"/machine/peripheral/{dev}", "property": prop}}
            for dev, prop in reads]
    qmp += [{"execute": "quit"}]
    out = subprocess.run(["unshare", "--net", *argv, "-S", "-qmp", "stdio"], input="\n".join(map(json.dumps, qmp)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"return"')]
    assert [a["return"] for a in answers[1:1 + len(reads)]] == [
        "52:54:00:12:34:56", False, "52:54:00:12:34:57", True, "kvm1", "stop", "disk1"]
