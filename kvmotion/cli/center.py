"""`kvmotion center …`: run the control plane, manage join tokens."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from kvmotion.api.center import TokenCreate
from kvmotion.cli import centerops
from kvmotion.cli.common import console
from kvmotion.core.units import parse_duration

app = typer.Typer(no_args_is_help=True, help="The control plane: serve it, make join tokens for hosts.")
token = typer.Typer(no_args_is_help=True, help="Join tokens: what a host presents to join the cluster.")
app.add_typer(token, name="token")
cert = typer.Typer(no_args_is_help=True, help="Certificates signed with the center's CA, on the center's machine.")
app.add_typer(cert, name="cert")


@app.command()
def serve(
    listen: str = typer.Option(..., "--listen", help="ADDRESS:PORT hosts and users reach the center at, e.g. 10.0.0.5:7700."),
    data: Path | None = typer.Option(None, "--data", help="The center's data folder (default /var/lib/kvmotion/center)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no authentication: anyone who reaches the "
                                  "port owns the cluster (trusted networks and benchmarks only)."),
) -> None:
    """Run the center in the foreground. The first start creates the cluster CA, user admin (its
    password printed once) and a join token (printed); later starts print nothing secret."""
    from kvmotion.center.serve import serve as run  # fastapi and uvicorn: loaded only to serve (CLI start-up time)

    run(listen, data, insecure)


@token.command("create")
def token_create(
    ttl: str = typer.Option("24h", "--ttl", help="How long it may be used, e.g. 30m, 24h (1s to 30 days)."),
    uses: int | None = typer.Option(None, "--uses", help="How many hosts may join with it (default: any number until it expires)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make a join token (as an admin logged in with `kvmotion login`). The token goes to stdout."""
    request = TokenCreate(ttl=parse_duration(ttl), uses=uses)
    with centerops.client() as client:
        created = client.create_token(request)
    if json_out:
        print(created.model_dump_json(indent=2))
        return
    expires = dt.datetime.fromtimestamp(created.info.expires, dt.UTC)
    uses_text = "any number of joins" if created.info.uses_left is None else f"{created.info.uses_left} join(s)"
    print(f"join token {created.info.id}: valid until {expires:%Y-%m-%d %H:%M} UTC for {uses_text}", file=sys.stderr)
    print(created.token)


@token.command("ls")
def token_ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The join tokens (ids, expiry, joins left; never their secrets), as an admin."""
    with centerops.client() as client:
        tokens = client.tokens()
    if json_out:
        print("[" + ",".join(t.model_dump_json() for t in tokens) + "]")
        return
    now = time.time()
    table = Table("id", "expires (UTC)", "joins left", "created by")
    for t in tokens:
        expires = f"{dt.datetime.fromtimestamp(t.expires, dt.UTC):%Y-%m-%d %H:%M:%S}" + (" (expired)" if t.expires <= now else "")
        table.add_row(t.id, expires, "any" if t.uses_left is None else str(t.uses_left), t.created_by)
    console.print(table)


@token.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="The token's id (`kvmotion center token ls`).")) -> None:
    """Delete a join token, as an admin: no host joins with it any more (hosts that joined stay)."""
    with centerops.client() as client:
        client.delete_token(token_id)
    print(f"join token {token_id} revoked", file=sys.stderr)


@cert.command("datastore")
def cert_datastore(
    name: str = typer.Argument(..., help="The datastore's name, e.g. ds1."),
    ip: list[str] = typer.Option(..., "--ip", help="An address the datastore serves at (its certificate names it); repeat."),
    out: Path = typer.Option(..., "--out", help="Folder for its credentials (ca-cert.pem, server-*.pem, client-*.pem)."),
    data: Path | None = typer.Option(None, "--data", help="The center's data folder (default /var/lib/kvmotion/center)."),
) -> None:
    """Issue datastore NAME's certificate with the cluster CA (run where the center's data is, as
    root). Give the folder to the datastore (`kvmotion datastore serve NAME --cert-dir DIR`) over a
    channel you trust: it holds the datastore's private key. No host ever needs it."""
    from kvmotion.api.pki import CA_CERT, issue_datastore_cert
    from kvmotion.center.serve import default_data_dir
    from kvmotion.core.errors import NotFound

    folder = data or default_data_dir()
    if not (folder / "ca" / CA_CERT).exists():
        raise NotFound(f"no center data in {folder} (no ca/{CA_CERT}): start `kvmotion center serve` once, or give --data")
    issued = issue_datastore_cert(folder / "ca", name, ip, out)
    print(f"datastore:{name} for {', '.join(issued.ips)} in {issued.dir}, valid until {issued.expires:%Y-%m-%d}")
