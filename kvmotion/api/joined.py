"""A host joined to the center: its own state root, and what the agent keeps of the cluster there.

`kvmotion host join` writes the root (default /var/lib/kvmotion/host, or $KVMOTION_HOST_STATE):

    config.json     the center's URL, the host's name, address and agent port (JoinedConfig)
    tls/            host:NAME, the agent's identity (tls-creds-x509 layout, kvmotion.api.pki)
    tls/qemu/       qemu:NAME, its QEMUs' (key 0640, group kvmotion-qemu when that group exists)
    cache.json      the center's last word on peers, datastores and settings (ClusterCache):
                    the agent works from it while the center is down
    vms/ disks/     VM definitions and local disks (kvmotion.host), audit.log, incoming/, migrations/

A root with config.json is joined. An agent serving one `activate`s it: the cluster inventory,
the datastore registry, the cluster settings and the host's own TLS folder are then read from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import ValidationError

from kvmotion.api.center import (
    ClusterSettings,
    DatastoreView,
    HostAddress,
    HostView,
    Name,
    Port,
    Wire,
)
from kvmotion.api.enroll import CONFIG_FILE, TLS_DIR
from kvmotion.core import paths
from kvmotion.core.errors import SetupError
from kvmotion.core.files import write_atomic

HOST_STATE_ENV = "KVMOTION_HOST_STATE"
CACHE_FILE = "cache.json"
M = TypeVar("M", bound=Wire)
LOCAL_DIRS = ("vms", "disks")  # what the agent fills; made at join so the root is complete from the start


def default_root() -> Path:
    explicit = os.environ.get(HOST_STATE_ENV)
    return Path(explicit) if explicit else paths.state_dir() / "host"


class JoinedConfig(Wire):
    """config.json: who this host is in which cluster."""

    _what: ClassVar[str] = "host config"
    version: int = 1
    center: str  # https://ADDRESS:PORT
    name: Name
    address: HostAddress  # where peers and the center reach the agent (and migration streams arrive)
    agent_port: Port
    joined: float

    @property
    def listen(self) -> str:
        shown = f"[{self.address}]" if ":" in self.address else self.address
        return f"{shown}:{self.agent_port}"


class ClusterCache(Wire):
    """cache.json: what the center last said of the cluster."""

    _what: ClassVar[str] = "cluster cache"
    settings: ClusterSettings
    hosts: tuple[HostView, ...] = ()
    datastores: tuple[DatastoreView, ...] = ()
    updated: float


@dataclass(frozen=True)
class StateRoot:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def cache_path(self) -> Path:
        return self.path / CACHE_FILE

    @property
    def tls_dir(self) -> Path:
        return self.path / TLS_DIR

    def is_joined(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> JoinedConfig:
        return _read(self.config_path, JoinedConfig, "run `kvmotion host join` again with --force")

    def cache(self) -> ClusterCache:
        return _read(self.cache_path, ClusterCache, "remove it: the agent fetches it again from the center")

    def save_cache(self, cache: ClusterCache) -> None:
        write_atomic(self.cache_path, cache.model_dump_json(indent=1) + "\n", 0o644)


def _read(path: Path, model: type[M], fix: str) -> M:
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise SetupError(f"{path} is missing: join the host with `kvmotion host join`") from None
    except PermissionError:
        raise SetupError(f"cannot read {path}: run as root") from None
    except (ValidationError, ValueError) as exc:
        raise SetupError(f"{path} is damaged ({str(exc).splitlines()[0]}): {fix}") from None


# ---- the root this process serves (set by the agent at start) ------------------------------------------
_active: StateRoot | None = None
_active_name: str | None = None


def activate(root: StateRoot | None) -> None:
    """Make `root` the source of the cluster's inventory, datastores and settings, and of the host's
    identity, in this process (None: none; a process serving no joined root has no cluster)."""
    global _active, _active_name
    _active_name = root.config().name if root is not None else None
    _active = root


def active() -> StateRoot | None:
    return _active


def active_name() -> str | None:
    """The name of the host whose root is active (read once, at activate)."""
    return _active_name
