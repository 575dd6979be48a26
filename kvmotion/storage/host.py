"""A host's side of the datastores: attach VM disks, hold and hand over their write leases.

Every call to a datastore goes as this host (its certificate, host:HOST, over TLS), through one
client per datastore and host kept for the agent's life: lease renewals every few seconds keep its
connection open, so the switchover's transfer pays no TLS handshake inside the guest's pause.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kvmotion.api.datastore import DatastoreClient, client_for
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.api.spec import DiskSpec, VmSpec
from kvmotion.api.tls import host_ssl_context, qemu_creds_dir
from kvmotion.core.errors import KvmotionError, LeaseError, NotFound
from kvmotion.storage.attach import export_name, nbd_blockdev, nbd_tls_object, reattach_commands

_clients: dict[tuple[DatastoreRef, str, int], DatastoreClient] = {}
_clients_lock = threading.Lock()


def _client_of(ref: DatastoreRef, host: str, timeout: float = 10.0) -> DatastoreClient:
    """The kept client of `ref` for `host` (a new one when the address or the host's certificate changed)."""
    ctx_id = 0
    if ref.tls:
        ctx_id = id(host_ssl_context(host))  # cached per certificate file: a re-issued one gives a new context
    key = (ref, host, ctx_id)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = client_for(ref, host, timeout)
        return client


def _client(datastore: str, host: str) -> DatastoreClient:
    return _client_of(Registry().get(datastore), host)


def _datastore_disks(spec: VmSpec) -> list[DiskSpec]:
    return [d for d in spec.disks if d.datastore is not None]


def check_disk(disk: DiskSpec, host: str) -> None:
    """The disk exists on its datastore (raises NotFound / Unreachable with the reason)."""
    assert disk.datastore is not None
    _client(disk.datastore, host).disk(disk.source)


def blockdev_for(disk: DiskSpec, host: str, node_name: str) -> dict:
    assert disk.datastore is not None
    return nbd_blockdev(Registry().get(disk.datastore).nbd_url, disk.source, host, node_name)


def qemu_objects(spec: VmSpec, host: str) -> tuple[dict, ...]:
    """The `-object`s a VM's QEMU needs for its datastore disks: the NBD TLS credentials (the
    host's QEMU identity) when one of them is on a TLS datastore. On the command line, so a
    reattach (blockdev-add) after a rolled-back migration finds them too."""
    refs = {Registry().get(d.datastore) for d in _datastore_disks(spec)}  # type: ignore[arg-type]
    if not any(ref.tls for ref in refs):
        return ()
    return (nbd_tls_object(Path(qemu_creds_dir(host))),)


def acquire_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        _client(disk.datastore, host).acquire(disk.source, spec.name)  # type: ignore[arg-type]


def renew_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        _client(disk.datastore, host).renew(disk.source)  # type: ignore[arg-type]


def release_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        _client(disk.datastore, host).release(disk.source)  # type: ignore[arg-type]


def lease_generations(spec: VmSpec, host: str) -> dict[str, int]:
    """The generation of each datastore disk's lease that `host` holds now (disk source -> generation)."""
    held: dict[str, int] = {}
    for disk in _datastore_disks(spec):
        lease = _client(disk.datastore, host).disk(disk.source).lease  # type: ignore[arg-type]
        if lease is not None and lease.host == host:
            held[disk.source] = lease.generation
    return held


def transfer_leases(spec: VmSpec, from_host: str, to_host: str, generations: Mapping[str, int] | None = None) -> None:
    """Switchover step: the destination becomes the only writer, under a new generation. With
    `generations` (lease_generations before pre-copy) each move is conditional on it, so a request
    delayed past its timeout (TCP retransmitting through a flapping link, a stalled datastore)
    until after the rollback took the lease back moves nothing. Sent as `from_host`, the holder."""
    for disk in _datastore_disks(spec):
        client = _client(disk.datastore, from_host)  # type: ignore[arg-type]
        client.transfer(disk.source, from_host, to_host, spec.name, (generations or {}).get(disk.source))


def take_back_leases(spec: VmSpec, from_host: str | None, to_host: str) -> None:
    """Rollback step: the leases handed to `from_host` (the destination) at switchover return to
    `to_host` (the source) under a new generation. A rollback can come later than the lease TTL
    (a commit retried against a dead agent): a lease that expired meanwhile, unrenewed because the
    shadow never ran, is acquired afresh. A lease that never left the source is re-issued to it
    under a new generation: the switchover's request, if it is still on its way, names the old
    one and is refused. (The source's NBD connections are fenced either way; the rollback gives
    its QEMU new ones.) A lease some other host holds raises LeaseError: the source must not
    resume then. `from_host` None takes it from whichever host holds it: for an agent restarted
    in the middle of a migration it cancelled (it does not know where its hand-over went, and a
    destination that never got the whole VM cannot run it).

    Every request goes as `to_host`: the datastore lets it take back only a lease it handed over
    itself, from a holder that has not renewed it since (a destination renews once it runs the
    VM); a lease another host acquired afresh after it expired is not taken (LeaseError)."""
    for disk in _datastore_disks(spec):
        client = _client(disk.datastore, to_host)  # type: ignore[arg-type]
        refused: LeaseError | None = None
        if from_host is not None:
            try:
                client.transfer(disk.source, from_host, to_host, spec.name)
                continue
            except LeaseError as exc:
                refused = exc
        held = client.disk(disk.source).lease
        if held is None:
            client.acquire(disk.source, spec.name)
        elif held.host == to_host:
            try:
                client.transfer(disk.source, to_host, to_host, spec.name, held.generation)
            except LeaseError:
                # The late switchover request landed in between: the lease is at its destination now.
                moved = client.disk(disk.source).lease
                client.transfer(disk.source, from_host or (moved.host if moved else ""), to_host, spec.name)
        elif from_host is None:
            client.transfer(disk.source, held.host, to_host, spec.name, held.generation)
        else:
            assert refused is not None
            raise refused


class QmpExecutor(Protocol):
    async def execute(self, command: str, /, **arguments: Any) -> object: ...


async def reattach_disks(spec: VmSpec, host: str, qmp: QmpExecutor, proto_nodes: list[str], tag: str) -> None:
    """Give a QEMU on `host` a new NBD connection for each datastore disk, under the format node
    "disk<i>", once its lease came back under a new generation (its old connections stay fenced).
    `proto_nodes` (each disk's current NBD node) is updated; `tag` makes the new names unique."""
    for i, disk in enumerate(spec.disks):
        if disk.datastore is None:
            continue
        new = f"disk{i}-{tag}"
        fmt = {"driver": "raw", "node-name": f"disk{i}", "file": proto_nodes[i]}
        url = Registry().get(disk.datastore).nbd_url
        for cmd in reattach_commands(url, disk.source, host, fmt, new):
            await qmp.execute(cmd.name, **cmd.arguments)
        proto_nodes[i] = new


def current_proto_nodes(spec: VmSpec, host: str, block_nodes: list[dict], proto_nodes: list[str]) -> list[str]:
    """Each datastore disk's NBD node in a running QEMU (`query-named-block-nodes`, flat), found
    by its export: after a rolled-back migration it is not the command line's any more, and an
    agent that restarted cannot remember it. Other disks keep their entry of `proto_nodes`."""
    out = list(proto_nodes)
    for i, disk in enumerate(spec.disks):
        if disk.datastore is None:
            continue
        export = export_name(disk.source, host)
        found = [str(n["node-name"]) for n in block_nodes
                 if n.get("drv") == "nbd" and str(n.get("file", "")).endswith(export)]
        if len(found) == 1:
            out[i] = found[0]
    return out


def reachable_datastores(host: str) -> list[str]:
    """The registry's datastores that answer this host (as host:HOST over TLS)."""
    out = []
    try:
        refs = Registry().all()
    except NotFound:
        return []
    for ref in refs:
        try:
            with client_for(ref, host, timeout=2) as client:
                if client.reachable():
                    out.append(ref.name)
        except KvmotionError:  # no certificate for this host: it reaches none over TLS
            continue
    return out
