"""Which datastores the cluster knows: name -> NBD URL (and control URL), in a JSON file.

`nbds://` + `https://` for a datastore served over TLS (the default), `nbd://` + `http://` for one
served with --insecure.

`$KVMOTION_CLUSTER_DIR/datastores.json`, default `state_dir()/cluster/datastores.json`. A
stand-in until a cluster inventory exists; it may be folded into that later. In an agent joined to
the center (kvmotion.api.joined) the datastores are the center's, from the agent's cache; in a CLI
logged in to a center (kvmotion.api.userconfig), the center's, asked at GET /v1/datastores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api import joined, userconfig
from kvmotion.api.address import nbd_tls, parse_http_url, parse_nbd_url
from kvmotion.api.inventory import cluster_dir
from kvmotion.api.spec import check_name
from kvmotion.core.errors import Conflict, InvalidInput, NotFound
from kvmotion.core.files import write_atomic

FILE_VERSION = 1


@dataclass(frozen=True)
class DatastoreRef:
    """How to reach one datastore: NBD for VMs' disks, HTTP(S) for disks and leases."""

    name: str
    nbd_url: str
    control_url: str

    @property
    def tls(self) -> bool:
        return nbd_tls(self.nbd_url)

    @staticmethod
    def make(name: str, nbd_url: str, control_url: str | None = None) -> DatastoreRef:
        check_name(name, "datastore")
        nbd = parse_nbd_url(nbd_url)
        tls = nbd_tls(nbd_url)
        control = parse_http_url(control_url) if control_url else nbd.next_port()
        if control_url and control_url.startswith("https:") != tls:
            raise InvalidInput(f"datastore {name}: {nbd_url} and {control_url} disagree on TLS: use nbds:// with "
                               "https:// (or nbd:// with http:// for an --insecure datastore)")
        return DatastoreRef(name, nbd.url("nbds" if tls else "nbd"), control.url("https" if tls else "http"))


class Registry:
    def __init__(self, path: Path | None = None) -> None:
        self.joined = joined.active() if path is None else None
        self.center = path is None and self.joined is None and userconfig.logged_in()
        self.path = path or cluster_dir() / "datastores.json"

    def _load(self) -> dict[str, DatastoreRef]:
        if self.joined is not None:
            return {d.name: DatastoreRef(d.name, d.nbd_url, d.control_url) for d in self.joined.cache().datastores}
        if self.center:
            return {d.name: DatastoreRef(d.name, d.nbd_url, d.control_url) for d in userconfig.center_datastores()}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read {self.path}: {exc}; fix or remove the file") from None
        return {
            name: DatastoreRef(name, d["nbd_url"], d["control_url"])
            for name, d in data.get("datastores", {}).items()
        }

    def _save(self, refs: dict[str, DatastoreRef]) -> None:
        if self.joined is not None:
            raise Conflict(f"this host is joined to the center {self.joined.config().center}: the center keeps the "
                           "datastores (`kvmotion datastore add` as its admin)")
        if self.center:
            raise Conflict(f"logged in to a center ({userconfig.config_path()}): the center keeps the datastores "
                           "(`kvmotion datastore add` and `rm` go to it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": FILE_VERSION,
            "datastores": {
                r.name: {"nbd_url": r.nbd_url, "control_url": r.control_url}
                for r in sorted(refs.values(), key=lambda r: r.name)
            },
        }
        write_atomic(self.path, json.dumps(doc, indent=1))

    def all(self) -> list[DatastoreRef]:
        return sorted(self._load().values(), key=lambda r: r.name)

    def get(self, name: str) -> DatastoreRef:
        ref = self._load().get(name)
        if ref is None:
            raise NotFound(
                f"no datastore {name!r} in the cluster; add it with "
                f"`kvmotion datastore add {name} nbds://HOST:PORT`"
            )
        return ref

    def add(self, ref: DatastoreRef, replace: bool = False) -> None:
        refs = self._load()
        old = refs.get(ref.name)
        if old is not None and old != ref and not replace:
            raise Conflict(f"datastore {ref.name} is already registered as {old.nbd_url}; use --replace")
        refs[ref.name] = ref
        self._save(refs)

    def remove(self, name: str) -> None:
        refs = self._load()
        if refs.pop(name, None) is None:
            raise NotFound(f"no datastore {name!r} in the cluster")
        self._save(refs)
