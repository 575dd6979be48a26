"""Datastore addresses, the cluster's datastore registry, and QEMU's -blockdev options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmotion.api.address import Endpoint, parse_listen, parse_nbd_url
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.core.errors import InvalidInput, NotFound, SetupError
from kvmotion.storage.attach import nbd_blockdev, reattach_commands
from tests.joinedroot import datastore_view, make_root, save_cache, served


def test_addresses() -> None:
    assert parse_nbd_url("nbd://10.77.0.1:10809") == Endpoint("10.77.0.1", 10809)
    assert parse_nbd_url("nbd://ds.example") == Endpoint("ds.example", 10809)
    assert parse_listen("0.0.0.0:9000") == Endpoint("0.0.0.0", 9000)
    assert parse_listen("[::1]:9000") == Endpoint("::1", 9000)
    assert Endpoint("::1", 9000).nbd_url == "nbd://[::1]:9000"
    for bad in ("http://x", "nbd://", "nbd://h:99999", "nbd://h:1/web1.img"):
        with pytest.raises(InvalidInput):
            parse_nbd_url(bad)
    with pytest.raises(InvalidInput):
        parse_listen("host:port")


def test_registry_is_the_centers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A joined agent's registry is its cache of the center's datastores; with no joined root and no
    login there is no cluster (adding and removing are the center's: test_center_api)."""
    monkeypatch.setenv("KVMOTION_CONFIG", str(tmp_path / "no-login"))
    with pytest.raises(SetupError, match="not logged in to a center"):
        Registry().all()
    ref = DatastoreRef.make("ds1", "nbd://10.77.0.1:10809")
    assert ref.control_url == "http://10.77.0.1:10810"
    root = make_root(tmp_path / "host-a", "host-a", datastores=(datastore_view("ds1", "nbd://10.77.0.1:10809"),))
    with served(root):
        assert Registry().get("ds1") == ref and Registry().all() == [ref]
        other = DatastoreRef.make("ds1", "nbd://10.77.0.9", "http://10.77.0.9:8080")
        save_cache(root, datastores=(datastore_view("ds1", other.nbd_url, other.control_url),))  # the center's new word
        assert Registry().get("ds1").control_url == "http://10.77.0.9:8080"
        save_cache(root, datastores=())
        with pytest.raises(NotFound, match="datastore join"):
            Registry().get("ds1")


def test_registry_rejects_bad_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        DatastoreRef.make("DS 1", "nbd://h")


def test_blockdev_for_qemu_nbd_client() -> None:
    opts = nbd_blockdev("nbd://10.77.0.1:10809", "web1.img", "host-b", "disk0-proto")
    assert opts["driver"] == "nbd"
    assert opts["node-name"] == "disk0-proto"
    assert opts["server"] == {"type": "inet", "host": "10.77.0.1", "port": "10809"}
    assert opts["export"] == "web1.img@host-b"
    assert opts["reconnect-delay"] > 0 and opts["open-timeout"] > 0
    assert json.loads(json.dumps(opts)) == opts
    with pytest.raises(InvalidInput):
        nbd_blockdev("nbd://10.77.0.1", "web1.img", "host-b", "0bad")
    with pytest.raises(InvalidInput):
        nbd_blockdev("nbd://10.77.0.1", "web1.img", "host b", "disk0")


def test_reattach_commands_swap_the_nbd_node_under_the_format_node() -> None:
    fmt = {"driver": "raw", "node-name": "disk0", "file": "disk0-proto"}
    cmds = reattach_commands("nbd://10.77.0.1:10809", "web1.img", "host-a", fmt, "disk0-proto-g3")
    assert [c.name for c in cmds] == ["blockdev-add", "blockdev-reopen", "blockdev-del"]
    assert cmds[0].arguments["node-name"] == "disk0-proto-g3"
    assert cmds[0].arguments["export"] == "web1.img@host-a"
    assert cmds[1].arguments == {"options": [{"driver": "raw", "node-name": "disk0", "file": "disk0-proto-g3"}]}
    assert cmds[2].arguments == {"node-name": "disk0-proto"}
    assert fmt["file"] == "disk0-proto"  # the caller's dict is not modified


def test_tls_datastores_are_nbds_and_https(tmp_path: Path) -> None:
    ref = DatastoreRef.make("ds1", "nbds://10.77.0.1:10809")
    assert (ref.nbd_url, ref.control_url, ref.tls) == ("nbds://10.77.0.1:10809", "https://10.77.0.1:10810", True)
    assert not DatastoreRef.make("ds1", "nbd://10.77.0.1").tls
    assert DatastoreRef.make("ds1", "nbds://h", "https://h:8443").control_url == "https://h:8443"
    for nbd, control in (("nbds://h", "http://h:1"), ("nbd://h", "https://h:1")):
        with pytest.raises(InvalidInput, match="disagree on TLS"):
            DatastoreRef.make("ds1", nbd, control)
    with served(make_root(tmp_path / "host-a", "host-a", datastores=(datastore_view("ds1", ref.nbd_url),))):
        assert Registry().get("ds1").tls  # the scheme is what the registry keeps


def test_blockdev_over_tls_names_the_credentials_object(tmp_path: Path) -> None:
    from kvmotion.storage.attach import NBD_TLS_ID, nbd_tls_object

    opts = nbd_blockdev("nbds://10.77.0.1:10809", "web1.img", "host-b", "disk0-proto")
    assert opts["tls-creds"] == NBD_TLS_ID and "tls-hostname" not in opts  # QEMU checks the dialled address
    assert "tls-creds" not in nbd_blockdev("nbd://10.77.0.1:10809", "web1.img", "host-b", "disk0-proto")
    fmt = {"driver": "raw", "node-name": "disk0", "file": "disk0-proto"}
    [add, _, _] = reattach_commands("nbds://10.77.0.1:10809", "web1.img", "host-a", fmt, "disk0-g3")
    assert add.arguments["tls-creds"] == NBD_TLS_ID
    assert nbd_tls_object(tmp_path) == {"qom-type": "tls-creds-x509", "id": NBD_TLS_ID, "dir": str(tmp_path),
                                        "endpoint": "client", "verify-peer": True}
