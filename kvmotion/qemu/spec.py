"""The VM spec: what a VM is, independent of the host it runs on.

A spec travels with the VM during migration; the destination builds its shadow VM from it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from enum import Enum

from kvmotion.errors import InvalidInput
from kvmotion.units import parse_size

SPEC_VERSION = 1
MIN_MEMORY = 128 << 20
MAX_MEM_STRIDE = 512  # words in a 4 KiB page
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
NIC_SYNTAX = "pg=PORTGROUP,mac=MAC[,ip=ADDR/PREFIX][,guest-announce=on|off]"


class Workload(str, Enum):
    """Programs the guest image can run (see kvmotion/guest/init.sh)."""

    IDLE = "idle"
    MEMWRITER = "mem"
    ECHO = "echo"
    DISKWRITER = "disk"


def check_name(name: str, what: str = "VM") -> str:
    if not _NAME_RE.match(name):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 1-31 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class DiskSpec:
    """A disk: a local raw file (path) or a datastore disk ('ds1/web1.img')."""

    source: str
    size: int = 0  # bytes; 0 = the disk exists already
    datastore: str | None = None  # set when source is on a datastore

    @property
    def is_local(self) -> bool:
        return self.datastore is None

    @staticmethod
    def parse(text: str) -> "DiskSpec":
        """'web1.img:2G', '/path/x.img', or 'ds1/web1.img' (datastore names have no '.' or '/')."""
        source, _, size = text.partition(":")
        if not source:
            raise InvalidInput(f"invalid disk {text!r}: use PATH[:SIZE] or DATASTORE/DISK")
        nbytes = parse_size(size) if size else 0
        head, sep, tail = source.partition("/")
        if sep and head and tail and "." not in head and not source.startswith("/"):
            check_name(head, "datastore")
            return DiskSpec(source=tail, size=nbytes, datastore=head)
        return DiskSpec(source=source, size=nbytes)


@dataclass(frozen=True)
class NicSpec:
    """A virtio-net NIC: its MAC travels with the VM; port group names the virtual switch.

    After a migration the destination's QEMU announces the MAC (RARP), as vMotion's "notify
    switches" does: the MAC, IPs and peers' ARP entries stay what they were, only the switch port
    moves. guest_announce also has the guest itself send gratuitous ARPs and re-join its multicast
    groups (virtio-net's GUEST_ANNOUNCE): wanted for MACs or VLANs of the guest's own (nested
    bridges, VLAN interfaces) or snooping switches. Off by default: under TCG that work delays the
    resumed guest's first answer by ~15 ms (bench/README.md).
    """

    mac: str
    portgroup: str
    ip: str | None = None  # "10.77.1.10/24": the guest configures it at boot
    guest_announce: bool = False

    @staticmethod
    def parse(text: str) -> "NicSpec":
        """'pg=vm-net,mac=52:54:00:12:34:56[,ip=10.0.0.2/24][,guest-announce=on]'."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("pg", "mac", "ip", "guest-announce"):
                raise InvalidInput(f"invalid NIC {text!r}: use {NIC_SYNTAX}")
            fields[key] = value
        if "pg" not in fields or "mac" not in fields:
            raise InvalidInput(f"invalid NIC {text!r}: pg= and mac= are both required")
        mac = fields["mac"].lower()
        if not _MAC_RE.match(mac) or int(mac[:2], 16) & 1:
            raise InvalidInput(f"invalid MAC {fields['mac']!r}: use a unicast MAC such as 52:54:00:12:34:56")
        ip = fields.get("ip")
        if ip is not None and not re.match(r"^\d+\.\d+\.\d+\.\d+/\d+$", ip):
            raise InvalidInput(f"invalid NIC address {ip!r}: use ADDR/PREFIX such as 10.0.0.2/24")
        announce = fields.get("guest-announce", "off")
        if announce not in ("on", "off"):
            raise InvalidInput(f"invalid guest-announce={announce!r} in NIC {text!r}: use on or off")
        return NicSpec(mac=mac, portgroup=fields["pg"], ip=ip, guest_announce=announce == "on")

    @staticmethod
    def from_json(data: dict) -> "NicSpec":
        # A spec written before guest_announce existed ran with QEMU's default (on); the device's
        # features must stay what the guest negotiated, or a migration of it cannot load.
        nic = NicSpec(**{"guest_announce": True, **data})
        if not isinstance(nic.guest_announce, bool):
            raise TypeError(f"guest_announce must be true or false, not {nic.guest_announce!r}")
        return nic


@dataclass(frozen=True)
class WorkloadParams:
    """Knobs of the guest programs."""

    mem_wss: int = 256 << 20  # memory writer working set, bytes
    mem_rate: int = 100 * 10**6  # memory writer dirty rate, bytes/s (0 = as fast as it can)
    # After a page's first write the writer rewrites only every mem_stride-th word of it: the same
    # dirty pages for less guest CPU, so a TCG guest too can dirty faster than a link carries.
    mem_stride: int = 1
    echo_port: int = 7000  # TCP and UDP

    def __post_init__(self) -> None:
        if not 1 <= self.mem_stride <= MAX_MEM_STRIDE or self.mem_stride & (self.mem_stride - 1):
            raise InvalidInput(
                f"invalid memory writer stride {self.mem_stride}: use a power of two from 1 to {MAX_MEM_STRIDE}"
            )


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to run a VM on any host. Versioned so agents can refuse what they don't know."""

    name: str
    memory: int  # bytes
    vcpus: int = 1
    cpu_model: str = "qemu64"
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    workloads: tuple[Workload, ...] = (Workload.IDLE,)
    params: WorkloadParams = field(default_factory=WorkloadParams)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.memory < MIN_MEMORY:
            raise InvalidInput(f"memory {self.memory >> 20} MiB is too small: a VM needs at least 128M")
        if not 1 <= self.vcpus <= 64:
            raise InvalidInput(f"invalid vCPU count {self.vcpus}: use 1 to 64")
        if self.version != SPEC_VERSION:
            raise InvalidInput(f"VM spec version {self.version} is not supported (this kvmotion reads {SPEC_VERSION})")

    @property
    def on_datastore(self) -> bool:
        """Has a disk on a datastore: its write lease is held, renewed and handed over."""
        return any(d.datastore for d in self.disks)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> "VmSpec":
        try:
            return VmSpec(
                name=data["name"],
                memory=int(data["memory"]),
                vcpus=int(data.get("vcpus", 1)),
                cpu_model=data.get("cpu_model", "qemu64"),
                disks=tuple(DiskSpec(**d) for d in data.get("disks", ())),
                nics=tuple(NicSpec.from_json(n) for n in data.get("nics", ())),
                workloads=tuple(Workload(w) for w in data.get("workloads", ("idle",))),
                params=WorkloadParams(**data.get("params", {})),
                version=int(data.get("version", SPEC_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed VM spec: {exc}") from exc

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
