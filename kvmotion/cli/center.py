"""`kvmotion center …`: run the control plane, make join tokens."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import typer

from kvmotion.api.center import TokenCreate
from kvmotion.api.userconfig import load_credentials
from kvmotion.api.web import SigninToken, create_signin_token
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
    ttl: str = typer.Option("24h", "--ttl", help="How long it may be used, e.g. 30m, 24h (1m to 30 days)."),
    uses: int | None = typer.Option(None, "--uses", help="How many hosts may join with it (default: any number until it expires)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make a join token (as an admin logged in with `kvmotion login`). The token goes to stdout."""
    request = TokenCreate(ttl=parse_duration(ttl), uses=uses)
    with load_credentials().client() as client:
        created = client.create_token(request)
    if json_out:
        print(created.model_dump_json(indent=2))
        return
    expires = dt.datetime.fromtimestamp(created.info.expires, dt.UTC)
    uses_text = "any number of joins" if created.info.uses_left is None else f"{created.info.uses_left} join(s)"
    print(f"join token {created.info.id}: valid until {expires:%Y-%m-%d %H:%M} UTC for {uses_text}", file=sys.stderr)
    print(created.token)


@app.command("web-token")
def web_token(
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Sign in to the web client without typing a password: a one-time link for your own user
    (as logged in with `kvmotion login`), valid 5 minutes. Open it in a browser; the link goes to stdout."""
    credentials = load_credentials()
    with credentials.client() as client:
        made: SigninToken = client.call(create_signin_token())
    if json_out:
        print(made.model_dump_json(indent=2))
        return
    expires = dt.datetime.fromtimestamp(made.expires, dt.UTC)
    print(f"one-time sign-in link for the web client, valid until {expires:%H:%M:%S} UTC:", file=sys.stderr)
    print(credentials.center.rstrip("/") + made.path)


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
