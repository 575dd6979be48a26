"""A NIC's spec, its JSON across versions, and the virtio-net device it becomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmotion.api.spec import NicSpec, VmSpec
from kvmotion.core.errors import InvalidInput
from kvmotion.qemu.accel import Accel
from kvmotion.qemu.cmdline import HostContext, QemuFds, VmPaths, build_argv

MAC = "52:54:00:12:34:56"


def _nic_devices(spec: VmSpec) -> list[dict]:
    fds = QemuFds(qmp=3, serial=4, serial_log=5, taps=tuple(range(10, 10 + len(spec.nics))))
    ctx = HostContext(accel=Accel.TCG, kernel=Path("/k"), initramfs=Path("/i"), kernel_cmdline="quiet",
                      fds=fds, disk_nodes=())
    argv = build_argv(spec, VmPaths(Path("/run/x")), ctx)
    devices = [json.loads(argv[i + 1]) for i, word in enumerate(argv) if word == "-device"]
    return [d for d in devices if d["driver"] == "virtio-net-pci"]


def _device(i: int, mac: str, announce: bool) -> dict:
    return {"driver": "virtio-net-pci", "netdev": f"net{i}", "id": f"vnet{i}", "mac": mac, "guest_announce": announce}


def test_parse_defaults_to_host_announce_only() -> None:
    assert NicSpec.parse(f"pg=vm-net,mac={MAC}").guest_announce is False
    assert NicSpec.parse(f"pg=vm-net,mac={MAC},guest-announce=on").guest_announce is True
    assert NicSpec.parse(f"pg=vm-net,mac={MAC},guest-announce=off").guest_announce is False


@pytest.mark.parametrize("text, message", [
    (f"pg=vm-net,mac={MAC},guest-announce=yes", "use on or off"),
    (f"pg=vm-net,mac={MAC},announce=on", "guest-announce=on|off"),
])
def test_parse_refuses_bad_announce(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        NicSpec.parse(text)


def test_device_carries_the_choice() -> None:
    spec = VmSpec(name="web1", memory=256 << 20, nics=(
        NicSpec(mac=MAC, portgroup="a"),
        NicSpec(mac="52:54:00:12:34:57", portgroup="a", guest_announce=True),
    ))
    assert _nic_devices(spec) == [_device(0, MAC, False), _device(1, "52:54:00:12:34:57", True)]


def test_json_round_trip_keeps_the_choice() -> None:
    for announce in (False, True):
        spec = VmSpec(name="web1", memory=256 << 20, nics=(NicSpec(mac=MAC, portgroup="a", guest_announce=announce),))
        assert VmSpec.from_json(spec.to_json()) == spec


def test_spec_written_before_the_field_keeps_qemus_default() -> None:
    # A VM started before guest_announce existed negotiated the feature with its guest: its
    # destination must offer it too, or the migration stream cannot load.
    old = {"name": "web1", "memory": 256 << 20, "nics": [{"mac": MAC, "portgroup": "a", "ip": None}]}
    spec = VmSpec.from_json(old)
    assert spec.nics[0].guest_announce is True
    assert _nic_devices(spec) == [_device(0, MAC, True)]


def test_malformed_announce_in_json_is_refused() -> None:
    bad = {"name": "web1", "memory": 256 << 20, "nics": [{"mac": MAC, "portgroup": "a", "guest_announce": "false"}]}
    with pytest.raises(InvalidInput, match=r"^invalid VM spec: nics\.0\.guest_announce: Input should be a valid boolean"):
        VmSpec.from_json(bad)
