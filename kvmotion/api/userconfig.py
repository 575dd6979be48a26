"""The CLI's login config (`kvmotion login` writes it) and what the CLI reads of the cluster through it.

The config (~/.config/kvmotion/config, or $KVMOTION_CONFIG) is one JSON file, mode 0600, holding
the center's URL, its CA, the user's certificate and key. When it exists the CLI is "logged in":
its host inventory and datastore registry are the center's (GET /v1/hosts, GET /v1/datastores),
and it calls agents and datastores with the user's certificate. Without it the CLI has no cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import ssl
from pathlib import Path

from kvmotion.api.center import Credentials, DatastoreView, HostView
from kvmotion.core.errors import NotFound, SetupError

CONFIG_ENV = "KVMOTION_CONFIG"


def config_path() -> Path:
    explicit = os.environ.get(CONFIG_ENV)
    return Path(explicit) if explicit else Path.home() / ".config" / "kvmotion" / "config"


def logged_in() -> bool:
    """A login config exists: the CLI works through the center."""
    return config_path().exists()


def load_credentials(path: Path | None = None) -> Credentials:
    """The Credentials `kvmotion login` saved."""
    where = path or config_path()
    try:
        data = json.loads(where.read_text())
        return Credentials(**{f.name: str(data[f.name]) for f in dataclasses.fields(Credentials)})
    except FileNotFoundError:
        raise NotFound(f"no login config at {where}: run `kvmotion login URL --user NAME` first") from None
    except PermissionError:
        raise SetupError(f"cannot read the login config {where}: it belongs to another user") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SetupError(f"the login config {where} is damaged: run `kvmotion login` again") from None


@functools.lru_cache(maxsize=4)
def _context(path: Path, mtime: float) -> ssl.SSLContext:
    """One context per config file version (a context costs milliseconds of CPU to build)."""
    return load_credentials(path).ssl_context()


def user_ssl_context() -> ssl.SSLContext:
    """The logged-in user's certificate, trusting only the cluster CA: for agents and datastores."""
    path = config_path()
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        raise NotFound(f"no login config at {path}: run `kvmotion login URL --user NAME` first") from None
    return _context(path, mtime)


# The center's hosts and datastores, read once per process: a CLI command is short-lived, and one
# command (e.g. `vm list`) looks them up several times.
@functools.lru_cache(maxsize=1)
def center_hosts() -> tuple[HostView, ...]:
    with load_credentials().client(timeout=15.0) as center:
        return tuple(center.hosts())


@functools.lru_cache(maxsize=1)
def center_datastores() -> tuple[DatastoreView, ...]:
    with load_credentials().client(timeout=15.0) as center:
        return tuple(center.datastores())


def forget() -> None:
    """Drop what was read from the center (after a change made through it, or in tests)."""
    center_hosts.cache_clear()
    center_datastores.cache_clear()
    _context.cache_clear()
