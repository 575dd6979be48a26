"""The host agent process: the VM API of kvmotion.host with the migration routes mounted, bound,
registered in the inventory and served until signalled.

It lives at the migration level, the lowest that sees both packages: host knows nothing of
migrations, and the migration routes need the host's VM manager.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial
from pathlib import Path

from kvmotion.api.address import is_wildcard
from kvmotion.api.inventory import HostEntry, Inventory
from kvmotion.api.serving import Limits, Security, insecure_warning, make_server
from kvmotion.api.tls import host_tls_files, set_own_host
from kvmotion.core import paths
from kvmotion.core.errors import InvalidInput
from kvmotion.core.listen import listening_socket
from kvmotion.guest import image as guest_image
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
from kvmotion.migration.api import migration_router
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


def serve(
    name: str,
    listen: str,
    portgroups: list[str],
    state_dir: Path | None = None,
    run_dir: Path | None = None,
    accel: str | None = None,
    insecure: bool = False,
    register: bool = True,
    migration_limit: int = 4,
    limits: Limits | None = None,
) -> None:
    """Serve the agent's API: mutual TLS with the host's certificate from the cluster CA, or plain
    HTTP with `insecure` (a warning on every start)."""
    host, port = parse_listen(listen)
    if is_wildcard(host) and register:
        raise InvalidInput(f"cannot register {listen} in the inventory: peers need an address, not {host}; "
                           "listen on the host's own address")
    if not 1 <= migration_limit <= 64:
        raise InvalidInput(f"invalid migration limit {migration_limit}: use 1 to 64")
    choice = accel_mod.choose(guest_image.ensure_image, accel)
    accel_mod.say_once(choice)
    config = HostConfig(
        name=name,
        state_dir=state_dir or paths.state_dir() / "hosts" / name,
        run_dir=run_dir or paths.run_dir() / "hosts" / name,
        portgroups=parse_portgroups(portgroups or ["vm-net"]),
        accel=choice,
    )
    set_own_host(name)
    security = Security(tls_files=None if insecure else host_tls_files(name), audit_log=config.state_dir / "audit.log",
                        limits=limits or Limits(), insecure=insecure)
    if insecure:
        print(insecure_warning(f"host agent {name} on {listen}"), file=sys.stderr, flush=True)
    app = create_app(config, extra_routers=(partial(migration_router, listen_ip=host, limit=migration_limit),))
    server = make_server(app, security, f"agent {name}", lifespan="on")
    sock = listening_socket(host, port, "the host agent")
    scheme = "http" if insecure else "https"
    if register:
        shown = f"[{host}]" if ":" in host else host
        Inventory().add(HostEntry(name=name, url=f"{scheme}://{shown}:{port}"))
    asyncio.run(server.serve(sockets=[sock]))
