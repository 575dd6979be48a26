"""The center served for real on loopback TLS (client certificates optional at the handshake), its
clients pinning its CA, and `kvmotion center serve` / `login` / `center token create` as a user
runs them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from kvmotion.api.center import (
    PROTOCOL_VERSION,
    AsyncCenterClient,
    CenterClient,
    Credentials,
    DatastoreSpec,
    Heartbeat,
    HostLoad,
    JoinRequest,
    LoginRequest,
    pinned_ca,
    trusting,
)
from kvmotion.api.identity import Identity, Kind, Role, identity_of
from kvmotion.api.pki import new_key_and_csr
from kvmotion.center.app import create_app
from kvmotion.center.serve import Listen, parse_listen, prepare
from kvmotion.core.errors import Forbidden, InvalidInput, Unauthorized, Unreachable
from kvmotion.core.listen import listening_socket
from tests.certs import TestCA
from tests.served import ServedApp

LOAD = HostLoad(cpus=2, memory_total=1 << 30, memory_available=1 << 29)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(ServedApp):
    """The center as `center serve` builds it, under make_server in a thread, on a loopback port."""

    def __init__(self, data: Path) -> None:
        sock = listening_socket("127.0.0.1", 0, "the center")
        self.prepared = prepare(data, Listen("127.0.0.1", sock.getsockname()[1]), insecure=False, password_cost=10)
        super().__init__(create_app(self.prepared.center), self.prepared.security, "center", lifespan="on", sock=sock)

    def line(self, starts: str) -> str:
        return next(line for line in self.prepared.lines if line.startswith(starts))

    def close(self) -> None:
        super().close()  # the lifespan ends first: the heartbeat loop stops before the store closes
        self.prepared.center.store.close()


@pytest.fixture
def served(tmp_path: Path):
    s = Served(tmp_path / "data")
    yield s
    s.close()


def test_over_tls(served: Served, tmp_path: Path) -> None:
    sha = served.prepared.center.ca_sha256
    password = served.line("user admin's password").rsplit(" ", 1)[1]
    token = served.line("join token").rsplit(" ", 1)[1]
    assert served.prepared.first and token.split(".")[1] == sha

    # Before any certificate: the CA, checked against the pin; a wrong pin sends nothing further.
    ca_cert = pinned_ca(served.url, sha).ca_cert
    with pytest.raises(Unauthorized, match="nothing was sent"):
        pinned_ca(served.url, "0" * 64)
    with contextlib.ExitStack() as clients:  # closed before the server stops (an open TLS connection delays it)
        def client(context: ssl.SSLContext) -> CenterClient:
            return clients.enter_context(CenterClient(served.url, context))

        anonymous = client(trusting(ca_cert))
        with pytest.raises(Unauthorized, match="no client certificate"):
            anonymous.hosts()

        # Login: a user certificate for a key made here.
        key, csr = new_key_and_csr()
        answer = anonymous.login(LoginRequest(user="admin", password=password, csr=csr))
        assert identity_of(x509.load_pem_x509_certificate(answer.cert.encode())) == Identity(Kind.USER, "admin", Role.ADMIN)
        creds = Credentials(center=served.url, user="admin", ca_cert=answer.ca_cert, cert=answer.cert, key=key.decode())
        admin = client(creds.ssl_context())
        assert admin.hosts() == []
        admin.add_datastore(DatastoreSpec(name="ds1", nbd_url="nbds://127.0.0.1:10809", control_url="https://127.0.0.1:10810"))

        # Join: both certificates; then the host heartbeats with its own (async client).
        host_key, host_csr = new_key_and_csr()
        _, qemu_csr = new_key_and_csr()
        joined = anonymous.join(JoinRequest(token=token, name="host-a", address="127.0.0.1", host_csr=host_csr,
                                            qemu_csr=qemu_csr))
        assert identity_of(x509.load_pem_x509_certificate(joined.host_cert.encode())) == Identity(Kind.HOST, "host-a")
        assert identity_of(x509.load_pem_x509_certificate(joined.qemu_cert.encode())) == Identity(Kind.QEMU, "host-a")

        async def beat() -> str:
            async with AsyncCenterClient(served.url, trusting(joined.ca_cert, joined.host_cert, host_key.decode())) as host:
                answer = await host.heartbeat("host-a", Heartbeat(version=PROTOCOL_VERSION, load=LOAD))
                with pytest.raises(Forbidden, match="may not send host host-b's heartbeats"):
                    await host.heartbeat("host-b", Heartbeat(version=PROTOCOL_VERSION, load=LOAD))
                return answer.state.value

        assert asyncio.run(beat()) == "connected"
        assert [(h.name, h.state.value) for h in admin.hosts()] == [("host-a", "connected")]
        assert [e.kind.value for e in admin.events().events][-3:] == ["datastore_added", "host_joined", "host_connected"]

        # Another CA's certificate gets no connection; plain HTTP neither.
        rogue = TestCA(tmp_path / "rogue").user("admin", Role.ADMIN)
        with pytest.raises(Unreachable):
            client(trusting(ca_cert, rogue.cert.read_text(), rogue.key.read_text())).hosts()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{served.port}/v1/ca", timeout=5)
    audit = [json.loads(line) for line in served.prepared.security.audit_log.read_text().splitlines()]
    assert [(e["who"], e["path"], e["status"]) for e in audit] == [
        ("logging in user:admin", "/v1/login", 200), ("user:admin (admin)", "/v1/datastores", 201),
        ("joining host:host-a", "/v1/join", 201), ("host:host-a", "/v1/hosts/host-b/heartbeat", 403)]


def test_listen_addresses() -> None:
    assert parse_listen("10.0.0.5:7700") == Listen("10.0.0.5", 7700)
    assert parse_listen("[fd00::5]:7700") == Listen("fd00::5", 7700)
    assert parse_listen("mgmt.example:7700").host == "mgmt.example"
    for bad, says in (("0.0.0.0:7700", "cannot listen on 0.0.0.0"), ("10.0.0.5", "invalid listen address"),
                      ("10.0.0.5:99999", "invalid listen address"), ("bad_name:7700", "invalid host name")):
        with pytest.raises(InvalidInput, match=says):
            parse_listen(bad)


def _cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmotion.cli.main", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


class Center:
    """`kvmotion center serve` in a subprocess; stopped (SIGTERM, then SIGKILL) by close()."""

    def __init__(self, port: int, data: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmotion.cli.main", "center", "serve", "--listen",
                                      f"127.0.0.1:{port}", "--data", str(data)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        deadline = time.monotonic() + 30
        while not self.lines or not self.lines[-1].startswith("kvmotion center serving"):
            assert time.monotonic() < deadline and self.proc.poll() is None, (
                self.proc.stderr.read() if self.proc.poll() is not None else "slow start")
            self.lines.append(self.proc.stdout.readline().rstrip("\n"))
        deadline = time.monotonic() + 10
        while True:  # the port answers once uvicorn has started
            try:
                httpx.get(f"https://127.0.0.1:{port}/v1/ca", verify=False, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_serve_login_and_token_create(tmp_path: Path) -> None:
    port, data, config = _free_port(), tmp_path / "data", tmp_path / "home" / "config"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "KVMOTION_CONFIG": str(config),
           "HOME": str(tmp_path / "home")}
    url = f"https://127.0.0.1:{port}"
    center = Center(port, data, env)
    try:
        first = center.lines
        password = next(line for line in first if line.startswith("user admin's password")).rsplit(" ", 1)[1]
        sha = next(line for line in first if line.startswith("created the cluster CA")).rsplit(" ", 1)[1].rstrip(")")
        assert any(line.startswith("join token, valid until") and "kvm1." + sha in line for line in first)

        wrong = _cli("login", url, "--user", "admin", "--password-stdin", "--ca-sha256", "0" * 64, env=env,
                     stdin=password + "\n")
        assert wrong.returncode != 0 and wrong.stderr.count("\n") == 1 and "nothing was sent" in wrong.stderr
        no_pin = _cli("login", url, "--user", "admin", "--password-stdin", env=env, stdin=password + "\n")
        assert no_pin.returncode == 2 and "give --ca-sha256" in no_pin.stderr
        bad_password = _cli("login", url, "--user", "admin", "--password-stdin", "--ca-sha256", sha, env=env,
                            stdin="not it\n")
        assert bad_password.returncode == 11 and bad_password.stderr == "kvmotion: error: wrong user name or password\n"
        assert not config.exists()

        ok = _cli("login", url, "--user", "admin", "--password-stdin", "--ca-sha256", sha, env=env, stdin=password + "\n")
        assert ok.returncode == 0, ok.stderr
        assert f"logged in to {url} as user:admin (admin)" in ok.stdout
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        saved = json.loads(config.read_text())
        assert saved["center"] == url and saved["user"] == "admin" and "PRIVATE KEY" in saved["key"]

        made = _cli("center", "token", "create", "--ttl", "1h", "--uses", "2", env=env)
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith(f"kvm1.{sha}.") and made.stdout.count("\n") == 1
        assert "for 2 join(s)" in made.stderr
        too_long = _cli("center", "token", "create", "--ttl", "2000h", env=env)
        assert too_long.returncode == 2 and too_long.stderr.startswith("kvmotion: error: invalid token request: ttl:")
    finally:
        center.close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    again = Center(port, data, env)  # a later start: nothing secret printed
    try:
        assert len(again.lines) == 1 and again.lines[0].startswith(f"kvmotion center serving {url} (CA SHA-256 {sha})")
        assert password not in "\n".join(again.lines) and "kvm1." not in "\n".join(again.lines)
    finally:
        again.close()
