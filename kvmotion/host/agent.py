"""Running the host agent: bind, recover VMs, serve the API until signalled."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import uvicorn

from kvmotion import paths
from kvmotion.cluster.inventory import HostEntry, Inventory
from kvmotion.errors import InvalidInput, Unreachable
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
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
    tls: ssl.SSLContext | None = None,
    tls_files: tuple[Path, Path, Path] | None = None,
    register: bool = True,
    migration_limit: int = 4,
) -> None:
    host, port = parse_listen(listen)
    choice = accel_mod.choose(accel)
    accel_mod.say_once(choice)
    config = HostConfig(
        name=name,
        state_dir=state_dir or paths.state_dir() / "hosts" / name,
        run_dir=run_dir or paths.run_dir() / "hosts" / name,
        portgroups=parse_portgroups(portgroups or ["vm-net"]),
        accel=choice,
    )
    from kvmotion.cluster.tls import set_own_host
    from kvmotion.host.routers import routers  # migration & storage endpoints plug in here

    set_own_host(name)

    app = create_app(config, extra_routers=routers(host, migration_limit))
    sock = bind(host, port)
    scheme = "https" if tls_files else "http"
    if register:
        shown = f"[{host}]" if ":" in host else host
        Inventory().add(HostEntry(name=name, url=f"{scheme}://{shown}:{port}"))
    kwargs = {}
    if tls_files:
        cert, key, ca = tls_files
        kwargs = dict(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **kwargs))
    asyncio.run(server.serve(sockets=[sock]))
