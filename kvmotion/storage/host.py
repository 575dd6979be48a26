"""A host's side of the datastores: attach VM disks, hold and hand over their write leases."""

from __future__ import annotations

from collections.abc import Mapping

from kvmotion.errors import LeaseError, NotFound
from kvmotion.qemu.spec import DiskSpec, VmSpec
from kvmotion.storage.attach import nbd_blockdev
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


def take_back_leases(spec: VmSpec, from_host: str, to_host: str) -> None:
    """Rollback step: the leases handed to `from_host` (the destination) at switchover return to
    `to_host` (the source) under a new generation. A rollback can come later than the lease TTL
    (a commit retried against a dead agent): a lease that expired meanwhile, unrenewed because the
    shadow never ran, is acquired afresh. A lease that never left the source is re-issued to it
    under a new generation: the switchover's request, if it is still on its way, names the old
    one and is refused. (The source's NBD connections are fenced either way; the rollback gives
    its QEMU new ones.) A lease some other host holds raises LeaseError: the
    source must not resume then."""
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
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
                    # The late switchover request landed in between: the lease is at from_host now.
                    client.transfer(disk.source, from_host, to_host, spec.name)
            else:
                raise refused


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
