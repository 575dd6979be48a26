"""Datastore addresses: `nbds://HOST[:PORT]` for data (NBD over TLS, as libnbd writes it) and
`https://HOST:PORT+1` for control; `nbd://` and `http://` for a datastore served with --insecure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from kvmotion.core.errors import InvalidInput

NBD_PORT = 10809  # IANA port for NBD
API_PREFIX = "/v1"  # control API paths
INSECURE_HOST_HEADER = "Kvmotion-Host"  # --insecure only: the host a lease call claims to be


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def nbd_url(self) -> str:
        return f"nbd://{self}"

    @property
    def http_url(self) -> str:
        return f"http://{self}"

    def url(self, scheme: str) -> str:
        return f"{scheme}://{self}"

    def next_port(self) -> Endpoint:
        """The control API's default place: the NBD port + 1."""
        return Endpoint(self.host, self.port + 1)


def _check_port(port: int, text: str) -> int:
    if not 0 < port < 65535:
        raise InvalidInput(f"invalid port in {text!r}: use 1-65534")
    return port


def parse_listen(text: str, default_port: int = NBD_PORT) -> Endpoint:
    """'10.77.0.1:10809', '0.0.0.0', '[::1]:10809' -> Endpoint."""
    host, port = text, str(default_port)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"invalid address {text!r}: use HOST:PORT (e.g. 10.77.0.1:10809)")
    return Endpoint(host, _check_port(int(port), text))


def parse_nbd_url(url: str) -> Endpoint:
    """'nbds://10.77.0.1:10809' or 'nbd://...' (no export path: the datastore, not a disk) -> Endpoint."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = parts._replace(netloc="")
    if parts.scheme not in ("nbd", "nbds") or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidInput(f"invalid datastore URL {url!r}: use nbds://HOST[:PORT] (nbd:// for an --insecure one)")
    return Endpoint(parts.hostname, _check_port(port or NBD_PORT, url))


def nbd_tls(url: str) -> bool:
    """Does this datastore URL speak NBD over TLS (nbds://)?"""
    return urlsplit(url).scheme == "nbds"


def parse_http_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"invalid control URL {url!r}: use https://HOST:PORT (http:// for an --insecure datastore)")
    return Endpoint(parts.hostname, _check_port(parts.port or (443 if parts.scheme == "https" else 80), url))


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
