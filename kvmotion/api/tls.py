"""Where the cluster's TLS material lives and how agents and the CLI use it.

Layout under the cluster folder (see kvmotion.api.inventory.cluster_dir), each identity's
folder in QEMU's tls-creds-x509 layout (ca-cert.pem, {server,client}-{cert,key}.pem):
    ca/ca-cert.pem, ca/ca-key.pem   the cluster CA (`kvmotion cluster init`)
    hosts/<host>/                   host:<host>, the agent (API, calls to peers and datastores)
    hosts/<host>/qemu/              qemu:<host>, its QEMUs (NBD and migration streams)
    datastores/<name>/              datastore:<name>
    users/<user>/                   user:<user> with a role, client only (the CLI)

An agent joined to the center (kvmotion.api.joined) keeps its own identities in its state root
(tls/ and tls/qemu/, the same layout) instead.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path

from kvmotion.api import joined, userconfig
from kvmotion.api.agent import AsyncAgentClient
from kvmotion.api.inventory import cluster_dir
from kvmotion.api.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY, QEMU_DIR, SERVER_CERT, SERVER_KEY
from kvmotion.core.errors import SetupError

DEFAULT_USER = "admin"  # `kvmotion cluster init` creates it, like vCenter's administrator


def host_dir(host: str) -> Path:
    root = joined.active()
    if root is not None and root.config().name == host:
        return root.tls_dir
    return cluster_dir() / "hosts" / host


def datastore_dir(name: str) -> Path:
    return cluster_dir() / "datastores" / name


def user_dir(user: str) -> Path:
    return cluster_dir() / "users" / user


def _need(d: Path, *names: str, hint: str) -> Path:
    missing = [n for n in names if not (d / n).exists()]
    if missing:
        raise SetupError(f"{d} lacks {', '.join(missing)}: {hint}")
    return d


def migration_creds_dir(host: str) -> Path:
    """The host's own folder (agent identity)."""
    return _need(host_dir(host), CA_CERT, SERVER_CERT, SERVER_KEY,
                 hint=f"issue the host's certificate with `kvmotion cluster cert {host} --ip ADDRESS`, "
                      "or run the agent with --insecure on a trusted network")


def qemu_creds_dir(host: str) -> Path:
    """The folder the host's QEMUs read their certificate from (tls-creds-x509 dir)."""
    return _need(host_dir(host) / QEMU_DIR, CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY,
                 hint=f"re-issue the host's certificate with `kvmotion cluster cert {host} --ip ADDRESS`")


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


def user_creds_dir() -> Path:
    """The CLI's credentials: $KVMOTION_CREDENTIALS (a folder), else the cluster folder's
    users/$KVMOTION_USER (default admin). Never a host's key."""
    explicit = os.environ.get("KVMOTION_CREDENTIALS")
    if explicit:
        d = Path(explicit)
    else:
        user = os.environ.get("KVMOTION_USER") or DEFAULT_USER
        d = user_dir(user)
    return _need(d, CA_CERT, CLIENT_CERT, CLIENT_KEY,
                 hint="issue a user's certificate with `kvmotion cluster user add NAME --role ROLE` and set "
                      "KVMOTION_USER=NAME (or KVMOTION_CREDENTIALS=FOLDER)")


def cli_ssl_context() -> ssl.SSLContext:
    """The CLI authenticates as a user: $KVMOTION_CREDENTIALS if set, else the login config's user
    when logged in to a center (kvmotion.api.userconfig), else the cluster folder's (user_creds_dir)."""
    if not os.environ.get("KVMOTION_CREDENTIALS") and userconfig.logged_in():
        return userconfig.user_ssl_context()
    return client_context(user_creds_dir())


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
