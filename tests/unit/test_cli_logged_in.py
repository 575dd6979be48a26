"""A CLI logged in to a center (a login config): its host inventory and datastore registry are the
center's, its TLS identity the login's user certificate; the lab reads the center's first-start
lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmotion.api import userconfig
from kvmotion.api.center import CenterClient, Credentials, DatastoreSpec, JoinRequest, LoginRequest, pinned_ca, trusting
from kvmotion.api.inventory import HostEntry, Inventory
from kvmotion.api.joined import StateRoot
from kvmotion.api.pki import new_key_and_csr
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.api.tls import cli_ssl_context
from kvmotion.cli import main
from kvmotion.cli.login import save_credentials
from kvmotion.core.errors import NotFound, SetupError
from kvmotion.host.join import join
from kvmotion.lab.cluster import read_first_start
from tests.unit.test_center_serve import Served


@pytest.fixture
def logged_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A served center with ds1 registered and host-a joined; this process logged in as admin."""
    served = Served(tmp_path / "data")
    log = tmp_path / "center.log"
    log.write_text("\n".join(served.prepared.lines) + "\n")
    secrets = read_first_start(log)
    assert secrets.ca_sha256 == served.prepared.center.ca_sha256
    ca = pinned_ca(served.url, secrets.ca_sha256).ca_cert
    key, csr = new_key_and_csr()
    with CenterClient(served.url, trusting(ca)) as anonymous:
        answer = anonymous.login(LoginRequest(user="admin", password=secrets.password, csr=csr))
        _, host_csr = new_key_and_csr()
        _, qemu_csr = new_key_and_csr()
        anonymous.join(JoinRequest(token=secrets.token, name="host-a", address="127.0.0.1", host_csr=host_csr,
                                   qemu_csr=qemu_csr))
    creds = Credentials(center=served.url, user="admin", ca_cert=answer.ca_cert, cert=answer.cert, key=key.decode())
    with creds.client() as admin:
        admin.add_datastore(DatastoreSpec(name="ds1", nbd_url="nbds://127.0.0.2:10809", control_url="https://127.0.0.2:10810"))
    config = tmp_path / "config"
    save_credentials(creds, config)
    monkeypatch.setenv("KVMOTION_CONFIG", str(config))
    userconfig.forget()
    yield served, creds
    userconfig.forget()
    served.close()


def test_inventory_registry_and_identity_come_from_the_login(logged_in, tmp_path: Path) -> None:
    _served, creds = logged_in
    assert Inventory().hosts() == [HostEntry(name="host-a", url="https://127.0.0.1:7701")]
    assert Registry().get("ds1") == DatastoreRef("ds1", "nbds://127.0.0.2:10809", "https://127.0.0.2:10810")
    # The CLI presents the login's certificate, trusting the center's CA only.
    ctx = cli_ssl_context()
    assert ctx is userconfig.user_ssl_context() and len(ctx.get_ca_certs()) == 1
    assert userconfig.load_credentials() == creds


def test_without_a_login_there_is_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMOTION_CONFIG", str(tmp_path / "config"))
    userconfig.forget()
    for lookup in (Inventory().hosts, Registry().all):
        with pytest.raises(SetupError, match=r"not logged in to a center \(no .*config\): run `kvmotion login URL"):
            lookup()
    with pytest.raises(NotFound, match="no login config at"):
        cli_ssl_context()
    assert not (tmp_path / "config").exists()


def test_first_start_lines_missing(tmp_path: Path) -> None:
    log = tmp_path / "center.log"
    log.write_text("kvmotion center serving https://10.0.0.5:7700 (CA SHA-256 " + "a" * 64 + ")\n")
    with pytest.raises(SetupError, match=r"printed no password, token \(log: .*center.log\)"):
        read_first_start(log)


def test_joined_host_serves_insecure_only_under_an_insecure_center(tmp_path: Path, monkeypatch, capsys) -> None:
    served = Served(tmp_path / "data")
    try:
        token = served.line("join token").rsplit(" ", 1)[1]
        root = StateRoot(tmp_path / "root")
        join(served.url, token, "host-a", "127.0.0.1", root)
        monkeypatch.setattr(sys, "argv", ["kvmotion", "host", "serve", "--insecure", "--state-dir", str(root.path)])
        with pytest.raises(SystemExit) as done:
            main.main()
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1, err
        assert "only a host of an --insecure center may" in err
    finally:
        served.close()
