"""`kvmotion center serve`: the data folder, the first start, the listener.

DATA (default STATE/center, i.e. /var/lib/kvmotion/center; mode 0700):
    ca/ca-cert.pem, ca/ca-key.pem   the cluster CA (made on the first start, never replaced)
    tls/                            center:center, the center's own certificate (server and client:
                                    the dispatcher calls agents with it), for the address it listens on
    center.db (+ -wal, -shm)        the store (kvmotion.center.store)
    audit.log                       every mutating call, one JSON line each

The first start (a store without users) prints user admin's password and a join token, once.
Later starts print where the center serves and its CA's SHA-256, nothing secret.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509

from kvmotion.api.center import ClusterSettings
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY, init_ca, issue_cert
from kvmotion.api.serving import Security, insecure_warning, make_server
from kvmotion.api.tls import client_context
from kvmotion.center.app import QUIET_SUFFIXES, create_app
from kvmotion.center.auth import SCRYPT_LOG2_N
from kvmotion.center.dispatcher import Dispatcher, HttpAgents
from kvmotion.center.service import Center
from kvmotion.center.store import SqliteStore
from kvmotion.core import paths
from kvmotion.core.errors import InvalidInput, SetupError
from kvmotion.core.listen import listening_socket

CENTER_NAME = "center"  # the center's identity: center:center
RENEW_BEFORE = dt.timedelta(days=30)  # a center certificate closer to its end than this is re-issued


def default_data_dir() -> Path:
    return paths.state_dir() / "center"


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def shown(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, secure: bool) -> str:
        return f"{'https' if secure else 'http'}://{self.shown}"


def parse_listen(text: str) -> Listen:
    """'10.0.0.5:7700', '[fd00::5]:7700', 'mgmt.example:7700'. The address is the one clients dial and
    the center's certificate names: a wildcard (0.0.0.0, ::) is refused."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"invalid listen address {text!r}: use ADDRESS:PORT, e.g. 10.0.0.5:7700")
    if not _is_ip(host):
        Identity(Kind.HOST, host)  # a DNS name, or InvalidInput
    elif ipaddress.ip_address(host).is_unspecified:
        raise InvalidInput(f"cannot listen on {host}: hosts and users need the address they reach the center at "
                           "(its certificate names it); listen on the machine's own address")
    return Listen(host, int(port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _names(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        return set()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in san}


@dataclass(frozen=True)
class Prepared:
    center: Center
    security: Security
    lines: tuple[str, ...]  # what to print before serving
    first: bool


def prepare(data: Path, listen: Listen, insecure: bool, *, password_cost: int | None = None) -> Prepared:
    """The data folder ready to serve from: CA, the center's certificate for `listen`, the store;
    on the first start also user admin and a join token (in `lines`, printed once)."""
    if not data.exists():
        data.mkdir(parents=True, mode=0o700)  # an existing folder keeps its mode; what is secret inside is 0600/0700
    existed = (data / "ca" / CA_CERT).exists()
    ca = init_ca(data / "ca")
    tls = data / "tls"
    lines: list[str] = []
    if not (tls / SERVER_CERT).exists() or listen.host not in _names(tls / SERVER_CERT):
        ips: tuple[str, ...] = (listen.host,) if _is_ip(listen.host) else ()
        dns: tuple[str, ...] = () if ips else (listen.host,)
        issue_cert(data / "ca", Identity(Kind.CENTER, CENTER_NAME), ips, tls, server=True, dns=dns)
        if existed:
            lines.append(f"issued the center's certificate for {listen.host}")
    store = SqliteStore(data / "center.db")
    try:
        center = Center(store, ca, insecure=insecure, password_cost=password_cost or SCRYPT_LOG2_N)
        first = center.bootstrap(ClusterSettings(encrypted=not insecure))
    except BaseException:
        store.close()
        raise
    url = listen.url(not insecure)
    if first is not None:
        expires = dt.datetime.fromtimestamp(first.token_expires, dt.UTC)
        lines += [
            f"created the cluster CA in {ca.dir} (SHA-256 {center.ca_sha256})",
            f"user admin's password, shown this once: {first.admin_password}",
            f"  log in with: kvmotion login {url} --user admin --ca-sha256 {center.ca_sha256}",
            f"join token, valid until {expires:%Y-%m-%d %H:%M} UTC: {first.token}",
            f"  on each host: kvmotion host join {url} --token TOKEN --name NAME --address ADDRESS",
        ]
    lines.append(f"kvmotion center serving {url} (CA SHA-256 {center.ca_sha256}), data in {data}")
    security = Security(tls_files=None if insecure else (tls / SERVER_CERT, tls / SERVER_KEY, data / "ca" / CA_CERT),
                        audit_log=data / "audit.log", quiet=QUIET_SUFFIXES, insecure=insecure,
                        optional_client_cert=not insecure)
    return Prepared(center=center, security=security, lines=tuple(lines), first=first is not None)


def serve(listen_text: str, data: Path | None, insecure: bool, out: TextIO = sys.stdout) -> None:
    """Serve until signalled. The port is bound before anything is created: a busy port changes nothing."""
    listen = parse_listen(listen_text)
    sock = listening_socket(listen.host, listen.port, "the center")
    try:
        prepared = prepare(data or default_data_dir(), listen, insecure)
    except PermissionError as exc:
        sock.close()
        raise SetupError(f"cannot write the center's data in {exc.filename}: {exc.strerror}; run as root or give --data") from None
    except BaseException:
        sock.close()
        raise
    if insecure:
        print(insecure_warning(f"the center on {listen.shown}"), file=sys.stderr, flush=True)
    for line in prepared.lines:
        print(line, file=out, flush=True)
    tls = (data or default_data_dir()) / "tls"
    agents = HttpAgents(None if insecure else client_context(tls))  # as center:center, the center's own certificate
    dispatcher = Dispatcher(prepared.center.store, agents, clock=prepared.center.clock)
    server = make_server(create_app(prepared.center, dispatcher=dispatcher), prepared.security, "center", lifespan="on")
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        prepared.center.store.close()
        sock.close()
