"""Where the cluster's TLS material lives and how agents and the CLI use it.

Layout under the cluster folder (see kvmotion.cluster.inventory.cluster_dir):
    ca/ca-cert.pem, ca/ca-key.pem           the cluster CA (`kvmotion cluster init`)
    hosts/<host>/                           QEMU tls-creds-x509 layout: ca-cert.pem,
                                            server-cert.pem, server-key.pem, client-cert.pem, client-key.pem
One certificate per host serves both ends: the agent's HTTPS API, the migration stream as server
(destination) and as client (source), and agent-to-agent calls.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from kvmotion.cluster.inventory import cluster_dir
from kvmotion.errors import SetupError
from kvmotion.host.client import AsyncAgentClient


def host_dir(host: str) -> Path:
    return cluster_dir() / "hosts" / host


def migration_creds_dir(host: str) -> Path:
    d = host_dir(host)
    if not (d / "server-cert.pem").exists():
        raise SetupError(
            f"host {host} has no cluster certificate in {d}: run `kvmotion cluster init` and "
            f"`kvmotion cluster cert {host} --ip ADDRESS`, or migrate with --plain on a trusted network"
        )
    return d


def qemu_creds_dir(host: str) -> Path:
    """The tls-creds-x509 folder QEMU reads for the migration stream, as its unprivileged user.
    For now the host's own folder, whose keys issue_host_cert makes readable to group kvmotion-qemu."""
    return migration_creds_dir(host)


def host_tls_files(host: str) -> tuple[Path, Path, Path]:
    """(certificate, key, CA) for serving the agent's API over mutual TLS."""
    d = migration_creds_dir(host)
    return d / "server-cert.pem", d / "server-key.pem", d / "ca-cert.pem"


def _client_context(cert_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert_dir / "ca-cert.pem"))
    ctx.load_cert_chain(str(cert_dir / "client-cert.pem"), str(cert_dir / "client-key.pem"))
    return ctx


def cli_ssl_context() -> ssl.SSLContext:
    """The CLI authenticates with the certificate of the host it runs on, or the cluster's `cli` identity."""
    for d in sorted((cluster_dir() / "hosts").glob("*")):
        if (d / "client-cert.pem").exists():
            return _client_context(d)
    raise SetupError(f"no client certificate under {cluster_dir() / 'hosts'}: run `kvmotion cluster cert cli`")


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
    return AsyncAgentClient(url, ssl_context=_client_context(migration_creds_dir(_own_host)))
