"""QEMU's migration stream as both ends set it up: TLS credentials, multifd and compression settings,
socket tuning. Measured reasons for the figures: bench/README.md, "Stream tuning"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kvmotion.api.identity import Identity, Kind
from kvmotion.api.migration import Compression, StreamCapabilities, StreamSettings
from kvmotion.api.tls import qemu_creds_dir
from kvmotion.core.errors import VmFailed
from kvmotion.host.vms import VmManager
from kvmotion.qemu import confine

log = logging.getLogger("kvmotion.migration")
T = TypeVar("T")

TLS_ID = "kvmotion-tls"
AUTHZ_ID = "kvmotion-authz"  # the destination QEMU's tls-authz: only the source host's QEMU identity
# Parallel connections for pages (QEMU multifd): faster than one on a fast link, never slower.
# QEMU 10.0 refuses multifd together with postcopy-ram.
MULTIFD_CHANNELS = 3
# SO_RCVBUF of the shadow's migration sockets: what they hold when the source stops is loaded after
# the source finished, i.e. in the guest's pause; small enough for that, large enough for throughput.
RECEIVE_BUFFER = 1 << 20
RECEIVE_BUFFER_COMPRESSED = 64 << 10  # compressed, each buffered byte is ~4 bytes still to decompress
# TCP_NOTSENT_LOWAT of the source's migration sockets once the switchover is near: what they hold
# when the vCPUs stop crosses the link in the pause. Only where the link is the bottleneck.
UNSENT_LIMIT = 128 << 10
NEAR_SWITCHOVER = 16 << 20  # bytes QEMU still has to send when the limit may go on (> one tick at 1 Gbit/s)
BACKLOG_WORTH_LIMITING = 1 << 20  # bytes queued in the migration sockets
# Compressed pages fill a slow link's buffers from the first packet: the limit goes on at once.
SOCKETS_OPEN_WAIT = 0.1  # s after `migrate` to find them


def own_capabilities() -> StreamCapabilities:
    """What this agent's QEMU can do for a stream (QEMU 10 multifd; zstd preferred where it helps)."""
    return StreamCapabilities(multifd_channels=MULTIFD_CHANNELS, compression=(Compression.ZSTD, Compression.NONE))


def offer(preferred: Compression) -> StreamCapabilities:
    """The source's offer: its channels, and `preferred` compression first (none after it)."""
    methods = (preferred,) if preferred is Compression.NONE else (preferred, Compression.NONE)
    return StreamCapabilities(multifd_channels=MULTIFD_CHANNELS, compression=methods)


def uses_multifd(postcopy: bool, settings: StreamSettings) -> bool:
    return not postcopy and settings.multifd_channels > 0


def capabilities(postcopy: bool, settings: StreamSettings, pause: bool | None = None) -> list[dict[str, object]]:
    """migrate-set-capabilities: multifd as agreed unless post-copy may be used; on the source also
    whether QEMU pauses before the switchover."""
    caps: dict[str, bool] = {"events": True, "postcopy-ram": postcopy, "multifd": uses_multifd(postcopy, settings)}
    if pause is not None:
        caps = {"pause-before-switchover": pause, **caps}
    return [{"capability": k, "state": v} for k, v in caps.items()]


def multifd_params(settings: StreamSettings) -> dict[str, object]:
    """The multifd parameters both ends must set alike."""
    return {"multifd-channels": max(settings.multifd_channels, 1), "multifd-compression": settings.compression.value}


def stream_connections(postcopy: bool, settings: StreamSettings) -> int:
    """TCP connections QEMU opens for one migration stream (the main one, then multifd's)."""
    return settings.multifd_channels + 1 if uses_multifd(postcopy, settings) else 1


async def add_stream_tls(qmp: Any, host: str, endpoint: str, peer: str | None = None,
                         user: confine.QemuUser | None = None) -> dict[str, str]:
    """Give a QEMU of `host` its TLS credentials for a migration stream (the folder of its qemu:HOST
    identity, never the agent's key) and return the migration parameters that use them. A server
    (the destination) also gets a tls-authz that admits only `peer`'s QEMUs: the cluster CA signs
    every host's certificates, so the CA check alone would admit any host, or a host's agent
    identity. A client (the source) checks that the server's certificate names `peer` (the
    destination host; its QEMU certificate's SAN holds the host name and addresses). With `user`
    (QEMU runs unprivileged) the files are checked first: QEMU's own "Error while reading file"
    would not say why."""
    creds = qemu_creds_dir(host)
    if user is not None:
        fix = (f"join {host} again (`kvmotion host join --force`) now that the user exists, "
               f"or chgrp {confine.QEMU_USER} and chmod 0640 the key")
        for name in ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem"):
            confine.check_readable(creds / name, user, fix)
    for qom_id in (TLS_ID, AUTHZ_ID):
        try:
            await qmp.execute("object-del", id=qom_id)
        except VmFailed:
            pass  # none yet (this QEMU's first migration)
    await qmp.execute("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_ID, "endpoint": endpoint,
                                        "dir": str(creds), "verify-peer": True})
    if endpoint == "client":
        return {"tls-creds": TLS_ID, "tls-hostname": peer or "", "tls-authz": ""}
    if peer is None:
        raise ValueError("a migration stream's server admits one peer: name it")
    await qmp.execute("object-add", **{"qom-type": "authz-simple", "id": AUTHZ_ID,
                                        "identity": Identity(Kind.QEMU, peer).tls_dn()})
    return {"tls-creds": TLS_ID, "tls-authz": AUTHZ_ID}


async def on_qemu_sockets(manager: VmManager, vm: str, action: Callable[..., T], *args: object) -> T | None:
    """Run a kvmotion.qemu.sockets action on the VM's QEMU; None (logged) when it could not be
    done: only the pause's length is at stake, never the migration."""
    pid = manager.status(vm).pid
    try:
        if pid is None:
            raise OSError("no QEMU process")
        return await asyncio.to_thread(action, pid, *args)
    except (OSError, ValueError) as exc:
        log.warning("VM %s: %s on its QEMU's migration sockets failed: %s", vm, action.__name__, exc)
        return None


async def on_stream_sockets(manager: VmManager, vm: str, uri: str, action: Callable[..., T], *args: object) -> T | None:
    """A kvmotion.qemu.sockets action on the source QEMU's sockets to the migration's URI."""
    host, _, port = uri.removeprefix("tcp:").rpartition(":")
    return await on_qemu_sockets(manager, vm, action, host.strip("[]"), int(port), *args)
