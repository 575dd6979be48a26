"""Where migrations are written down: the source's records (in memory while they run, one JSON file
each from the prepare phase on) and the destination's note of which host started each incoming one."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from kvmotion.api.migration import MigrationRecord, Phase, record_from_json
from kvmotion.core.errors import Conflict, NotFound
from kvmotion.core.files import write_atomic
from kvmotion.core.jsonio import as_json

log = logging.getLogger("kvmotion.migration")


def as_record_json(rec: MigrationRecord) -> dict:
    return as_json(rec)


class Records:
    """The outgoing migrations of one host: the live ones, and the history on disk."""

    def __init__(self, host: str, folder: Path) -> None:
        self.host = host
        self.folder = folder
        self.live: dict[str, MigrationRecord] = {}

    def __contains__(self, mid: str) -> bool:
        return mid in self.live

    def __getitem__(self, mid: str) -> MigrationRecord:
        return self.live[mid]

    def add(self, rec: MigrationRecord) -> None:
        self.live[rec.id] = rec

    def update(self, mid: str, **changes: Any) -> MigrationRecord:
        rec = dataclasses.replace(self.live[mid], **changes)
        self.live[mid] = rec
        return rec

    def enter(self, mid: str, phase: Phase, at: float | None = None) -> None:
        """Enter `phase`, stamped `at` (wall clock, e.g. a QMP event's time) or now."""
        rec = self.live[mid]
        self.update(mid, phase=phase, phase_times=(*rec.phase_times, (phase.value, at or time.time())))
        log.info("migration %s of %s: %s", mid, rec.vm, phase.value)

    def end(self, mid: str, phase: Phase, **changes: Any) -> MigrationRecord:
        """Enter a terminal `phase` and write the record down."""
        self.enter(mid, phase)
        rec = self.update(mid, ended_at=time.time(), **changes)
        self.persist(rec)
        return rec

    def persist(self, rec: MigrationRecord) -> None:
        write_atomic(self.folder / f"{rec.id}.json", json.dumps(as_record_json(rec), indent=1))

    def persist_live(self, mid: str) -> None:
        self.persist(self.live[mid])

    def running(self) -> int:
        return sum(1 for r in self.live.values() if not r.phase.terminal)

    def running_of(self, vm: str) -> MigrationRecord | None:
        return next((r for r in self.live.values() if r.vm == vm and not r.phase.terminal), None)

    def get(self, mid: str) -> MigrationRecord:
        if mid in self.live:
            return self.live[mid]
        path = self.folder / f"{mid}.json"
        if path.exists():
            return record_from_json(json.loads(path.read_text()))
        raise NotFound(f"no migration {mid} on {self.host}")

    def history(self) -> list[MigrationRecord]:
        """Every record, oldest first."""
        out = {r.id: r for r in self.live.values()}
        if self.folder.exists():
            for p in self.folder.glob("*.json"):
                try:
                    rec = record_from_json(json.loads(p.read_text()))
                except (OSError, ValueError, KeyError):
                    continue
                out.setdefault(rec.id, rec)
        return sorted(out.values(), key=lambda r: r.started_at)


class IncomingSources:
    """Which host started each migration this host receives: only that host may commit or abort it.
    One small file per migration, so that a restarted agent still answers the source's retried
    commit of a VM it had committed (the shadows it had not committed are gone by then)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._known: dict[str, str] = {}

    def _path(self, mid: str) -> Path:
        return self.folder / f"{mid}.json"

    def get(self, mid: str) -> str | None:
        if mid not in self._known:
            try:
                self._known[mid] = str(json.loads(self._path(mid).read_text())["source"])
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("incoming migration %s: unreadable source record: %s", mid, exc)
                return None
        return self._known[mid]

    def remember(self, mid: str, source: str) -> None:
        if self.get(mid) is not None:
            raise Conflict(f"migration {mid} is already known here (from {self._known[mid]}): use a new migration id")
        write_atomic(self._path(mid), json.dumps({"source": source}), 0o600)
        self._known[mid] = source

    def forget(self, mid: str) -> None:
        self._known.pop(mid, None)
        self._path(mid).unlink(missing_ok=True)

    def keep_only(self, mids: set[str]) -> None:
        """Forget every migration not in `mids` (after a restart: the ones whose VM is still here)."""
        for path in self.folder.glob("*.json") if self.folder.exists() else ():
            if path.stem not in mids:
                self.forget(path.stem)
