"""`kvmotion center …`: run the control plane, manage join tokens, add users."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from kvmotion.api.center import TokenCreate, UserAdd
from kvmotion.api.identity import Role
from kvmotion.api.userconfig import load_credentials
from kvmotion.api.web import SigninToken, create_signin_token
from kvmotion.cli import centerops
from kvmotion.cli.common import console
from kvmotion.core.units import parse_duration

app = typer.Typer(no_args_is_help=True, help="The control plane: serve it, make join tokens for hosts.")
token = typer.Typer(no_args_is_help=True, help="Join tokens: what a host presents to join the cluster.")
app.add_typer(token, name="token")


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


users = typer.Typer(no_args_is_help=True, help="The center's users and their roles (admins only).")
app.add_typer(users, name="user")


@users.command("add")
def user_add(
    name: str,
    role: Role = typer.Option(..., "--role", help="viewer: reads; operator: also changes VMs and migrates; admin: all."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin's first line "
                                        "(default: the center makes one and it is printed once)."),
) -> None:
    """Add a user, who then logs in with `kvmotion login URL --user NAME`."""
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    with load_credentials().client() as client:
        added = client.add_user(UserAdd(name=name, role=role, password=password))
    print(f"user {added.user.name} added with role {added.user.role.value}", file=sys.stderr)
    if added.password is not None:
        print(added.password)  # the one the center made: shown this once


@users.command("ls")
def user_ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The center's users and their roles."""
    with load_credentials().client() as client:
        listed = client.users()
    if json_out:
        print("[" + ",".join(u.model_dump_json() for u in listed) + "]")
        return
    for u in listed:
        print(f"{u.name:<20} {u.role.value:<9} since {dt.datetime.fromtimestamp(u.created, dt.UTC):%Y-%m-%d %H:%M} UTC")
