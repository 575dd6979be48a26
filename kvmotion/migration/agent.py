"""The host agent process of a host joined to the center (kvmotion.api.joined): the VM API of
kvmotion.host with the migration routes mounted, served from the host's own state root until
signalled, heartbeating to the center.

It lives at the migration level, the lowest that sees both packages: host knows nothing of
migrations, and the migration routes need the host's VM manager.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial
from pathlib import Path

from kvmotion.api import joined
from kvmotion.api.address import is_wildcard
from kvmotion.api.center import ClusterSettings
from kvmotion.api.metrics import new_registry
from kvmotion.api.serving import Limits, Security, insecure_warning, make_server
from kvmotion.api.tls import host_tls_files, set_own_host
from kvmotion.core import paths
from kvmotion.core.errors import InvalidInput
from kvmotion.core.listen import listening_socket
from kvmotion.guest import image as guest_image
from kvmotion.host.api import create_app
from kvmotion.host.heartbeat import Heartbeats
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.migration.api import migration_router
from kvmotion.migration.engine import MigrationService
from kvmotion.qemu import accel as accel_mod


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"invalid listen address {text!r}: use ADDRESS:PORT, e.g. 127.0.0.1:7701")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_portgroups(items: list[str]) -> dict[str, str]:
    """['vm-net=br0', 'storage'] -> {'vm-net': 'br0', 'storage': 'kv-storage'}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, bridge = item.partition("=")
        if not name:
            raise InvalidInput(f"invalid port group {item!r}: use NAME[=BRIDGE]")
        bridge = bridge if sep else f"kv-{name}"[:15]
        if not 0 < len(bridge) <= 15:
            raise InvalidInput(f"invalid bridge name {bridge!r} for port group {name}: 1-15 characters")
        out[name] = bridge
    return out


def serve_joined(
    root: joined.StateRoot,
    listen: str | None,
    portgroups: list[str],
    run_dir: Path | None = None,
    accel: str | None = None,
    migration_limit: int = 4,
    limits: Limits | None = None,
    insecure: bool = False,
) -> None:
    """Serve a host joined to the center: mutual TLS with the certificate of the join, the cluster's
    inventory, datastores and settings from the center (cached in `root`), heartbeats to the center.
    `insecure` (for a host of an --insecure center, whose peers dial http://): plain HTTP, a warning."""
    config_file = root.config()
    name = config_file.name
    host, port = parse_listen(listen or config_file.listen)
    if not 1 <= migration_limit <= 64:
        raise InvalidInput(f"invalid migration limit {migration_limit}: use 1 to 64")
    if not root.cache_path.exists():  # removed: the first heartbeat fetches it again; until then, defaults
        root.save_cache(joined.ClusterCache(settings=ClusterSettings(), updated=0.0))
    root.cache()  # a damaged cache: said now, not at the first lookup
    joined.activate(root)
    choice = accel_mod.choose(guest_image.ensure_image, accel)
    accel_mod.say_once(choice)
    config = HostConfig(
        name=name,
        state_dir=root.path,
        run_dir=run_dir or paths.run_dir() / "hosts" / name,
        portgroups=parse_portgroups(portgroups or ["vm-net"]),
        accel=choice,
    )
    set_own_host(name)
    security = Security(tls_files=None if insecure else host_tls_files(name), audit_log=root.path / "audit.log",
                        limits=limits or Limits(), insecure=insecure)
    if insecure:
        print(insecure_warning(f"host agent {name} on {listen or config_file.listen}"), file=sys.stderr, flush=True)
    # The migration address is the joined one unless --listen says otherwise: peers learn it from the center.
    services: list[MigrationService] = []
    registry = new_registry()  # /metrics: the host's collector and the migration service's

    migrations = partial(migration_router, listen_ip=host if not is_wildcard(host) else config_file.address,
                         limit=migration_limit, keep=services.append, registry=registry)

    async def heartbeats(manager: VmManager, stop: asyncio.Event) -> None:
        await Heartbeats(root, manager.list, lambda: [m for svc in services for m in svc.active_migrations()],
                         portgroups=lambda: config.portgroups, dirty_rates=manager.dirty_rates).run(stop)

    app = create_app(config, extra_routers=(migrations,), background=(heartbeats,), registry=registry)
    server = make_server(app, security, f"agent {name}", lifespan="on")
    sock = listening_socket(host, port, "the host agent")
    print(f"kvmotion host agent {name} serving {'http' if insecure else 'https'}://{config_file.listen if listen is None else listen}, "
          f"joined to {config_file.center}", file=sys.stderr, flush=True)
    asyncio.run(server.serve(sockets=[sock]))
