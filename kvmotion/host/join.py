"""`kvmotion host join`: this host's identity from the center, and its state root (kvmotion.api.joined).

The keys are made here and never leave the host: the center signs a CSR for the agent's key
(host:NAME) and one for its QEMUs' (qemu:NAME). Before the token is sent, the center's CA is
fetched and checked against the SHA-256 the token carries. Everything is written into a temporary
folder beside the root and moved into place at the end: a refused or failed join leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.center import (
    AGENT_PORT,
    CenterClient,
    JoinAnswer,
    JoinRequest,
    is_base_url,
    parse_token,
    pinned_ca,
    trusting,
)
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.joined import CACHE_FILE, CONFIG_FILE, LOCAL_DIRS, TLS_DIR, ClusterCache, JoinedConfig, StateRoot
from kvmotion.api.pki import QEMU_DIR, check_issued, new_key_and_csr, write_credentials
from kvmotion.api.spec import check_name
from kvmotion.core.errors import Conflict, InvalidInput, SetupError
from kvmotion.core.files import write_atomic


@dataclass(frozen=True)
class Joined:
    root: StateRoot
    config: JoinedConfig
    answer: JoinAnswer


def check_center_url(url: str) -> str:
    if not is_base_url(url, ("https", "http")):
        raise InvalidInput(f"invalid center URL {url!r}: use https://ADDRESS:PORT (as `kvmotion center serve` prints it)")
    return url.rstrip("/")


def join(url: str, token: str, name: str, address: str, root: StateRoot, *, agent_port: int = AGENT_PORT,
         force: bool = False, qemu_key_gid: int | None = None, timeout: float = 30.0) -> Joined:
    """Join the center at `url` as host `name`, reachable at `address`, into `root`."""
    url = check_center_url(url)
    parts = parse_token(token)
    check_name(name, "host")
    if root.is_joined() and not force:
        try:
            was = root.config()
            what = f"as host {was.name} to {was.center}"
        except SetupError:
            what = "(its config.json is damaged)"
        raise Conflict(f"{root.path} is joined already {what}: give --force to join again (its VMs stay)")
    # Refused before any key is made or anything sent: a wrong name or address, an unwritable root.
    JoinRequest(token=str(parts), name=name, address=address, agent_port=agent_port, host_csr="-", qemu_csr="-")
    try:
        root.path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=root.path.parent, prefix=f".{root.path.name}.join-"))
    except PermissionError as exc:
        raise SetupError(f"cannot write the host's state in {exc.filename}: {exc.strerror}; run as root or give "
                         "--state-dir") from None
    try:
        ca = pinned_ca(url, parts.ca_sha256, timeout)
        host_key, host_csr = new_key_and_csr(f"join {name}")
        qemu_key, qemu_csr = new_key_and_csr(f"join {name} qemu")
        request = JoinRequest(token=str(parts), name=name, address=address, agent_port=agent_port, host_csr=host_csr,
                              qemu_csr=qemu_csr)
        with CenterClient(url, trusting(ca.ca_cert) if url.startswith("https:") else None, timeout) as client:
            answer = client.join(request)
        if answer.ca_cert.strip() != ca.ca_cert.strip():
            raise InvalidInput("the center answered the join with another CA than the one pinned: nothing was kept")
        check_issued(answer.host_cert, host_key, ca.ca_cert, Identity(Kind.HOST, name))
        check_issued(answer.qemu_cert, qemu_key, ca.ca_cert, Identity(Kind.QEMU, name))
        now = time.time()
        config = JoinedConfig(center=url, name=name, address=answer.host.address, agent_port=agent_port, joined=now)
        cache = ClusterCache(settings=answer.settings, hosts=(answer.host,), updated=now)

        os.chmod(stage, 0o755)  # QEMU (its own user) reaches tls/qemu/ and disks/ through it
        ca_pem = ca.ca_cert.encode()
        write_credentials(stage / TLS_DIR, ca_pem, answer.host_cert.encode(), host_key, server=True)
        write_credentials(stage / TLS_DIR / QEMU_DIR, ca_pem, answer.qemu_cert.encode(), qemu_key, server=True,
                          key_gid=qemu_key_gid)
        for folder in LOCAL_DIRS:
            (stage / folder).mkdir(mode=0o755)
        StateRoot(stage).save_cache(cache)
        write_atomic(stage / CONFIG_FILE, config.model_dump_json(indent=1) + "\n", 0o644)
        _move_into_place(stage, root.path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Joined(root=root, config=config, answer=answer)


def _move_into_place(stage: Path, target: Path) -> None:
    """`stage` becomes `target`: one rename when `target` is missing or empty; into an existing root
    (a re-join, or VMs kept from before) the new TLS folder replaces the old one and config.json,
    which makes the root joined, comes last."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(stage, target)
        return
    old_tls = target / f".{TLS_DIR}.old"
    shutil.rmtree(old_tls, ignore_errors=True)
    if (target / TLS_DIR).exists():
        os.replace(target / TLS_DIR, old_tls)
    os.replace(stage / TLS_DIR, target / TLS_DIR)
    for folder in LOCAL_DIRS:
        if not (target / folder).exists():
            os.replace(stage / folder, target / folder)
    os.replace(stage / CACHE_FILE, target / CACHE_FILE)
    os.replace(stage / CONFIG_FILE, target / CONFIG_FILE)
    shutil.rmtree(old_tls, ignore_errors=True)
