"""A host's side of the datastores: attach VM disks, hold and hand over their write leases."""

from __future__ import annotations

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


def transfer_leases(spec: VmSpec, from_host: str, to_host: str) -> None:
    """Switchover step: the destination becomes the only writer, under a new generation."""
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            client.transfer(disk.source, from_host, to_host, spec.name)


def take_back_leases(spec: VmSpec, from_host: str, to_host: str) -> None:
    """Rollback step: the leases handed to `from_host` (the destination) at switchover return to
    `to_host` (the source) under a new generation. A rollback can come later than the lease TTL
    (a commit retried against a dead agent): a lease that expired meanwhile, unrenewed because the
    shadow never ran, is acquired afresh. A lease some other host holds raises LeaseError: the
    source must not resume then."""
    for disk in _datastore_disks(spec):
        with _client(disk.datastore) as client:  # type: ignore[arg-type]
            try:
                client.transfer(disk.source, from_host, to_host, spec.name)
            except LeaseError:
                held = client.disk(disk.source).lease
                if held is None:
                    client.acquire(disk.source, to_host, spec.name)
                elif held.host != to_host:
                    raise
                # else: it never left the source (a handoff that failed before this disk)


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
