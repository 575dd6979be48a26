"""Cluster CA: certificate contents, file layout and modes, QEMU accepting it, mutual TLS, CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import queue
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvmotion.api import pki as camod
from kvmotion.api.identity import Identity, Kind, identity_of
from kvmotion.api.pki import init_ca, issue_host_cert, load_ca
from kvmotion.api.tls import client_context
from kvmotion.core.errors import Conflict, InvalidInput, NotFound, SetupError
from kvmotion.qemu import confine

QEMU = shutil.which("qemu-system-x86_64")
LAYOUT = ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def cluster(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    issue_host_cert(tmp_path / "ca", "host1", ["127.0.0.1", "10.77.0.11"], tmp_path / "hosts" / "host1", qemu_key_gid=confine.qemu_gid())
    return tmp_path


def test_ca_certificate_and_key_files(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca-cert.pem", "ca-key.pem"]
    assert mode(ca.key_path) == 0o600 and mode(tmp_path / "ca") == 0o700
    cert = ca.cert
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life >= dt.timedelta(days=3650)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC)
    assert ca.fingerprint.count(":") == 31


def test_init_keeps_an_existing_ca(tmp_path: Path) -> None:
    first = init_ca(tmp_path / "ca")
    again = init_ca(tmp_path / "ca")
    assert again.fingerprint == first.fingerprint


def test_two_clusters_have_different_ca_names(tmp_path: Path) -> None:
    assert init_ca(tmp_path / "a").subject != init_ca(tmp_path / "b").subject


def test_host_certificate_serves_both_ends(cluster: Path) -> None:
    host = cluster / "hosts" / "host1"
    assert sorted(p.name for p in host.iterdir()) == sorted([*LAYOUT, "qemu"])
    assert sorted(p.name for p in (host / "qemu").iterdir()) == LAYOUT
    assert identity_of(x509.load_pem_x509_certificate((host / "server-cert.pem").read_bytes())) == Identity(Kind.HOST, "host1")
    qemu = x509.load_pem_x509_certificate((host / "qemu" / "server-cert.pem").read_bytes())
    assert identity_of(qemu) == Identity(Kind.QEMU, "host1")
    assert qemu.public_key() != x509.load_pem_x509_certificate((host / "server-cert.pem").read_bytes()).public_key()
    key_mode = 0o600 if confine.qemu_gid() is None else 0o640  # QEMU's group reads its own key only
    for key in ("server-key.pem", "client-key.pem"):
        assert mode(host / "qemu" / key) == key_mode
    for key in ("server-key.pem", "client-key.pem"):
        assert mode(host / key) == 0o600  # the agent's key: root only
    cert = x509.load_pem_x509_certificate((host / "server-cert.pem").read_bytes())
    assert (host / "client-cert.pem").read_bytes() == (host / "server-cert.pem").read_bytes()
    assert (host / "ca-cert.pem").read_bytes() == (cluster / "ca" / "ca-cert.pem").read_bytes()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.77.0.11")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = load_ca(cluster / "ca")
    cert.verify_directly_issued_by(ca.cert)
    assert cert.not_valid_after_utc <= ca.expires


@pytest.mark.parametrize("gid", [None, 4242])
def test_keys_are_readable_by_qemus_group_only_when_it_exists(tmp_path: Path, gid: int | None) -> None:
    # QEMU, unprivileged, loads its tls-creds-x509 from the host folder's qemu/; the agent's own key stays root's.
    init_ca(tmp_path / "ca")
    host = issue_host_cert(tmp_path / "ca", "host1", [], tmp_path / "host1", qemu_key_gid=gid).dir
    for key in ("server-key.pem", "client-key.pem"):
        st = (host / "qemu" / key).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == ((0o600, 0) if gid is None else (0o640, gid))
        assert mode(host / key) == 0o600 and (host / key).stat().st_gid == 0
    for public in ("ca-cert.pem", "server-cert.pem", "client-cert.pem"):
        assert mode(host / public) == 0o644 and mode(host / "qemu" / public) == 0o644


def test_bad_names_and_addresses_are_refused(cluster: Path) -> None:
    with pytest.raises(InvalidInput, match="host name"):
        issue_host_cert(cluster / "ca", "bad name", [], cluster / "x", qemu_key_gid=confine.qemu_gid())
    with pytest.raises(InvalidInput, match="IP address"):
        issue_host_cert(cluster / "ca", "host2", ["10.0.0.300"], cluster / "x", qemu_key_gid=confine.qemu_gid())
    with pytest.raises(Conflict):
        issue_host_cert(cluster / "ca", "host2", [], cluster / "ca", qemu_key_gid=confine.qemu_gid())
    with pytest.raises(NotFound, match="the center makes it at its first start"):
        issue_host_cert(cluster / "nope", "host2", [], cluster / "x", qemu_key_gid=confine.qemu_gid())


def test_damaged_or_mismatched_ca_is_reported(tmp_path: Path) -> None:
    init_ca(tmp_path / "a")
    init_ca(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "ca-key.pem", tmp_path / "a" / "ca-key.pem")
    with pytest.raises(SetupError, match="does not match"):
        load_ca(tmp_path / "a")
    (tmp_path / "b" / "ca-cert.pem").write_text("garbage")
    with pytest.raises(SetupError, match="damaged"):
        load_ca(tmp_path / "b")


def test_a_client_context_needs_the_files(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=r"lacks ca-cert\.pem, client-cert\.pem, client-key\.pem"):
        client_context(tmp_path)


def server_context(cert_dir: Path) -> ssl.SSLContext:
    """A listener as kvmotion.api.serving has uvicorn set it up: its certificate, and only clients
    with a certificate of the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_dir / "server-cert.pem"), str(cert_dir / "server-key.pem"))
    ctx.load_verify_locations(cafile=str(cert_dir / "ca-cert.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ------------------------------------------------------------------------------------------- QEMU


def qemu_loads(cert_dir: Path, endpoint: str) -> subprocess.CompletedProcess:
    """Start QEMU with only the credentials object (no guest); QMP quit once it is up."""
    return subprocess.run(
        [QEMU, "-M", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
         "-object", f"tls-creds-x509,id=tls0,dir={cert_dir},endpoint={endpoint},verify-peer=on"],
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("endpoint", ["server", "client"])
def test_qemu_accepts_the_host_folder(cluster: Path, endpoint: str) -> None:
    r = qemu_loads(cluster / "hosts" / "host1", endpoint)
    assert r.returncode == 0, r.stderr
    assert '"host-qmp-quit"' in r.stdout and r.stderr == ""


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_refuses_a_certificate_from_another_ca(cluster: Path, tmp_path: Path) -> None:
    # The check above would be worthless if QEMU accepted anything: show that it validates.
    other = init_ca(tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(cluster / "hosts" / "host1", mixed)
    shutil.copy(other.cert_path, mixed / "ca-cert.pem")
    r = qemu_loads(mixed, "server")
    assert r.returncode != 0 and "failed validation" in r.stderr


# ------------------------------------------------------------------------------------ mutual TLS


class EchoServer:
    """One-thread TLS echo server on loopback; records how each handshake ended."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.outcomes: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    data = tls.recv(100)
                    tls.sendall(data)
                    self.outcomes.put("ok")
            except ssl.SSLError:
                self.outcomes.put("refused")
                conn.close()
            except OSError as exc:
                self.outcomes.put(type(exc).__name__)
                conn.close()

    def outcome(self) -> str:
        """How the next handshake ended on the server side."""
        return self.outcomes.get(timeout=5)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture()
def server(cluster: Path):
    srv = EchoServer(server_context(cluster / "hosts" / "host1"))
    yield srv
    srv.close()


def talk(ctx: ssl.SSLContext, port: int, name: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"ping")
            return tls.recv(100)


def test_mutual_tls_accepts_a_cluster_certificate(cluster: Path, server: EchoServer) -> None:
    issue_host_cert(cluster / "ca", "host2", ["10.77.0.12"], cluster / "hosts" / "host2", qemu_key_gid=confine.qemu_gid())
    ctx = client_context(cluster / "hosts" / "host2")
    assert talk(ctx, server.port) == b"ping"
    assert talk(ctx, server.port, "host1") == b"ping"  # by name too: the SAN carries it
    assert [server.outcome(), server.outcome()] == ["ok", "ok"]


def test_mutual_tls_refuses_a_certificate_from_another_ca(cluster: Path, server: EchoServer, tmp_path: Path) -> None:
    init_ca(tmp_path / "evil-ca")
    evil = tmp_path / "evil"
    issue_host_cert(tmp_path / "evil-ca", "host2", ["127.0.0.1"], evil, qemu_key_gid=confine.qemu_gid())
    # The intruder trusts our CA (it copied it) but holds a certificate from its own.
    shutil.copy(cluster / "ca" / "ca-cert.pem", evil / "ca-cert.pem")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        talk(client_context(evil), server.port)
    assert server.outcome() == "refused"


def test_mutual_tls_refuses_a_client_without_certificate(cluster: Path, server: EchoServer) -> None:
    ctx = ssl.create_default_context(cafile=str(cluster / "ca" / "ca-cert.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        talk(ctx, server.port)
    assert server.outcome() == "refused"


def test_plain_tcp_is_refused(server: EchoServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            answer = raw.recv(100)
        except ConnectionResetError:
            answer = b""
    assert b"ping" not in answer and b"HTTP" not in answer  # a TLS alert, a reset or nothing
    assert server.outcome() == "refused"


def test_client_refuses_a_server_from_another_ca_or_wrong_name(cluster: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "evil-ca")
    issue_host_cert(tmp_path / "evil-ca", "host1", ["127.0.0.1"], tmp_path / "evil", qemu_key_gid=confine.qemu_gid())
    impostor = EchoServer(server_context(tmp_path / "evil"))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            talk(client_context(cluster / "hosts" / "host1"), impostor.port)
    finally:
        impostor.close()
    genuine = EchoServer(server_context(cluster / "hosts" / "host1"))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            talk(client_context(cluster / "hosts" / "host1"), genuine.port, "host9")
    finally:
        genuine.close()


def test_cluster_config_is_the_joined_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmotion.api.center import ClusterSettings
    from kvmotion.api.config import ClusterConfig, load_config
    from tests.joinedroot import make_root, serve_in_test

    assert load_config() == ClusterConfig()  # no joined root served: defaults, encrypted
    serve_in_test(monkeypatch, make_root(tmp_path / "h1", "h1", settings=ClusterSettings(encrypted=False,
                                                                                         cpu_baseline="Haswell-v4")))
    assert load_config() == ClusterConfig(encrypted=False, cpu_baseline="Haswell-v4")
    assert camod.CA_KEY == "ca-key.pem"
