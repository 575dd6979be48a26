"""Test helpers: a throw-away cluster CA with certificates for any identity, and an ASGI wrapper
that presents one of them the way the TLS listener does (scope["extensions"]["tls"])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import CLIENT_CERT, CLIENT_KEY, init_ca, issue_cert


@dataclass(frozen=True)
class Creds:
    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / CLIENT_CERT

    @property
    def key(self) -> Path:
        return self.dir / CLIENT_KEY

    @property
    def pem(self) -> str:
        return self.cert.read_text()


class TestCA:
    """`ca.creds(Identity(...))` issues (once) and returns that identity's folder."""

    __test__ = False  # not a pytest class

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        init_ca(self.ca_dir)
        self._issued: dict[Identity, Creds] = {}

    def creds(self, who: Identity, ips: tuple[str, ...] = ("127.0.0.1",)) -> Creds:
        if who not in self._issued:
            out = self.root / f"{who.kind.value}-{who.name}"
            issue_cert(self.ca_dir, who, ips, out, server=who.kind is not Kind.USER)
            self._issued[who] = Creds(out)
        return self._issued[who]

    def user(self, name: str, role: Role) -> Creds:
        return self.creds(Identity(Kind.USER, name, role))

    def host(self, name: str) -> Creds:
        return self.creds(Identity(Kind.HOST, name))


def as_caller(app, pem: str | None):
    """`app` seen by a client presenting the certificate `pem` (None: no certificate)."""

    async def wrapped(scope, receive, send):
        if pem is not None and scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
        await app(scope, receive, send)

    return wrapped
