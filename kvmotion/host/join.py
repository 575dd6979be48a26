"""`kvmotion host join`: this host's identity from the center, and its state root (kvmotion.api.joined).

The keys are made here and never leave the host: the center signs a CSR for the agent's key
(host:NAME) and one for its QEMUs' (qemu:NAME), with the CA pinned by the token and the root
written whole or not at all (kvmotion.api.enroll).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.center import AGENT_PORT, CenterClient, JoinAnswer, JoinRequest, TokenParts, parse_token
from kvmotion.api.enroll import CONFIG_FILE, TLS_DIR, Signed, check_center_url, enroll, refuse_rejoin
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.joined import LOCAL_DIRS, ClusterCache, JoinedConfig, StateRoot
from kvmotion.api.pki import QEMU_DIR, write_credentials
from kvmotion.api.spec import check_name
from kvmotion.core.files import write_atomic


@dataclass(frozen=True)
class Joined:
    root: StateRoot
    config: JoinedConfig
    answer: JoinAnswer


def join(url: str, token: str, name: str, address: str, root: StateRoot, *, agent_port: int = AGENT_PORT,
         force: bool = False, qemu_key_gid: int | None = None, timeout: float = 30.0) -> Joined:
    """Join the center at `url` as host `name`, reachable at `address`, into `root`."""
    url = check_center_url(url)
    parts = parse_token(token)
    check_name(name, "host")
    refuse_rejoin(root, "host", "its VMs", force)
    # Refused before any key is made or anything sent: a wrong name or address, an unwritable root.
    JoinRequest(token=str(parts), name=name, address=address, agent_port=agent_port, host_csr="-", qemu_csr="-")

    def ask(client: CenterClient, parts: TokenParts, csrs: tuple[str, ...]) -> JoinAnswer:
        return client.join(JoinRequest(token=str(parts), name=name, address=address, agent_port=agent_port,
                                       host_csr=csrs[0], qemu_csr=csrs[1]))

    def write(stage: Path, signed: Signed[JoinAnswer]) -> None:
        answer, (host_key, qemu_key) = signed.answer, signed.keys
        ca_pem = signed.ca_pem.encode()
        write_credentials(stage / TLS_DIR, ca_pem, answer.host_cert.encode(), host_key, server=True)
        write_credentials(stage / TLS_DIR / QEMU_DIR, ca_pem, answer.qemu_cert.encode(), qemu_key, server=True,
                          key_gid=qemu_key_gid)
        for folder in LOCAL_DIRS:
            (stage / folder).mkdir(mode=0o755)
        StateRoot(stage).save_cache(ClusterCache(settings=answer.settings, hosts=(answer.host,), updated=now))
        write_atomic(stage / CONFIG_FILE, config(answer).model_dump_json(indent=1) + "\n", 0o644)

    def config(answer: JoinAnswer) -> JoinedConfig:
        return JoinedConfig(center=url, name=name, address=answer.host.address, agent_port=agent_port, joined=now)

    now = time.time()
    signed = enroll(url, token, root.path, (Identity(Kind.HOST, name), Identity(Kind.QEMU, name)), ask,
                    lambda a: (a.ca_cert, (a.host_cert, a.qemu_cert)), write, timeout)
    return Joined(root=root, config=config(signed.answer), answer=signed.answer)
