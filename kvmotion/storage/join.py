"""`kvmotion datastore join`: a datastore's identity from the center, and its state root.

The root (default /var/lib/kvmotion/datastore, or $KVMOTION_DATASTORE_STATE):

    config.json     the center's URL, the datastore's name, address and NBD port (DatastoreConfig)
    tls/            datastore:NAME (tls-creds-x509 layout, kvmotion.api.pki): NBD and the control API
    disks/          the disk files (the default of `datastore serve --root`)

The key is made here and never leaves the machine; the center signs its CSR, with the CA pinned by
the token, and records the datastore (kvmotion.api.enroll, shared with `kvmotion host join`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, StrictInt, ValidationError

from kvmotion.api.address import NBD_PORT, Endpoint
from kvmotion.api.center import (
    CenterClient,
    DatastoreJoinAnswer,
    DatastoreJoinRequest,
    HostAddress,
    Name,
    TokenParts,
    Wire,
    parse_token,
)
from kvmotion.api.enroll import CONFIG_FILE, TLS_DIR, Signed, check_center_url, enroll, refuse_rejoin
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.pki import write_credentials
from kvmotion.api.spec import check_name
from kvmotion.core import paths
from kvmotion.core.errors import SetupError
from kvmotion.core.files import write_atomic

DATASTORE_STATE_ENV = "KVMOTION_DATASTORE_STATE"
DISKS_DIR = "disks"


def default_root() -> Path:
    explicit = os.environ.get(DATASTORE_STATE_ENV)
    return Path(explicit) if explicit else paths.state_dir() / "datastore"


class DatastoreConfig(Wire):
    """config.json: who this datastore is in which cluster."""

    _what: ClassVar[str] = "datastore config"
    version: int = 1
    center: str  # https://ADDRESS:PORT
    name: Name
    address: HostAddress  # where hosts reach it; its certificate names this address
    nbd_port: Annotated[StrictInt, Field(ge=1, le=65534)]  # the control API listens on the next one
    joined: float

    @property
    def listen(self) -> Endpoint:
        return Endpoint(self.address, self.nbd_port)


@dataclass(frozen=True)
class DatastoreRoot:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def tls_dir(self) -> Path:
        return self.path / TLS_DIR

    @property
    def disks(self) -> Path:
        return self.path / DISKS_DIR

    def is_joined(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> DatastoreConfig:
        try:
            return DatastoreConfig.model_validate_json(self.config_path.read_bytes())
        except FileNotFoundError:
            raise SetupError(f"{self.config_path} is missing: join the datastore with `kvmotion datastore join`") from None
        except PermissionError:
            raise SetupError(f"cannot read {self.config_path}: run as root") from None
        except (ValidationError, ValueError) as exc:
            raise SetupError(f"{self.config_path} is damaged ({str(exc).splitlines()[0]}): run `kvmotion datastore "
                             "join` again with --force") from None


def join(url: str, token: str, name: str, address: str, root: DatastoreRoot, *, nbd_port: int = NBD_PORT,
         more_addresses: tuple[str, ...] = (), force: bool = False, timeout: float = 30.0) -> DatastoreJoinAnswer:
    """Join the center at `url` as datastore `name`, served at `address`:`nbd_port` (its certificate
    naming `more_addresses` too), into `root`."""
    url = check_center_url(url)
    parts = parse_token(token)
    check_name(name, "datastore")
    refuse_rejoin(root, "datastore", "its disks", force)
    # Refused before a key is made or anything sent: a wrong name, address or port.
    DatastoreJoinRequest(token=str(parts), name=name, address=address, more_addresses=more_addresses, nbd_port=nbd_port,
                         csr="-")
    now = time.time()

    def ask(client: CenterClient, parts: TokenParts, csrs: tuple[str, ...]) -> DatastoreJoinAnswer:
        return client.join_datastore(DatastoreJoinRequest(token=str(parts), name=name, address=address,
                                                          more_addresses=more_addresses, nbd_port=nbd_port,
                                                          csr=csrs[0]))

    def write(stage: Path, signed: Signed[DatastoreJoinAnswer]) -> None:
        write_credentials(stage / TLS_DIR, signed.ca_pem.encode(), signed.answer.cert.encode(), signed.keys[0],
                          server=True)
        (stage / DISKS_DIR).mkdir(mode=0o755)
        config = DatastoreConfig(center=url, name=name, address=address, nbd_port=nbd_port, joined=now)
        write_atomic(stage / CONFIG_FILE, config.model_dump_json(indent=1) + "\n", 0o644)

    signed = enroll(url, token, root.path, (Identity(Kind.DATASTORE, name),), ask,
                    lambda a: (a.ca_cert, (a.cert,)), write, timeout)
    return signed.answer
