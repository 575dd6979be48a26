"""Joining a center with a token, for any machine that needs certificates from it (a host, a datastore).

The center's CA is fetched first and checked against the SHA-256 the token carries; only then is
anything sent. The keys are made here and never leave the machine: the center signs a CSR per key.
Everything is written into a temporary folder beside the machine's state root and moved into place
at the end (config.json last, which makes the root joined): a refused or failed join leaves nothing.
The callers (kvmotion.host.join, kvmotion.storage.join) say what to ask and what to write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from kvmotion.api.center import CenterClient, TokenParts, is_base_url, parse_token, pinned_ca, trusting
from kvmotion.api.identity import Identity
from kvmotion.api.pki import check_issued, new_key_and_csr
from kvmotion.core.errors import Conflict, InvalidInput, SetupError

CONFIG_FILE = "config.json"  # what makes a state root joined: written last
TLS_DIR = "tls"  # the machine's identity (tls-creds-x509 layout, kvmotion.api.pki); replaced by a re-join
A = TypeVar("A")


@dataclass(frozen=True)
class Signed(Generic[A]):
    """The center's answer, checked: `keys[i]` is the key of the certificate for `who[i]`."""

    answer: A
    ca_pem: str
    keys: tuple[bytes, ...]


class JoinedRoot(Protocol):
    """A state root a join writes (a host's, a datastore's)."""

    path: Path

    def is_joined(self) -> bool: ...

    def config(self) -> Any: ...  # its config.json, with .name and .center


def refuse_rejoin(root: JoinedRoot, what: str, keeps: str, force: bool) -> None:
    """A joined root is joined again only with --force (Conflict naming what it is joined as)."""
    if not root.is_joined() or force:
        return
    try:
        was = root.config()
        joined = f"as {what} {was.name} to {was.center}"
    except SetupError:
        joined = "(its config.json is damaged)"
    raise Conflict(f"{root.path} is joined already {joined}: give --force to join again ({keeps} stay)")


def check_center_url(url: str) -> str:
    if not is_base_url(url, ("https", "http")):
        raise InvalidInput(f"invalid center URL {url!r}: use https://ADDRESS:PORT (as `kvmotion center serve` prints it)")
    return url.rstrip("/")


def enroll(
    url: str,
    token: str,
    root: Path,
    who: Sequence[Identity],
    ask: Callable[[CenterClient, TokenParts, tuple[str, ...]], A],
    issued: Callable[[A], tuple[str, tuple[str, ...]]],
    write: Callable[[Path, Signed[A]], None],
    timeout: float = 30.0,
) -> Signed[A]:
    """Join the center at `url` with `token` into the state root `root`: one key and CSR per
    identity in `who`; `ask` sends the CSRs (in that order) and returns the center's answer;
    `issued` gives the answer's (CA, certificates in that order), each checked against its key and
    identity; `write` fills the staging folder, which then becomes `root`."""
    url = check_center_url(url)
    parts = parse_token(token)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.join-"))
    except PermissionError as exc:
        raise SetupError(f"cannot write the state in {exc.filename}: {exc.strerror}; run as root or give "
                         "--state-dir") from None
    try:
        ca = pinned_ca(url, parts.ca_sha256, timeout)
        made = [new_key_and_csr(f"join {w}") for w in who]
        with CenterClient(url, trusting(ca.ca_cert) if url.startswith("https:") else None, timeout) as client:
            answer = ask(client, parts, tuple(csr for _, csr in made))
        ca_pem, certs = issued(answer)
        if ca_pem.strip() != ca.ca_cert.strip():
            raise InvalidInput("the center answered the join with another CA than the one pinned: nothing was kept")
        for cert, (key, _), identity in zip(certs, made, who, strict=True):
            check_issued(cert, key, ca.ca_cert, identity)
        os.chmod(stage, 0o755)  # processes of other users (QEMU) may reach folders inside it
        write(stage, Signed(answer=answer, ca_pem=ca.ca_cert, keys=tuple(key for key, _ in made)))
        _move_into_place(stage, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Signed(answer=answer, ca_pem=ca.ca_cert, keys=tuple(key for key, _ in made))


def _move_into_place(stage: Path, target: Path) -> None:
    """`stage` becomes `target`: one rename when `target` is missing or empty; into an existing root
    (a re-join, or state kept from before) the new TLS folder replaces the old one, other folders
    the root has already are kept, files are replaced, and config.json comes last."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(stage, target)
        return
    old_tls = target / f".{TLS_DIR}.old"
    shutil.rmtree(old_tls, ignore_errors=True)
    if (target / TLS_DIR).exists():
        os.replace(target / TLS_DIR, old_tls)
    for entry in sorted(stage.iterdir()):
        if entry.name == CONFIG_FILE or (entry.is_dir() and entry.name != TLS_DIR and (target / entry.name).exists()):
            continue
        os.replace(entry, target / entry.name)
    os.replace(stage / CONFIG_FILE, target / CONFIG_FILE)
    shutil.rmtree(old_tls, ignore_errors=True)
