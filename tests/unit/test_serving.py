"""kvmotion.api.serving over real TLS on loopback: who gets in, what each identity may do, limits,
the audit log."""

from __future__ import annotations

import json
import socket
import ssl
import time

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from kvmotion.api.identity import HOSTS, OPERATE, VIEW, Identity, Kind, Role, identity_of
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.serving import Limits, Security, allow
from tests.certs import Creds, TestCA
from tests.served import ServedApp


class Body(BaseModel):
    size: int


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/read")
    def read(who: Identity = Depends(allow(VIEW, "read"))) -> dict:
        return {"who": str(who)}

    @app.post("/change")
    def change(body: Body, who: Identity = Depends(allow(OPERATE, "change things"))) -> dict:
        return {"who": str(who), "size": body.size}

    @app.post("/peer")
    def peer(who: Identity = Depends(allow(HOSTS, "call host routes"))) -> dict:
        return {"who": str(who)}

    return app


class Served(ServedApp):
    """The test app under make_server in a thread, on a free loopback port."""

    def __init__(self, security: Security) -> None:
        super().__init__(_app(), security, "test service")


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "cluster")


@pytest.fixture
def served(ca, tmp_path):
    server = ca.host("server-1")
    s = Served(Security(tls_files=(server.dir / SERVER_CERT, server.dir / SERVER_KEY, server.dir / CA_CERT),
                        audit_log=tmp_path / "audit.log",
                        limits=Limits(max_body=4096, max_connections_per_client=6, max_connections=8)))
    yield s
    s.close()


def _client(ca: TestCA, creds: Creds | None, served: Served) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(ca.ca_dir / CA_CERT))
    ctx.check_hostname = False  # the server certificate names server-1; we dial 127.0.0.1 (SAN has it too)
    if creds is not None:
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return httpx.Client(base_url=f"https://127.0.0.1:{served.port}", verify=ctx, timeout=5)


def test_identities_and_roles(ca, served, tmp_path):
    viewer = _client(ca, ca.user("vera", Role.VIEWER), served)
    operator = _client(ca, ca.user("otto", Role.OPERATOR), served)
    host = _client(ca, ca.host("host-a"), served)
    qemu = _client(ca, ca.creds(Identity(Kind.QEMU, "host-a")), served)

    assert viewer.get("/read").json() == {"who": "user:vera (viewer)"}
    assert host.get("/read").json() == {"who": "host:host-a"}
    r = viewer.post("/change", json={"size": 1})
    assert r.status_code == 403
    assert r.json()["error"]["kind"] == "Forbidden"
    assert "user:vera (viewer) may not change things" in r.json()["error"]["message"]
    assert operator.post("/change", json={"size": 1}).json() == {"who": "user:otto (operator)", "size": 1}
    assert host.post("/change", json={"size": 1}).status_code == 403  # a host is no user
    assert operator.post("/peer").status_code == 403  # nor is a user a host
    assert host.post("/peer").json() == {"who": "host:host-a"}
    assert qemu.get("/read").status_code == 403  # QEMU's identity opens no API

    r = operator.post("/change", json={"size": "many"})
    assert r.status_code == 422
    assert r.json()["error"] == {"kind": "InvalidInput", "message": "invalid request body: size: Input should be a valid "
                                 "integer, unable to parse string as an integer (got 'many')"}

    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["who"], e["method"], e["path"], e["status"]) for e in lines] == [
        ("user:vera (viewer)", "POST", "/change", 403),
        ("user:otto (operator)", "POST", "/change", 200),
        ("host:host-a", "POST", "/change", 403),
        ("user:otto (operator)", "POST", "/peer", 403),
        ("host:host-a", "POST", "/peer", 200),
        ("user:otto (operator)", "POST", "/change", 422),
    ]
    assert all(e["client"] == "127.0.0.1" and e["at"] > 0 for e in lines)


def test_no_certificate_or_another_ca_gets_no_connection(ca, served, tmp_path):
    with pytest.raises(httpx.TransportError):
        _client(ca, None, served).get("/read")
    rogue = TestCA(tmp_path / "rogue")
    with pytest.raises(httpx.TransportError):
        _client(ca, rogue.user("admin", Role.ADMIN), served).get("/read")
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{served.port}/read", timeout=5)


def test_certificate_without_kvmotion_identity_is_refused(ca):
    """A CA-signed certificate whose subject is not one of ours (issued by hand with openssl, or
    before identities existed) names nobody."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from kvmotion.api.pki import load_ca
    from kvmotion.core.errors import Unauthorized

    root = load_ca(ca.ca_dir)
    now = dt.datetime.now(dt.UTC)
    for subject in ([x509.NameAttribute(NameOID.COMMON_NAME, "host-a")],  # a certificate of the old scheme
                    [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmotion"),
                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
                     x509.NameAttribute(NameOID.COMMON_NAME, "x")]):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(root.cert.subject)
                .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=1)).sign(root.key, hashes.SHA256()))
        with pytest.raises(Unauthorized, match="names no"):
            identity_of(cert)
    assert identity_of(x509.load_pem_x509_certificate(ca.user("odd", Role.ADMIN).cert.read_bytes())) == \
        Identity(Kind.USER, "odd", Role.ADMIN)


def test_body_limit(ca, served):
    operator = _client(ca, ca.user("otto", Role.OPERATOR), served)
    r = operator.post("/change", content=b'{"size": 1, "pad": "' + b"x" * 5000 + b'"}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "request body over the limit of 4096 bytes"


def test_connections_per_client(ca, served):
    creds = ca.user("vera", Role.VIEWER)
    ctx = ssl.create_default_context(cafile=str(ca.ca_dir / CA_CERT))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    held = []
    for _ in range(6):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        held.append(s)
    fourth = socket.create_connection(("127.0.0.1", served.port), timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ctx.wrap_socket(fourth).sendall(b"GET /read HTTP/1.1\r\nhost: x\r\n\r\n")
        assert fourth.recv(1), "connection over the limit was served"
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back once the server saw the closes
        try:
            assert _client(ca, creds, served).get("/read").status_code == 200
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
