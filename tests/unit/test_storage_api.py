"""DatastoreClient against the control API in-process (no sockets), and its error mapping."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from kvmotion.errors import Conflict, InvalidInput, LeaseError, NotFound, Unreachable
from kvmotion.storage.api import create_app
from kvmotion.storage.client import DatastoreClient
from kvmotion.storage.datastore import Datastore


@pytest.fixture
def client(tmp_path: Path) -> DatastoreClient:
    with warnings.catch_warnings():  # starlette's TestClient says it prefers httpx2 to our pinned httpx
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    app = create_app(Datastore("ds1", tmp_path, 30.0))
    return DatastoreClient("http://testserver", http=TestClient(app))


def test_disks_and_leases_roundtrip(client: DatastoreClient) -> None:
    assert client.info().name == "ds1" and client.info().lease_ttl == 30.0
    assert client.reachable()
    created = client.create_disk("web1.img", 8 << 20)
    assert created.size == 8 << 20 and created.holder is None
    lease = client.acquire("web1.img", "host-a", "web1")
    assert (lease.host, lease.vm, lease.generation) == ("host-a", "web1", 1)
    assert client.renew("web1.img", "host-a").generation == 1
    with pytest.raises(LeaseError, match="generation 1 now, not 7"):
        client.transfer("web1.img", "host-a", "host-b", "web1", generation=7)
    moved = client.transfer("web1.img", "host-a", "host-b", "web1", generation=1)
    assert (moved.host, moved.generation) == ("host-b", 2)
    [disk] = client.list_disks()
    assert (disk.name, disk.holder, disk.generation) == ("web1.img", "host-b", 2)
    client.release("web1.img", "host-b")
    assert client.disk("web1.img").lease is None
    client.delete_disk("web1.img")
    assert client.list_disks() == []


def test_errors_come_back_as_kvmotion_errors(client: DatastoreClient) -> None:
    client.create_disk("web1.img", 8 << 20)
    with pytest.raises(Conflict, match="already exists"):
        client.create_disk("web1.img", 8 << 20)
    with pytest.raises(InvalidInput, match="multiple of 512"):
        client.create_disk("x.img", 1000)
    with pytest.raises(NotFound, match="no disk"):
        client.acquire("nope.img", "host-a", "web1")
    client.acquire("web1.img", "host-a", "web1")
    with pytest.raises(LeaseError, match="leased to host-a"):
        client.acquire("web1.img", "host-b", "web1")
    with pytest.raises(LeaseError, match="cannot transfer"):
        client.transfer("web1.img", "host-b", "host-c", "web1")
    with pytest.raises(InvalidInput):
        client.acquire("web1.img", "bad host", "web1")
    with pytest.raises(InvalidInput):  # checked before any request is sent
        client.disk("../etc")


def test_malformed_request_is_one_line_invalid_input(client: DatastoreClient) -> None:
    with pytest.raises(InvalidInput, match="size") as info:
        client._call("POST", "/disks", {"name": "x.img"})
    assert "\n" not in str(info.value)


def test_unreachable_datastore() -> None:
    client = DatastoreClient("http://127.0.0.1:9", timeout=1)  # discard port: nothing listens
    assert not client.reachable()
    with pytest.raises(Unreachable, match="unreachable"):
        client.list_disks()
