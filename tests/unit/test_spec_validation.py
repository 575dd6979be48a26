"""The VM spec refuses what could reach QEMU's or the guest kernel's command line unchecked (issue 14),
with one line naming the field; specs stored by earlier versions still load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.core.errors import InvalidInput
from kvmotion.core.jsonio import as_json
from kvmotion.guest.cmdline import kernel_cmdline
from kvmotion.host.store import VmStore

MAC = "52:54:00:12:34:56"
BASE = {"name": "web1", "memory": 512 << 20}

# As the code before issue 14 wrote it (VmStore.put of a dataclass spec), byte for byte.
OLD_RECORD = """{
 "committed_migration": null,
 "created_at": 1500000000.0,
 "incoming_migration": null,
 "resumed_at": null,
 "spec": {
  "cpu_model": "qemu64",
  "disks": [
   {"datastore": "ds1", "size": 0, "source": "web1.img"},
   {"datastore": null, "size": 1073741824, "source": "boot.img"}
  ],
  "memory": 536870912,
  "name": "web1",
  "nics": [{"guest_announce": false, "ip": "10.77.1.10/24", "mac": "52:54:00:12:34:56", "portgroup": "vm-net"}],
  "params": {"echo_port": 7000, "mem_rate": 100000000, "mem_stride": 1, "mem_wss": 67108864},
  "vcpus": 2,
  "version": 1,
  "workloads": ["echo", "mem"]
 }
}"""


def _refused(data: dict) -> str:
    with pytest.raises(InvalidInput) as err:
        VmSpec.from_json(data)
    message = str(err.value)
    assert "\n" not in message and message.startswith("invalid VM spec: "), message
    return message


@pytest.mark.parametrize("change, field, says", [
    # issue 14's four injections
    ({"nics": [{"mac": f"{MAC},romfile=/etc/shadow", "portgroup": "vm-net"}]}, "nics.0.mac", "invalid MAC"),
    ({"cpu_model": "qemu64,+vmx"}, "cpu_model", "invalid CPU model"),
    ({"nics": [{"mac": MAC, "portgroup": "vm-net", "ip": "1.2.3.4/24 init=/bin/sh"}]}, "nics.0.ip", "invalid NIC address"),
    ({"disks": [{"source": "../../../../etc/shadow"}]}, "disks.0.source", "invalid local disk"),
    ({"disks": [{"source": "/dev/sda"}]}, "disks.0.source", "invalid local disk"),
    # a trailing newline ('$' matches before one): every name is matched in full
    ({"name": "web1\n"}, "name", "invalid VM name"),
    ({"cpu_model": "qemu64\n"}, "cpu_model", "invalid CPU model"),
    ({"disks": [{"source": "web1.img\n"}]}, "disks.0.source", "invalid local disk"),
    ({"disks": [{"source": "web1.img\n", "datastore": "ds1"}]}, "disks.0.source", "invalid disk name"),
    ({"nics": [{"mac": f"{MAC}\n", "portgroup": "vm-net"}]}, "nics.0.mac", "invalid MAC"),
    # the rest of the spec's rules
    ({"disks": [{"source": "..", "size": 1 << 20}]}, "disks.0.source", "invalid local disk"),
    ({"disks": [{"source": "web1.img", "size": 65 << 40}]}, "disks.0.size", "out of range"),
    ({"disks": [{"source": "../web1.img", "datastore": "ds1"}]}, "disks.0.source", "invalid disk name"),
    ({"disks": [{"source": "web1.img", "datastore": "../ds1"}]}, "disks.0.datastore", "invalid datastore name"),
    ({"disks": [{"source": "a.img"}, {"source": "a.img"}]}, "disks", "attached twice"),
    ({"nics": [{"mac": "01:00:5e:00:00:01", "portgroup": "vm-net"}]}, "nics.0.mac", "unicast"),
    ({"nics": [{"mac": "00:00:00:00:00:00", "portgroup": "vm-net"}]}, "nics.0.mac", "unicast"),
    ({"nics": [{"mac": MAC, "portgroup": "vm net"}]}, "nics.0.portgroup", "invalid port group"),
    ({"nics": [{"mac": MAC, "portgroup": "a", "ip": "10.0.0.0/24"}]}, "nics.0.ip", "network's own"),
    ({"nics": [{"mac": MAC, "portgroup": "a", "ip": "10.0.0.2"}]}, "nics.0.ip", "ADDR/PREFIX"),
    ({"nics": [{"mac": MAC, "portgroup": "a", "romfile": "/etc/shadow"}]}, "nics.0.romfile", "not a known field"),
    ({"nics": [{"mac": MAC, "portgroup": "a"}, {"mac": MAC.upper(), "portgroup": "a"}]}, "nics", "on two NICs"),
    ({"name": "Web_1"}, "name", "invalid VM name"),
    ({"memory": 16 << 20}, "memory", "too small"),
    ({"memory": 5 << 40}, "memory", "too large"),
    ({"memory": "512M"}, "memory", "valid integer"),
    ({"memory": True}, "memory", "valid integer"),
    ({"vcpus": 65}, "vcpus", "use 1 to 64"),
    ({"workloads": ["echo", "echo"]}, "workloads", "listed twice"),
    ({"workloads": []}, "workloads", "at least 1"),
    ({"params": {"mem_stride": 3}}, "params.mem_stride", "power of two"),
    ({"params": {"mem_rate": -1}}, "params.mem_rate", "out of range"),
    ({"params": {"echo_port": 70000}}, "params.echo_port", "out of range"),
    ({"version": 2}, "version", "not supported"),
    ({"extra": 1}, "extra", "not a known field"),
])
def test_refused_with_one_line_naming_the_field(change: dict, field: str, says: str) -> None:
    message = _refused({**BASE, **change})
    assert message.startswith(f"invalid VM spec: {field}: "), message
    assert says in message, message


def test_direct_construction_validates_too() -> None:
    with pytest.raises(InvalidInput, match=r"^invalid NIC: mac: invalid MAC '52:54:00:12:34:56,romfile=/etc/shadow'"):
        NicSpec(mac=f"{MAC},romfile=/etc/shadow", portgroup="vm-net")
    with pytest.raises(InvalidInput, match=r"^invalid disk: source: invalid local disk '/etc/shadow'"):
        DiskSpec(source="/etc/shadow")
    with pytest.raises(InvalidInput, match=r"^invalid VM spec: cpu_model: "):
        VmSpec(name="web1", memory=512 << 20, cpu_model="qemu64 -device x")
    with pytest.raises(InvalidInput, match="stride"):
        WorkloadParams(mem_stride=1024)
    spec = VmSpec(name="web1", memory=512 << 20)
    with pytest.raises(InvalidInput, match=r"^invalid VM spec: name: "):
        spec.replace(name="web1,process=x")
    assert spec.replace(name="web2").name == "web2"
    with pytest.raises(ValueError):  # frozen
        spec.name = "web2"  # type: ignore[misc]


def test_cli_syntax() -> None:
    assert DiskSpec.parse("web1.img:2G") == DiskSpec(source="web1.img", size=2 << 30)
    assert DiskSpec.parse("ds1/web1.img") == DiskSpec(source="web1.img", datastore="ds1")
    for text in ("/dev/sda", "/srv/x.img:1G", "./x.img", "../x.img", "ds1/../x.img"):
        with pytest.raises(InvalidInput, match="invalid"):
            DiskSpec.parse(text)
    nic = NicSpec.parse("pg=vm-net,mac=52:54:00:AB:CD:EF,ip=10.0.0.2/024")
    assert (nic.mac, nic.ip) == ("52:54:00:ab:cd:ef", "10.0.0.2/24")  # normalised, canonical
    with pytest.raises(InvalidInput, match="invalid NIC"):
        NicSpec.parse(f"pg=vm-net,mac={MAC},romfile=/etc/shadow")
    with pytest.raises(InvalidInput, match="invalid MAC"):
        NicSpec.parse("pg=vm-net,mac=zz")


def test_spec_stored_by_the_old_code_loads(tmp_path: Path) -> None:
    store = VmStore(tmp_path)
    (store.root / "web1.json").write_text(OLD_RECORD)
    [record] = store.all()
    spec = record.spec
    assert spec.disks == (DiskSpec(source="web1.img", datastore="ds1"), DiskSpec(source="boot.img", size=1 << 30))
    assert spec.nics == (NicSpec(mac=MAC, portgroup="vm-net", ip="10.77.1.10/24"),)
    assert spec.workloads == (Workload.ECHO, Workload.MEMWRITER) and spec.params.mem_wss == 64 << 20
    # Written back as it was read: same keys, same values.
    assert spec.to_json() == json.loads(OLD_RECORD)["spec"]
    assert json.loads(spec.dumps()) == as_json(spec) == spec.to_json()
    assert VmSpec.from_json(spec.to_json()) == spec


def test_stored_nic_without_guest_announce_keeps_qemus_default() -> None:
    old = {**BASE, "nics": [{"mac": MAC, "portgroup": "a", "ip": None}]}
    assert VmSpec.from_json(old).nics[0].guest_announce is True
    assert NicSpec.from_json({"mac": MAC, "portgroup": "a"}).guest_announce is True
    assert NicSpec(mac=MAC, portgroup="a").guest_announce is False  # a new NIC: off


def test_stored_spec_this_version_refuses_is_skipped_not_fatal(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    store = VmStore(tmp_path)
    bad = json.loads(OLD_RECORD)
    bad["spec"]["disks"][1]["source"] = "/srv/images/boot.img"  # the old code took absolute paths
    (store.root / "web1.json").write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="kvmotion.agent"):
        assert store.all() == []
    assert "disks.1.source" in caplog.text


def test_kernel_command_line_refuses_a_value_with_whitespace() -> None:
    # Only an unvalidated spec (model_construct skips validation) can hold one: the second line of defence.
    nic = NicSpec.model_construct(mac=MAC, portgroup="a", ip="1.2.3.4/24 init=/bin/sh", guest_announce=False)
    spec = VmSpec.model_construct(**{**VmSpec(**BASE).__dict__, "nics": (nic,)})
    with pytest.raises(InvalidInput, match=r"kvmotion\.nic0: .* holds whitespace"):
        kernel_cmdline(spec)
    spec = VmSpec.model_construct(**{**VmSpec(**BASE).__dict__, "name": 'web1"x'})
    with pytest.raises(InvalidInput, match=r"kvmotion\.hostname"):
        kernel_cmdline(spec)
