"""A host's side of the datastores: attach VM disks, hold and hand over their write leases."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from kvmotion.errors import LeaseError, NotFound
from kvmotion.qemu.spec import DiskSpec, VmSpec
from kvmotion.storage.attach import export_name, nbd_blockdev, reattach_commands
from kvmotion.storage.client import DatastoreClient
from kvmotion.storage.registry import Registry


def _client(datastore: str) -> DatastoreClient:
    return DatastoreClient(Registry().get(datastore).control_url)


def _datastore_disks(spec: VmSpec) -> list[DiskSpec]:
    return [d for d in spec.disks if d.datastore is not None]


def check_disk(disk: DiskSpec) -> None:
    """The disk exists on its datastore (raises NotFound / Unreachable with the reason)."""
    assert disk.datastore is not None
    with _client(disk.datastore) as client:
        client.disk(disk.source)


def blockdev_for(disk: DiskSpec, host: str, node_name: str) -> dict:
    assert disk.datastore is not None
    return nbd_blockdev(Registry().get(disk.datastore).nbd_url, disk.source, host, node_name)


def acquire_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            client.acquire(disk.source, host, spec.name)


def renew_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            client.renew(disk.source, host)


def release_leases(spec: VmSpec, host: str) -> None:
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            client.release(disk.source, host)


def lease_generations(spec: VmSpec, host: str) -> dict[str, int]:
    """The generation of each datastore disk's lease that `host` holds now (disk source -> generation)."""
    held: dict[str, int] = {}
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            lease = client.disk(disk.source).lease
        if lease is not None and lease.host == host:
            held[disk.source] = lease.generation
    return held


def transfer_leases(spec: VmSpec, from_host: str, to_host: str, generations: Mapping[str, int] | None = None) -> None:
    """Switchover step: the destination becomes the only writer, under a new generation. With
    `generations` (lease_generations before pre-copy) each move is conditional on it, so a request
    delayed past its timeout (TCP retransmitting through a flapping link, a stalled datastore)
    until after the rollback took the lease back moves nothing."""
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
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
    destination that never got the whole VM cannot run it)."""
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            refused: LeaseError | None = None
            if from_host is not None:
                try:
                    client.transfer(disk.source, from_host, to_host, spec.name)
                    continue
                except LeaseError as exc:
                    refused = exc
            held = client.disk(disk.source).lease
            if held is None:
                client.acquire(disk.source, to_host, spec.name)
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
    async def execute(self, cmd: str, **arguments: object) -> object: ...


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


def reachable_datastores() -> list[str]:
    out = []
    try:
        refs = Registry().all()
    except NotFound:
        return []
    for ref in refs:
        with DatastoreClient(ref.control_url, timeout=2) as client:
            if client.reachable():
                out.append(ref.name)
    return out
