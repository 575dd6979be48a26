"""The VM spec: what a VM is, independent of the host it runs on.

A spec travels with the VM during migration; the destination builds its shadow VM from it.
Every field reaches QEMU's or the guest kernel's command line, so the spec types are frozen
pydantic models and every construction validates: a spec that exists is one that is safe to run.
Direct construction raises InvalidInput; `from_json` (stored specs, migration peers) too;
FastAPI validates request bodies against the same models.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kvmotion.api.disks import check_disk_name
from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import format_size, parse_size
from kvmotion.core.validation import invalid_input

SPEC_VERSION = 1
MIN_MEMORY = 128 << 20
MAX_MEMORY = 4 << 40
MAX_VCPUS = 64
MAX_DISK_SIZE = 64 << 40
MAX_DISKS = 12
MAX_NICS = 16  # disks + NICs fit the pc machine's 30 free PCI slots; the kernel command line holds 16 NICs
MAX_MEM_STRIDE = 512  # words in a 4 KiB page
MAX_MEM_RATE = 10**12  # bytes/s: above any memory bandwidth a guest writer reaches
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,30}$"  # VM, datastore and host names
_NAME_RE = re.compile(NAME_PATTERN)
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PORTGROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A local disk is a plain file in the host's disk folder: no folder part, cannot be '.' or '..'.
_LOCAL_DISK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NIC_SYNTAX = "pg=PORTGROUP,mac=MAC[,ip=ADDR/PREFIX][,guest-announce=on|off]"
# Validation context of specs written by earlier versions (stored records, older migration peers).
_STORED = {"stored": True}


class Workload(str, Enum):
    """Programs the guest image can run (see kvmotion/guest/init.sh)."""

    IDLE = "idle"
    MEMWRITER = "mem"
    ECHO = "echo"
    DISKWRITER = "disk"
    CPU = "cpu"  # a busy worker per vCPU that reports the work it got done each second


def check_name(name: str, what: str = "VM") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 1-31 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


def check_cpu_model(model: str) -> str:
    if not _CPU_MODEL_RE.fullmatch(model):
        raise InvalidInput(f"invalid CPU model {model!r}: use a QEMU model name such as Haswell-v4 or qemu64")
    return model


def _as_value_error(check: Callable[..., str], *args: str) -> str:
    """Run a check that raises InvalidInput inside a pydantic validator (which wants ValueError)."""
    try:
        return check(*args)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _in_range(lo: int, hi: int, what: str, fmt: Callable[[int], str] = str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"{what} {fmt(value)} is out of range: use {fmt(lo)} to {fmt(hi)}")
        return value

    return check


def _size(n: int) -> str:
    return format_size(n) if n >= 1024 else f"{n} B"


def _limits(lo: int, hi: int) -> Any:
    """Bounds shown in the JSON schema (OpenAPI); the validators enforce them with readable messages."""
    return Field(json_schema_extra={"minimum": lo, "maximum": hi})


def _pattern(regex: re.Pattern[str]) -> Any:
    return Field(json_schema_extra={"pattern": regex.pattern})


DiskSize = Annotated[StrictInt, _limits(0, MAX_DISK_SIZE), AfterValidator(_in_range(0, MAX_DISK_SIZE, "disk size", _size))]
WorkingSet = Annotated[StrictInt, _limits(0, MAX_MEMORY),
                       AfterValidator(_in_range(0, MAX_MEMORY, "memory writer working set", _size))]
DirtyRate = Annotated[StrictInt, _limits(0, MAX_MEM_RATE), AfterValidator(_in_range(0, MAX_MEM_RATE, "memory writer rate"))]
Port = Annotated[StrictInt, _limits(1, 65535), AfterValidator(_in_range(1, 65535, "port"))]
VcpuCount = Annotated[StrictInt, _limits(1, MAX_VCPUS), AfterValidator(_in_range(1, MAX_VCPUS, "vCPU count"))]


class Checked(BaseModel):
    """Frozen, no unknown fields; direct construction raises InvalidInput naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _what: ClassVar[str] = "value"  # what InvalidInput calls it

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_input(exc, self._what) from None

    # Tells pydantic this __init__ validates as BaseModel's does (RootModel does the same), so
    # nested specs are validated by pydantic itself and their errors keep the full field path.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]  # a marker pydantic reads off the function

    @classmethod
    def validated(cls, data: object, *, stored: bool = False) -> Self:
        """`data` (JSON-ready) as this model, or InvalidInput. stored: written by an earlier version."""
        try:
            return cls.model_validate(data, context=_STORED if stored else None)
        except ValidationError as exc:
            raise invalid_input(exc, cls._what) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like any construction."""
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


class DiskSpec(Checked):
    """A disk: a raw file in the host's disk folder ('web1.img') or a datastore disk ('ds1/web1.img')."""

    _what: ClassVar[str] = "disk"
    # Before source: source's rule depends on it. Set when the disk is on a datastore.
    datastore: Annotated[str, _pattern(_NAME_RE)] | None = None
    source: str  # a file name in the host's disk folder, or the disk's name on its datastore
    size: DiskSize = 0  # bytes; 0 = the disk exists already

    @field_validator("datastore")
    @classmethod
    def _datastore_name(cls, v: str | None) -> str | None:
        return v if v is None else _as_value_error(check_name, v, "datastore")

    @field_validator("source")
    @classmethod
    def _source_name(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("datastore") is not None:
            return _as_value_error(check_disk_name, v)
        if not _LOCAL_DISK_RE.fullmatch(v):
            raise ValueError(
                f"invalid local disk {v!r}: name a file in the host's disk folder "
                "(1-128 letters, digits, '.', '_' and '-', starting with a letter or digit; no '/'), "
                "or a datastore disk as DATASTORE/DISK"
            )
        return v

    @property
    def is_local(self) -> bool:
        return self.datastore is None

    @staticmethod
    def parse(text: str) -> DiskSpec:
        """'web1.img:2G', 'web1.img', or 'ds1/web1.img' (datastore names have no '.' or '/')."""
        source, _, size = text.partition(":")
        if not source:
            raise InvalidInput(f"invalid disk {text!r}: use FILE[:SIZE] or DATASTORE/DISK")
        nbytes = parse_size(size) if size else 0
        head, sep, tail = source.partition("/")
        if sep and head and tail and "." not in head and not source.startswith("/"):
            return DiskSpec(source=tail, size=nbytes, datastore=head)
        return DiskSpec(source=source, size=nbytes)


def _mac(value: str) -> str:
    mac = value.lower()
    if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ValueError(f"invalid MAC {value!r}: use a unicast MAC such as 52:54:00:12:34:56")
    return mac


def _ip_interface(value: str) -> str:
    """An IPv4 ADDR/PREFIX a guest can take, re-emitted canonically (so it holds nothing else)."""
    usage = "use ADDR/PREFIX such as 10.0.0.2/24"
    addr, sep, prefix = value.partition("/")
    if not sep or not prefix.isascii() or not prefix.isdigit():
        raise ValueError(f"invalid NIC address {value!r}: {usage}")
    try:
        iface = ipaddress.IPv4Interface(f"{addr}/{int(prefix)}")
    except ValueError:
        raise ValueError(f"invalid NIC address {value!r}: {usage}") from None
    ip, net = iface.ip, iface.network
    if not 1 <= net.prefixlen <= 32 or ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_reserved:
        raise ValueError(f"invalid NIC address {value!r}: not a unicast host address; {usage}")
    if net.prefixlen <= 30 and ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"invalid NIC address {value!r}: that is the network's own or broadcast address")
    return str(iface)


class NicSpec(Checked):
    """A virtio-net NIC: its MAC travels with the VM; port group names the virtual switch.

    After a migration the destination's QEMU announces the MAC (RARP), as vMotion's "notify
    switches" does: the MAC, IPs and peers' ARP entries stay what they were, only the switch port
    moves. guest_announce also has the guest itself send gratuitous ARPs and re-join its multicast
    groups (virtio-net's GUEST_ANNOUNCE): wanted for MACs or VLANs of the guest's own (nested
    bridges, VLAN interfaces) or snooping switches. Off by default: under TCG that work delays the
    resumed guest's first answer by ~15 ms (bench/README.md).
    """

    _what: ClassVar[str] = "NIC"
    mac: Annotated[str, _pattern(_MAC_RE), AfterValidator(_mac)]
    portgroup: Annotated[str, _pattern(_PORTGROUP_RE)]
    ip: Annotated[str, AfterValidator(_ip_interface)] | None = None  # "10.77.1.10/24": the guest configures it at boot
    guest_announce: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _stored_announce(cls, data: Any, info: ValidationInfo) -> Any:
        # A spec written before guest_announce existed ran with QEMU's default (on); the device's
        # features must stay what the guest negotiated, or a migration of it cannot load.
        if info.context and info.context.get("stored") and isinstance(data, dict) and "guest_announce" not in data:
            return {**data, "guest_announce": True}
        return data

    @field_validator("portgroup")
    @classmethod
    def _portgroup_name(cls, v: str) -> str:
        if not _PORTGROUP_RE.fullmatch(v):
            raise ValueError(f"invalid port group name {v!r}: use 1-63 letters, digits, '.', '_' and '-'")
        return v

    @staticmethod
    def parse(text: str) -> NicSpec:
        """'pg=vm-net,mac=52:54:00:12:34:56[,ip=10.0.0.2/24][,guest-announce=on]'."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("pg", "mac", "ip", "guest-announce"):
                raise InvalidInput(f"invalid NIC {text!r}: use {NIC_SYNTAX}")
            fields[key] = value
        if "pg" not in fields or "mac" not in fields:
            raise InvalidInput(f"invalid NIC {text!r}: pg= and mac= are both required")
        announce = fields.get("guest-announce", "off")
        if announce not in ("on", "off"):
            raise InvalidInput(f"invalid guest-announce={announce!r} in NIC {text!r}: use on or off")
        return NicSpec(mac=fields["mac"], portgroup=fields["pg"], ip=fields.get("ip"), guest_announce=announce == "on")

    @staticmethod
    def from_json(data: object) -> NicSpec:
        """A NIC as stored or sent by any version (no guest_announce: on, QEMU's default)."""
        return NicSpec.validated(data, stored=True)


class WorkloadParams(Checked):
    """Knobs of the guest programs."""

    _what: ClassVar[str] = "workload parameters"
    mem_wss: WorkingSet = 256 << 20  # memory writer working set, bytes
    mem_rate: DirtyRate = 100 * 10**6  # memory writer dirty rate, bytes/s (0 = as fast as it can)
    # After a page's first write the writer rewrites only every mem_stride-th word of it: the same
    # dirty pages for less guest CPU, so a TCG guest too can dirty faster than a link carries.
    mem_stride: Annotated[StrictInt, _limits(1, MAX_MEM_STRIDE)] = 1
    echo_port: Port = 7000  # TCP and UDP

    @field_validator("mem_stride")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if not 1 <= v <= MAX_MEM_STRIDE or v & (v - 1):
            raise ValueError(f"invalid memory writer stride {v}: use a power of two from 1 to {MAX_MEM_STRIDE}")
        return v


def _memory(value: int) -> int:
    if value < MIN_MEMORY:
        raise ValueError(f"memory {_size(value)} is too small: a VM needs at least {_size(MIN_MEMORY)}")
    if value > MAX_MEMORY:
        raise ValueError(f"memory {_size(value)} is too large: at most {_size(MAX_MEMORY)}")
    return value


class VmSpec(Checked):
    """Everything needed to run a VM on any host. Versioned so agents can refuse what they don't know."""

    _what: ClassVar[str] = "VM spec"
    name: Annotated[str, _pattern(_NAME_RE)]
    memory: Annotated[StrictInt, _limits(MIN_MEMORY, MAX_MEMORY), AfterValidator(_memory)]  # bytes
    vcpus: VcpuCount = 1
    cpu_model: Annotated[str, _pattern(_CPU_MODEL_RE)] = "qemu64"
    disks: Annotated[tuple[DiskSpec, ...], Field(max_length=MAX_DISKS)] = ()
    nics: Annotated[tuple[NicSpec, ...], Field(max_length=MAX_NICS)] = ()
    workloads: Annotated[tuple[Workload, ...], Field(min_length=1, max_length=len(Workload))] = (Workload.IDLE,)
    params: WorkloadParams = WorkloadParams()
    version: StrictInt = SPEC_VERSION

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _as_value_error(check_name, v)

    @field_validator("cpu_model")
    @classmethod
    def _cpu_model(cls, v: str) -> str:
        return _as_value_error(check_cpu_model, v)

    @field_validator("workloads")
    @classmethod
    def _unique_workloads(cls, v: tuple[Workload, ...]) -> tuple[Workload, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"a workload is listed twice in {', '.join(w.value for w in v)}")
        return v

    @field_validator("disks")
    @classmethod
    def _unique_disks(cls, v: tuple[DiskSpec, ...]) -> tuple[DiskSpec, ...]:
        seen = [(d.datastore, d.source) for d in v]
        if len(set(seen)) != len(seen):
            raise ValueError("the same disk is attached twice")
        return v

    @field_validator("nics")
    @classmethod
    def _unique_macs(cls, v: tuple[NicSpec, ...]) -> tuple[NicSpec, ...]:
        macs = [n.mac for n in v]
        dup = next((m for m in macs if macs.count(m) > 1), None)
        if dup is not None:
            raise ValueError(f"MAC {dup} is on two NICs")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SPEC_VERSION:
            raise ValueError(f"VM spec version {v} is not supported (this kvmotion reads {SPEC_VERSION})")
        return v

    @property
    def on_datastore(self) -> bool:
        """Has a disk on a datastore: its write lease is held, renewed and handed over."""
        return any(d.datastore for d in self.disks)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    @staticmethod
    def from_json(data: object) -> VmSpec:
        """A spec as stored or sent by any version of kvmotion, or InvalidInput naming the field."""
        return VmSpec.validated(data, stored=True)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def spec_hash(spec: VmSpec) -> str:
    """SHA-256 (hex) of the spec's canonical JSON: what an agent reports so the center can tell a VM's
    observed definition from the one it wants without shipping the spec every heartbeat."""
    return hashlib.sha256(spec.dumps().encode()).hexdigest()
