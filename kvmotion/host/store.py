"""Persistent VM definitions of one host: one JSON file per VM, written atomically.

Plain files rather than a database: a crashed agent re-reads them on start, and an operator can
read them too. Runtime facts (pid) are not stored here: the QEMU pid file is the truth.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.spec import VmSpec
from kvmotion.core.errors import Conflict, InvalidInput, NotFound
from kvmotion.core.files import write_atomic

log = logging.getLogger("kvmotion.agent")


@dataclass(frozen=True)
class VmRecord:
    spec: VmSpec
    created_at: float
    # Set on a shadow VM created for an incoming migration until the migration commits.
    incoming_migration: str | None = None
    # The migration that brought the VM here and when it resumed (answers a retried commit).
    committed_migration: str | None = None
    resumed_at: float | None = None

    def to_json(self) -> dict:
        return {
            "spec": self.spec.to_json(), "created_at": self.created_at, "incoming_migration": self.incoming_migration,
            "committed_migration": self.committed_migration, "resumed_at": self.resumed_at,
        }

    @staticmethod
    def from_json(data: dict) -> VmRecord:
        return VmRecord(
            spec=VmSpec.from_json(data["spec"]),
            created_at=float(data["created_at"]),
            incoming_migration=data.get("incoming_migration"),
            committed_migration=data.get("committed_migration"),
            resumed_at=data.get("resumed_at"),
        )


class VmStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "vms"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def add(self, record: VmRecord) -> None:
        if self._path(record.spec.name).exists():
            raise Conflict(f"VM {record.spec.name} already exists on this host")
        self.put(record)

    def put(self, record: VmRecord) -> None:
        write_atomic(self._path(record.spec.name), json.dumps(record.to_json(), indent=1, sort_keys=True))

    def get(self, name: str) -> VmRecord:
        try:
            return VmRecord.from_json(json.loads(self._path(name).read_text()))
        except FileNotFoundError:
            raise NotFound(f"no VM named {name} on this host") from None

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def all(self) -> list[VmRecord]:
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                out.append(VmRecord.from_json(json.loads(p.read_text())))
            except (OSError, ValueError, KeyError):
                continue  # a foreign or damaged file is not a VM; leave it for the operator
            except InvalidInput as exc:
                # A spec this version refuses (e.g. a local disk outside the disk folder): not run,
                # left for the operator to fix or delete.
                log.warning("ignoring VM definition %s: %s", p, exc)
        return out
