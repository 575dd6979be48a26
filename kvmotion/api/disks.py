"""Disks and write leases as a datastore's control API serves them, and the names they go by.

Stdlib only (and kvmotion.core.errors): nbdkit's embedded interpreter imports this module through
kvmotion.storage.lease.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvmotion.core.errors import InvalidInput

_DISK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_disk_name(name: str) -> str:
    if not _DISK_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid disk name {name!r}: use 1-100 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (e.g. web1.img)"
        )
    return name


def check_host_name(name: str) -> str:
    if not _HOST_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid host name {name!r}: use 1-63 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Lease:
    """The right of one (host, VM) to write one disk, until `expires_at` unless renewed."""

    disk: str
    host: str
    vm: str
    generation: int
    expires_at: float  # datastore wall clock, Unix seconds
    # The host that handed this lease over, until the holder renews it: it may take it back (rollback).
    handed_over_by: str | None = None

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Lease:
        by = data.get("handed_over_by")
        return Lease(
            disk=str(data["disk"]),
            host=str(data["host"]),
            vm=str(data["vm"]),
            generation=int(data["generation"]),
            expires_at=float(data["expires_at"]),
            handed_over_by=str(by) if by is not None else None,
        )


@dataclass(frozen=True)
class DiskInfo:
    """A disk as `datastore ls` shows it; `lease` is None when nobody may write."""

    name: str
    size: int
    allocated: int
    generation: int  # last lease generation handed out (0: never leased)
    lease: Lease | None

    @property
    def holder(self) -> str | None:
        return self.lease.host if self.lease else None

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "allocated": self.allocated,
            "generation": self.generation,
            "lease": self.lease.to_dict() if self.lease else None,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> DiskInfo:
        lease = data.get("lease")
        return DiskInfo(
            name=str(data["name"]),
            size=int(data["size"]),
            allocated=int(data["allocated"]),
            generation=int(data["generation"]),
            lease=Lease.from_dict(lease) if isinstance(lease, dict) else None,
        )
