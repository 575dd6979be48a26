"""What a host agent asks of the storage layer for a VM's datastore disks (DiskSpec.datastore set)."""

from __future__ import annotations

import math

from kvmotion.errors import KvmotionError, NotFound
from kvmotion.qemu.spec import DiskSpec, VmSpec
from kvmotion.storage.attach import nbd_blockdev
from kvmotion.storage.client import DatastoreClient
from kvmotion.storage.lease import Lease
from kvmotion.storage.registry import Registry


def client_for(datastore: str, registry: Registry | None = None) -> DatastoreClient:
    return DatastoreClient((registry or Registry()).get(datastore).control_url)


def check_disk(disk: DiskSpec, registry: Registry | None = None) -> None:
    """The disk exists on its datastore; a missing disk with a size (ds1/web1.img:2G) is created."""
    assert disk.datastore is not None
    with client_for(disk.datastore, registry) as client:
        try:
            client.disk(disk.source)
        except NotFound:
            if not disk.size:
                raise NotFound(
                    f"no disk {disk.source} on datastore {disk.datastore}: create it with "
                    f"`kvmotion disk create {disk.datastore}/{disk.source} SIZE`"
                ) from None
            client.create_disk(disk.source, disk.size)


def blockdev_for(disk: DiskSpec, host: str, node_name: str, registry: Registry | None = None) -> dict[str, object]:
    """QEMU -blockdev options (NBD protocol node) for a datastore disk opened from `host`."""
    assert disk.datastore is not None
    ref = (registry or Registry()).get(disk.datastore)
    with DatastoreClient(ref.control_url) as client:
        ttl = client.info().lease_ttl
    return nbd_blockdev(ref.nbd_url, disk.source, host, node_name, reconnect_delay=max(1, math.ceil(ttl)))


def acquire_leases(spec: VmSpec, host: str, registry: Registry | None = None) -> list[Lease]:
    """Write leases on all of the VM's datastore disks, or none (partial grants are released)."""
    got: list[tuple[str, Lease]] = []
    try:
        for disk in spec.disks:
            if disk.datastore is not None:
                with client_for(disk.datastore, registry) as client:
                    got.append((disk.datastore, client.acquire(disk.source, host, spec.name)))
    except KvmotionError:
        for datastore, lease in got:
            try:
                with client_for(datastore, registry) as client:
                    client.release(lease.disk, host)
            except KvmotionError:
                pass  # it expires by itself; the original error is the one to report
        raise
    return [lease for _, lease in got]


def release_leases(spec: VmSpec, host: str, registry: Registry | None = None) -> None:
    """Give up the VM's leases (after QEMU has exited and flushed)."""
    for disk in spec.disks:
        if disk.datastore is not None:
            with client_for(disk.datastore, registry) as client:
                client.release(disk.source, host)

