"""`kvmotion cluster init|cert|show`: the cluster CA (encrypted migration, mutual-TLS agent API) and settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kvmotion.errors import InvalidInput

app = typer.Typer(no_args_is_help=True, help="The cluster: its CA, host certificates and settings.")
console = Console()

_CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _folder(folder: Optional[Path]) -> Path:
    from kvmotion.cluster.inventory import cluster_dir

    return folder if folder is not None else cluster_dir()


@app.command()
def init(
    folder: Optional[Path] = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
    plain: bool = typer.Option(False, "--plain", help="No encryption: migrations and agent API in clear (trusted network only)."),
    cpu_baseline: Optional[str] = typer.Option(None, "--cpu-baseline", help="CPU model every VM gets unless it names one (like EVC)."),
) -> None:
    """Create the cluster CA and settings. Re-running keeps an existing CA and rewrites the settings."""
    from kvmotion.cluster.ca import CA_CERT, init_ca
    from kvmotion.cluster.config import ClusterConfig, save_config

    if cpu_baseline is not None and not _CPU_MODEL_RE.fullmatch(cpu_baseline):
        raise InvalidInput(f"invalid CPU model {cpu_baseline!r}: use a QEMU model name such as Haswell-v4 or qemu64")
    d = _folder(folder)
    if not plain:
        existed = (d / "ca" / CA_CERT).exists()
        ca = init_ca(d / "ca")
        verb = "kept existing" if existed else "created"
        console.print(f"{verb} cluster CA {ca.subject} in {ca.dir}")
        console.print(f"  SHA-256 {ca.fingerprint}, valid until {ca.expires:%Y-%m-%d}")
    path = save_config(ClusterConfig(encrypted=not plain, cpu_baseline=cpu_baseline), d)
    mode = "PLAIN (unencrypted, trusted network only)" if plain else "encrypted (mutual TLS)"
    console.print(f"cluster settings in {path}: migrations {mode}" + (f", CPU baseline {cpu_baseline}" if cpu_baseline else ""))
    if not plain:
        console.print("next: `kvmotion cluster cert HOST --ip ADDRESS` for each host")


@app.command()
def cert(
    host: str = typer.Argument(..., help="Host name (the agent's name; also the TLS name peers check)."),
    ip: Optional[list[str]] = typer.Option(None, "--ip", help="An address peers reach the host at (repeatable)."),
    folder: Optional[Path] = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """Issue HOST's certificate (server and client) into the cluster folder's hosts/HOST."""
    from kvmotion.cluster.ca import issue_host_cert

    d = _folder(folder)
    creds = issue_host_cert(d / "ca", host, ip or [], d / "hosts" / host)
    names = ", ".join((host,) + creds.ips)
    console.print(f"issued {host}'s certificate for {names} in {creds.dir}, valid until {creds.expires:%Y-%m-%d}")


@app.command()
def show(
    folder: Optional[Path] = typer.Option(None, "--dir", help="Cluster folder (default: $KVMOTION_CLUSTER_DIR or STATE/cluster)."),
) -> None:
    """The cluster's settings, CA and host certificates."""
    from cryptography import x509

    from kvmotion.cluster.ca import CA_CERT, SERVER_CERT, load_ca
    from kvmotion.cluster.config import load_config

    d = _folder(folder)
    config = load_config(d)
    console.print(f"cluster folder {d}: migrations {'encrypted' if config.encrypted else 'PLAIN'}"
                  + (f", CPU baseline {config.cpu_baseline}" if config.cpu_baseline else ""))
    if not (d / "ca" / CA_CERT).exists():
        console.print("no cluster CA (run `kvmotion cluster init`)")
        return
    ca = load_ca(d / "ca")
    console.print(f"CA {ca.subject}, SHA-256 {ca.fingerprint}, valid until {ca.expires:%Y-%m-%d}")
    for host_dir in sorted((d / "hosts").glob("*")):
        path = host_dir / SERVER_CERT
        if not path.exists():
            continue
        c = x509.load_pem_x509_certificate(path.read_bytes())
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
        console.print(f"  {host_dir.name}: {', '.join(names)}; valid until {c.not_valid_after_utc:%Y-%m-%d}")
