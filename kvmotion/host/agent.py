"""Running the host agent: bind, recover VMs, serve the API until signalled."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from kvmotion.core import paths
from kvmotion.api.serving import Limits, Security, insecure_warning, make_server
from kvmotion.cluster.inventory import HostEntry, Inventory
from kvmotion.core.errors import InvalidInput, Unreachable
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
from kvmotion.qemu import accel as accel_mod
from kvmotion.storage.address import is_wildcard


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


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unreachable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    return sock


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
    choice = accel_mod.choose(accel)
    accel_mod.say_once(choice)
    config = HostConfig(
        name=name,
        state_dir=state_dir or paths.state_dir() / "hosts" / name,
        run_dir=run_dir or paths.run_dir() / "hosts" / name,
        portgroups=parse_portgroups(portgroups or ["vm-net"]),
        accel=choice,
    )
    from kvmotion.cluster.tls import host_tls_files, set_own_host
    from kvmotion.host.routers import routers  # migration & storage endpoints plug in here

    set_own_host(name)
    security = Security(tls_files=None if insecure else host_tls_files(name), audit_log=config.state_dir / "audit.log",
                        limits=limits or Limits(), insecure=insecure)
    if insecure:
        print(insecure_warning(f"host agent {name} on {listen}"), file=sys.stderr, flush=True)
    app = create_app(config, extra_routers=routers(host, migration_limit))
    server = make_server(app, security, f"agent {name}", lifespan="on")
    sock = bind(host, port)
    scheme = "http" if insecure else "https"
    if register:
        shown = f"[{host}]" if ":" in host else host
        Inventory().add(HostEntry(name=name, url=f"{scheme}://{shown}:{port}"))
    asyncio.run(server.serve(sockets=[sock]))
