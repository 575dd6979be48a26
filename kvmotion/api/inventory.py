"""The cluster inventory: which host agents exist and where their APIs listen. The center keeps it:
in an agent joined to the center (kvmotion.api.joined) it is the center's last word from the agent's
cache; in a CLI logged in to a center (kvmotion.api.userconfig), asked at GET /v1/hosts."""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.api import joined, userconfig
from kvmotion.core.errors import NotFound, SetupError


@dataclass(frozen=True)
class HostEntry:
    name: str
    url: str


def not_in_a_cluster() -> SetupError:
    return SetupError(f"not logged in to a center (no {userconfig.config_path()}): run `kvmotion login URL --user NAME`")


class Inventory:
    def hosts(self) -> list[HostEntry]:
        root = joined.active()
        if root is not None:
            return sorted((HostEntry(name=h.name, url=h.agent_url) for h in root.cache().hosts), key=lambda h: h.name)
        if userconfig.logged_in():
            return sorted((HostEntry(name=h.name, url=h.agent_url) for h in userconfig.center_hosts()), key=lambda h: h.name)
        raise not_in_a_cluster()

    def host(self, name: str) -> HostEntry:
        hosts = self.hosts()
        for h in hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in hosts) or "none"
        raise NotFound(f"no host named {name} in the cluster (known: {known}); hosts join with `kvmotion host join`")
