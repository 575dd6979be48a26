"""storage.host.take_back_leases (the rollback step) against a real Datastore with a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmotion.api.disks import DiskInfo, Lease
from kvmotion.api.spec import DiskSpec, VmSpec
from kvmotion.core.errors import LeaseError
from kvmotion.storage import host as storage_host
from kvmotion.storage.datastore import Datastore

TTL = 15.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


class LocalClient:
    """What host.py asks of a DatastoreClient acting for `host`, served by a Datastore in this process."""

    def __init__(self, ds: Datastore, host: str) -> None:
        self.ds = ds
        self.host = host

    def transfer(self, disk: str, from_host: str, to_host: str, vm: str, generation: int | None = None) -> Lease:
        return self.ds.transfer(disk, from_host, to_host, vm, generation, by=self.host)

    def acquire(self, disk: str, vm: str) -> Lease:
        return self.ds.acquire(disk, self.host, vm)

    def disk(self, disk: str) -> DiskInfo:
        return self.ds.disk(disk)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ds(tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Datastore:
    d = Datastore("ds1", tmp_path, TTL, clock)
    d.create_disk("web1.img", 1 << 20)
    monkeypatch.setattr(storage_host, "_client", lambda name, host: LocalClient(d, host))
    return d


# The rollback knows the destination; an agent restarted mid-migration does not (None).
FROM_HOSTS = pytest.mark.parametrize("from_host", ["host-b", None])

SPEC = VmSpec(name="web1", memory=256 << 20, disks=(DiskSpec(source="web1.img", datastore="ds1"),))


@FROM_HOSTS
def test_lease_still_live_at_the_destination_is_transferred_back(ds: Datastore, from_host: str | None) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    storage_host.take_back_leases(SPEC, from_host, "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


@FROM_HOSTS
def test_lease_that_expired_at_the_destination_is_acquired_afresh(ds: Datastore, clock: FakeClock,
                                                                  from_host: str | None) -> None:
    """A rollback after a commit retried for longer than the TTL: nobody renewed the lease."""
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    storage_host.take_back_leases(SPEC, from_host, "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


@FROM_HOSTS
def test_lease_that_never_left_the_source_is_reissued_to_it(ds: Datastore, from_host: str | None) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.take_back_leases(SPEC, from_host, "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 2)


@FROM_HOSTS
def test_a_switchover_request_arriving_after_the_take_back_moves_nothing(ds: Datastore, from_host: str | None) -> None:
    """A datastore stalled past the source's timeout: the rollback takes the lease back first,
    then the stalled switchover request is served."""
    ds.acquire("web1.img", "host-a", "web1")
    held = storage_host.lease_generations(SPEC, "host-a")
    assert held == {"web1.img": 1}
    storage_host.take_back_leases(SPEC, from_host, "host-a")  # the hand-over timed out: roll back
    with pytest.raises(LeaseError, match="generation 2 now, not 1"):
        storage_host.transfer_leases(SPEC, "host-a", "host-b", held)  # ... and then it arrives
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 2)


@FROM_HOSTS
def test_a_switchover_request_landing_during_the_take_back_is_undone(ds: Datastore, monkeypatch,
                                                                    from_host: str | None) -> None:
    """The late request is served between the take-back's first refusal and its re-issue."""
    ds.acquire("web1.img", "host-a", "web1")
    held = storage_host.lease_generations(SPEC, "host-a")
    real = Datastore.disk
    late: list[Lease] = []

    def disk_then_late_transfer(self: Datastore, name: str):
        info = real(self, name)
        if not late:  # the take-back has just read the lease: the stalled request lands now
            late.append(self.transfer(name, "host-a", "host-b", "web1", held["web1.img"], by="host-a"))
        return info

    monkeypatch.setattr(Datastore, "disk", disk_then_late_transfer)
    storage_host.take_back_leases(SPEC, from_host, "host-a")
    monkeypatch.setattr(Datastore, "disk", real)
    assert [(x.host, x.generation) for x in late] == [("host-b", 2)]
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


def test_lease_another_host_took_is_not_taken_back(ds: Datastore, clock: FakeClock) -> None:
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    ds.acquire("web1.img", "host-c", "web1")
    with pytest.raises(LeaseError):
        storage_host.take_back_leases(SPEC, "host-b", "host-a")
    assert ds.disk("web1.img").holder == "host-c"


def test_a_restarted_source_takes_the_lease_back_from_where_it_handed_it(ds: Datastore) -> None:
    """Its migration was cancelled before the stream ended; it does not know how far the hand-over
    got, so it takes the lease from whichever host it handed it to."""
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    storage_host.take_back_leases(SPEC, None, "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-a", 3)


def test_a_restarted_source_does_not_take_a_lease_another_host_acquired(ds: Datastore, clock: FakeClock) -> None:
    """host-c acquired the lease afresh once it expired: host-a handed nothing to host-c, so it may
    not take it (a host cannot move another host's lease); its VM stays paused."""
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    clock.t += TTL + 5
    ds.acquire("web1.img", "host-c", "web1")
    with pytest.raises(LeaseError, match="host-a did not hand it over"):
        storage_host.take_back_leases(SPEC, None, "host-a")
    lease = ds.disk("web1.img").lease
    assert lease is not None and (lease.host, lease.generation) == ("host-c", 3)


def test_no_take_back_once_the_destination_renewed(ds: Datastore) -> None:
    """The destination renews only once it runs the VM (after commit): the source must not resume."""
    ds.acquire("web1.img", "host-a", "web1")
    storage_host.transfer_leases(SPEC, "host-a", "host-b")
    ds.renew("web1.img", "host-b")
    for from_host in ("host-b", None):
        with pytest.raises(LeaseError, match="renewed it since"):
            storage_host.take_back_leases(SPEC, from_host, "host-a")
    assert ds.disk("web1.img").holder == "host-b"


def test_current_proto_nodes_are_found_by_export() -> None:
    """After a rolled-back migration the NBD node is not the command line's; a restarted agent
    finds it among QEMU's nodes by its export (DISK@HOST)."""
    spec = VmSpec(name="web1", memory=256 << 20,
                  disks=(DiskSpec(source="boot.img"), DiskSpec(source="web1.img", datastore="ds1")))
    nodes = [
        {"node-name": "disk0", "drv": "raw", "file": "/var/lib/kvmotion/disks/boot.img"},
        {"node-name": "disk0-proto", "drv": "file", "file": "/var/lib/kvmotion/disks/boot.img"},
        {"node-name": "disk1", "drv": "raw", "file": "nbd://10.77.0.2:10809/web1.img@host-a"},
        {"node-name": "disk1-3f2a9c01", "drv": "nbd", "file": "nbd://10.77.0.2:10809/web1.img@host-a"},
        {"node-name": "other", "drv": "nbd", "file": "nbd://10.77.0.2:10809/web1.img@host-b"},
    ]
    before = ["disk0-proto", "disk1-proto"]
    assert storage_host.current_proto_nodes(spec, "host-a", nodes, before) == ["disk0-proto", "disk1-3f2a9c01"]
    assert before == ["disk0-proto", "disk1-proto"]  # a new list
    # Not found (or ambiguous): the name it had stays.
    assert storage_host.current_proto_nodes(spec, "host-c", nodes, before) == before


def test_vms_on_a_tls_datastore_get_their_hosts_qemu_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tls-creds-x509 object is on the command line, ahead of the disk nodes that name it."""
    from kvmotion.qemu import confine
    from kvmotion.qemu.accel import Accel
    from kvmotion.qemu.cmdline import HostContext, QemuFds, VmPaths, build_argv
    from kvmotion.storage.attach import NBD_TLS_ID
    from tests.certs import TestCA
    from tests.joinedroot import datastore_view, make_root, save_cache, serve_in_test

    root = serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a", ca=TestCA(tmp_path / "ca"),
                                                 qemu_key_gid=confine.qemu_gid()))
    save_cache(root, datastores=(datastore_view("ds1", "nbd://10.77.0.2:10809"),))
    assert storage_host.qemu_objects(SPEC, "host-a") == ()  # an --insecure datastore: plain NBD
    save_cache(root, datastores=(datastore_view("ds1", "nbds://10.77.0.2:10809"),))
    [obj] = storage_host.qemu_objects(SPEC, "host-a")
    assert obj["id"] == NBD_TLS_ID and obj["dir"] == str(root.tls_dir / "qemu")
    node = storage_host.blockdev_for(SPEC.disks[0], "host-a", "disk0-proto")
    assert node["tls-creds"] == NBD_TLS_ID and node["export"] == "web1.img@host-a"
    ctx = HostContext(accel=Accel.TCG, kernel=Path("/k"), initramfs=Path("/i"), kernel_cmdline="quiet",
                      fds=QemuFds(qmp=3, serial=4, serial_log=5, disks=(None,)), disk_nodes=(node,), objects=(obj,))
    argv = build_argv(SPEC, VmPaths(tmp_path / "run"), ctx)
    assert argv.index("-object") < argv.index("-blockdev")
    assert json.loads(argv[argv.index("-object") + 1])["qom-type"] == "tls-creds-x509"
