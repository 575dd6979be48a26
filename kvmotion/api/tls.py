"""Where an agent's and the CLI's TLS material lives and how they use it.

An agent joined to the center (kvmotion.api.joined) keeps its identities in its state root, each
in QEMU's tls-creds-x509 layout (ca-cert.pem, {server,client}-{cert,key}.pem):
    tls/        host:<host>, the agent (API, calls to peers and datastores)
    tls/qemu/   qemu:<host>, its QEMUs (NBD and migration streams)
The CLI presents the user certificate of its login (kvmotion.api.userconfig).
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

from kvmotion.api import joined, userconfig
from kvmotion.api.agent import AsyncAgentClient
from kvmotion.api.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY, QEMU_DIR, SERVER_CERT, SERVER_KEY
from kvmotion.core.errors import SetupError


def host_dir(host: str) -> Path:
    """The identity folder of `host`, whose joined state root this process serves."""
    root, name = joined.active(), joined.active_name()
    if root is None:
        raise SetupError(f"no joined state root is served in this process: host {host}'s certificate comes from "
                         "`kvmotion host join`")
    if name != host:
        raise SetupError(f"this process serves host {name}, not {host}: a host's keys stay on that host")
    return root.tls_dir


def _need(d: Path, *names: str, hint: str) -> Path:
    missing = [n for n in names if not (d / n).exists()]
    if missing:
        raise SetupError(f"{d} lacks {', '.join(missing)}: {hint}")
    return d


def migration_creds_dir(host: str) -> Path:
    """The host's own folder (agent identity)."""
    return _need(host_dir(host), CA_CERT, SERVER_CERT, SERVER_KEY,
                 hint="join the host again with `kvmotion host join --force`, or run the agent with --insecure "
                      "under an --insecure center")


def qemu_creds_dir(host: str) -> Path:
    """The folder the host's QEMUs read their certificate from (tls-creds-x509 dir)."""
    return _need(host_dir(host) / QEMU_DIR, CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY,
                 hint="join the host again with `kvmotion host join --force`")


def host_tls_files(host: str) -> tuple[Path, Path, Path]:
    """(certificate, key, CA) for serving the agent's API over mutual TLS."""
    d = migration_creds_dir(host)
    return d / SERVER_CERT, d / SERVER_KEY, d / CA_CERT


@functools.lru_cache(maxsize=16)
def _client_context(cert_dir: Path, mtime: float) -> ssl.SSLContext:
    """One context per credentials folder (building one costs milliseconds of CPU: never inside a
    switchover pause); `mtime` makes a re-issued certificate take effect."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert_dir / CA_CERT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_dir / CLIENT_CERT), str(cert_dir / CLIENT_KEY))
    return ctx


def client_context(cert_dir: Path) -> ssl.SSLContext:
    d = _need(cert_dir, CA_CERT, CLIENT_CERT, CLIENT_KEY, hint="not a kvmotion credentials folder")
    return _client_context(d, (d / CLIENT_CERT).stat().st_mtime)


def cli_ssl_context() -> ssl.SSLContext:
    """The CLI authenticates as the user of its login (`kvmotion login`)."""
    return userconfig.user_ssl_context()


def host_ssl_context(host: str) -> ssl.SSLContext:
    """An agent's client side: host:<host> towards peers and datastores."""
    return client_context(migration_creds_dir(host))


_own_host: str | None = None


def set_own_host(name: str) -> None:
    """The agent's identity for agent-to-agent calls."""
    global _own_host
    _own_host = name


def agent_client(url: str) -> AsyncAgentClient:
    """Client for another agent; over HTTPS it presents this host's certificate."""
    if not url.startswith("https"):
        return AsyncAgentClient(url)
    if _own_host is None:
        return AsyncAgentClient(url, ssl_context=cli_ssl_context())
    return AsyncAgentClient(url, ssl_context=host_ssl_context(_own_host))
