"""`kvmotion datastore join` against a center served in-process on loopback TLS: the state root it
writes (key made here, CSR signed by the center, CA pinned by the token), the datastore recorded at
the center, refusals leaving nothing behind; and `datastore serve` refusing without a joined root."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kvmotion.api.identity import Identity, Kind, identity_of
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.cli import main
from kvmotion.core.errors import Conflict, Unauthorized
from kvmotion.storage.join import DatastoreRoot, join
from tests.unit.test_center_serve import Served


@pytest.fixture
def served(tmp_path: Path):
    s = Served(tmp_path / "data")
    yield s
    s.close()


def _token(served: Served) -> str:
    return served.line("join token").rsplit(" ", 1)[1]


def _cli(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["kvmotion", *args])
    with pytest.raises(SystemExit) as done:
        main.main()
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def test_join_writes_the_root_and_records_the_datastore(served: Served, tmp_path: Path, monkeypatch, capsys) -> None:
    root = DatastoreRoot(tmp_path / "ds1")
    code, out, err = _cli(monkeypatch, capsys, "datastore", "join", served.url, "--token", _token(served), "--name", "ds1",
                          "--address", "127.0.0.2", "--address", "127.0.0.3", "--port", "20000", "--state-dir", str(root.path))
    assert code == 0, err
    assert "joined" in out and "as datastore ds1 (nbds://127.0.0.2:20000" in out
    config = root.config()
    assert (config.center, config.name, config.address, config.nbd_port) == (served.url, "ds1", "127.0.0.2", 20000)
    cert = x509.load_pem_x509_certificate((root.tls_dir / SERVER_CERT).read_bytes())
    assert identity_of(cert) == Identity(Kind.DATASTORE, "ds1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2", "127.0.0.3"]  # the first recorded
    key = serialization.load_pem_private_key((root.tls_dir / SERVER_KEY).read_bytes(), None)
    assert cert.public_key() == key.public_key()  # the key made here is the one the center signed
    assert stat.S_IMODE(os.stat(root.tls_dir / SERVER_KEY).st_mode) == 0o600
    assert (root.tls_dir / CA_CERT).read_text().strip() == served.prepared.center.ca_pem.strip()
    assert root.disks.is_dir() and not [p for p in root.path.parent.iterdir() if p.name.startswith(".")]
    store = served.prepared.center.store
    assert [(d.name, d.nbd_url, d.control_url) for d in store.datastores()] == [
        ("ds1", "nbds://127.0.0.2:20000", "https://127.0.0.2:20001")]
    # Joined to a TLS center: it serves with its certificate, never --insecure.
    code, _, err = _cli(monkeypatch, capsys, "datastore", "serve", "--insecure", "--state-dir", str(root.path))
    assert code != 0 and err.count("\n") == 1 and "only a datastore of an --insecure center may" in err, err
    # Joined already: refused without --force, the root untouched.
    before = (root.tls_dir / SERVER_KEY).read_bytes()
    with pytest.raises(Conflict, match="is joined already as datastore ds1"):
        join(served.url, _token(served), "ds1", "127.0.0.2", root)
    assert (root.tls_dir / SERVER_KEY).read_bytes() == before


def test_refused_joins_leave_nothing(served: Served, tmp_path: Path) -> None:
    root = DatastoreRoot(tmp_path / "ds1")
    prefix, ca_hash, token_id, _secret = _token(served).split(".")
    with pytest.raises(Unauthorized, match="is forged"):
        join(served.url, ".".join((prefix, ca_hash, token_id, "0" * 32)), "ds1", "127.0.0.2", root)
    with pytest.raises(Unauthorized, match="has CA SHA-256"):  # another cluster's token: nothing sent
        join(served.url, ".".join((prefix, "0" * 64, token_id, _secret)), "ds1", "127.0.0.2", root)
    join(served.url, _token(served), "ds1", "127.0.0.2", DatastoreRoot(tmp_path / "first"))
    with pytest.raises(Conflict, match="datastore ds1 exists already"):  # the name is taken at the center
        join(served.url, _token(served), "ds1", "127.0.0.3", root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "first"]  # no ds1 root, no staging folder


def test_serve_needs_a_joined_root(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = _cli(monkeypatch, capsys, "datastore", "serve", "--state-dir", str(tmp_path / "none"))
    assert code != 0 and err.count("\n") == 1 and "holds no joined datastore" in err, err
    code, _, err = _cli(monkeypatch, capsys, "datastore", "serve", "--insecure", "--state-dir", str(tmp_path / "none"))
    assert code != 0 and err.count("\n") == 1 and "needs its NAME and --root" in err, err
    assert not (tmp_path / "none").exists()
