"""The cluster inventory: which host agents exist and where their APIs listen.

A JSON file in the cluster folder (KVMOTION_CLUSTER_DIR, default <state>/cluster). Agents register
themselves when they start; `kvmotion host add/remove` edit it by hand for remote hosts. In an agent
joined to the center (kvmotion.api.joined) the hosts are the center's, from the agent's cache; in a
CLI logged in to a center (kvmotion.api.userconfig), the center's, asked at GET /v1/hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api import joined, userconfig
from kvmotion.core import paths
from kvmotion.core.errors import Conflict, InvalidInput, NotFound
from kvmotion.core.files import write_atomic


def cluster_dir() -> Path:
    env = os.environ.get("KVMOTION_CLUSTER_DIR")
    return Path(env) if env else paths.state_dir() / "cluster"


@dataclass(frozen=True)
class HostEntry:
    name: str
    url: str


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Inventory:
    def __init__(self, folder: Path | None = None) -> None:
        self.joined = joined.active() if folder is None else None
        self.center = folder is None and self.joined is None and userconfig.logged_in()
        self.folder = folder or cluster_dir()
        self.path = self.folder / "hosts.json"

    def _not_joined(self) -> None:
        if self.joined is not None:
            raise Conflict(f"this host is joined to the center {self.joined.config().center}: the center keeps the "
                           "inventory (`kvmotion host join` on the host itself)")
        if self.center:
            raise Conflict(f"logged in to a center ({userconfig.config_path()}): the center keeps the inventory "
                           "(hosts join it with `kvmotion host join`)")

    def hosts(self) -> list[HostEntry]:
        if self.joined is not None:
            return sorted((HostEntry(name=h.name, url=h.agent_url) for h in self.joined.cache().hosts), key=lambda h: h.name)
        if self.center:
            return sorted((HostEntry(name=h.name, url=h.agent_url) for h in userconfig.center_hosts()), key=lambda h: h.name)
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise InvalidInput(f"cluster inventory {self.path} is damaged: {exc}") from exc
        return [HostEntry(name=n, url=u) for n, u in sorted(data.items())]

    def host(self, name: str) -> HostEntry:
        for h in self.hosts():
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts()) or "none"
        raise NotFound(f"no host named {name} in the cluster (known: {known}); start its agent or `kvmotion host add`")

    def add(self, entry: HostEntry) -> None:
        self._not_joined()
        with _locked(self.folder):
            data = {h.name: h.url for h in self.hosts()}
            data[entry.name] = entry.url
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))

    def remove(self, name: str) -> None:
        self._not_joined()
        with _locked(self.folder):
            data = {h.name: h.url for h in self.hosts()}
            if data.pop(name, None) is None:
                raise NotFound(f"no host named {name} in the cluster")
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
