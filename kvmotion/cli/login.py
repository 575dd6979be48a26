"""`kvmotion login URL --user NAME`: a user certificate from the center, kept in the CLI's config.

The config (~/.config/kvmotion/config, or $KVMOTION_CONFIG) is one JSON file, mode 0600, holding
the center's URL, its CA, the user's certificate and key: like a kubeconfig, copy it and you are
that user. The key is made here and never leaves this machine; the center signs a CSR for it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import sys
from pathlib import Path

import typer

from kvmotion.api.center import CenterClient, Credentials, LoginRequest, pinned_ca, trusting
from kvmotion.api.identity import check_user_name
from kvmotion.api.pki import new_key_and_csr
from kvmotion.api.userconfig import config_path
from kvmotion.core.errors import InvalidInput
from kvmotion.core.files import write_atomic


def save_credentials(creds: object, path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    write_atomic(path, json.dumps(dataclasses.asdict(creds), indent=2) + "\n", 0o600)  # type: ignore[call-overload]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    else:
        password = typer.prompt("Password", hide_input=True)
    if not password:
        raise InvalidInput("empty password")
    return password


def app(
    url: str = typer.Argument(..., help="The center, e.g. https://10.0.0.5:7700."),
    user: str = typer.Option(..., "--user", help="Your user name at the center."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin's first line."),
    ca_sha256: str | None = typer.Option(None, "--ca-sha256", help="The center's CA SHA-256 (printed by "
                                            "`kvmotion center serve`): required unless you confirm it at a prompt."),
) -> None:
    """Log in to the center: get a certificate with your role, and keep it in the CLI's config."""
    check_user_name(user)
    if not re.fullmatch(r"https?://[^/?#]+/?", url):
        raise InvalidInput(f"invalid center URL {url!r}: use https://ADDRESS:PORT")
    if ca_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}|([0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}", ca_sha256):
        raise InvalidInput(f"invalid --ca-sha256 {ca_sha256!r}: 64 hex digits (colons allowed)")
    pin = ca_sha256.replace(":", "").lower() if ca_sha256 else None
    info = pinned_ca(url, pin)
    if pin is None:
        if password_stdin or not sys.stdin.isatty():
            raise InvalidInput("give --ca-sha256 (printed by `kvmotion center serve`) to trust the center without a prompt")
        typer.echo(f"The center's CA has SHA-256 {info.sha256}")
        if not typer.confirm("Is that the one `kvmotion center serve` printed?"):
            raise InvalidInput("login cancelled: the CA was not confirmed")
    password = _read_password(password_stdin)
    key_pem, csr_pem = new_key_and_csr(f"login {user}")
    context = trusting(info.ca_cert) if url.startswith("https:") else None
    with CenterClient(url, context) as client:
        answer = client.login(LoginRequest(user=user, password=password, csr=csr_pem))
    path = config_path()
    save_credentials(Credentials(center=url.rstrip("/"), user=answer.user, ca_cert=answer.ca_cert, cert=answer.cert,
                                 key=key_pem.decode()), path)
    until = dt.datetime.fromtimestamp(answer.expires, dt.UTC)
    typer.echo(f"logged in to {url.rstrip('/')} as user:{answer.user} ({answer.role.value}), "
               f"certificate valid until {until:%Y-%m-%d %H:%M} UTC; credentials in {path}")
