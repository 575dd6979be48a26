"""A host's joined state root as `kvmotion host join` and the center's heartbeat answers leave it
(config.json, cache.json, tls/ and tls/qemu/ with certificates of a test CA), made directly for
unit tests of the agent's side: the cluster's hosts, datastores and settings are what the cache says."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from kvmotion.api import joined
from kvmotion.api.center import ClusterSettings, DatastoreView, HostState, HostView
from kvmotion.api.enroll import CONFIG_FILE
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.joined import ClusterCache, JoinedConfig, StateRoot
from kvmotion.api.pki import QEMU_DIR, issue_cert
from kvmotion.core.files import write_atomic
from tests.certs import TestCA


def host_view(name: str, url: str) -> HostView:
    return HostView(name=name, address=urlsplit(url).hostname or "127.0.0.1", agent_url=url,
                    state=HostState.CONNECTED, joined=0.0, last_heartbeat=None, load=None)


def make_root(path: Path, name: str, *, hosts: Mapping[str, str] | None = None,
              datastores: Sequence[DatastoreView] = (), settings: ClusterSettings | None = None,
              ca: TestCA | None = None, qemu_key_gid: int | None = None) -> StateRoot:
    """Host `name`'s root at `path`: peers `hosts` (name -> agent URL), `datastores`, `settings`;
    with `ca`, its host:NAME and qemu:NAME certificates in tls/ and tls/qemu/."""
    root = StateRoot(path)
    path.mkdir(parents=True, exist_ok=True)
    peers = tuple(host_view(n, u) for n, u in sorted((hosts or {}).items()))
    root.save_cache(ClusterCache(settings=settings or ClusterSettings(), hosts=peers, datastores=tuple(datastores),
                                 updated=0.0))
    if ca is not None:
        issue_cert(ca.ca_dir, Identity(Kind.HOST, name), ("127.0.0.1",), root.tls_dir, server=True)
        issue_cert(ca.ca_dir, Identity(Kind.QEMU, name), ("127.0.0.1",), root.tls_dir / QEMU_DIR, server=True,
                   key_gid=qemu_key_gid)
    config = JoinedConfig(center="https://127.0.0.1:7700", name=name, address="127.0.0.1", agent_port=7701, joined=0.0)
    write_atomic(path / CONFIG_FILE, config.model_dump_json(indent=1) + "\n", 0o644)
    return root


def save_cache(root: StateRoot, *, hosts: Mapping[str, str] | None = None, datastores: Sequence[DatastoreView] | None = None,
               settings: ClusterSettings | None = None) -> None:
    """A new word from the center: what is given replaces the cache's hosts, datastores or settings."""
    old = root.cache()
    root.save_cache(ClusterCache(
        settings=settings if settings is not None else old.settings,
        hosts=tuple(host_view(n, u) for n, u in sorted(hosts.items())) if hosts is not None else old.hosts,
        datastores=tuple(datastores) if datastores is not None else old.datastores,
        updated=old.updated + 1))


def datastore_view(name: str, nbd_url: str, control_url: str | None = None) -> DatastoreView:
    from kvmotion.api.registry import DatastoreRef

    ref = DatastoreRef.make(name, nbd_url, control_url)
    return DatastoreView(name=ref.name, nbd_url=ref.nbd_url, control_url=ref.control_url, added=0.0)


@contextmanager
def served(root: StateRoot) -> Iterator[StateRoot]:
    """`root` is the joined root this process serves (as a host agent) within the block."""
    joined.activate(root)
    try:
        yield root
    finally:
        joined.activate(None)


def serve_in_test(monkeypatch, root: StateRoot) -> StateRoot:
    """`root` is the joined root this process serves until the test ends (monkeypatch undoes it)."""
    monkeypatch.setattr(joined, "_active", root)
    monkeypatch.setattr(joined, "_active_name", root.config().name)
    return root
