"""Which datastores the cluster knows: name -> NBD URL (and control URL). The center keeps them: in
an agent joined to the center (kvmotion.api.joined) the agent's cache says them; in a CLI logged in
to a center (kvmotion.api.userconfig), GET /v1/datastores.

`nbds://` + `https://` for a datastore served over TLS (the default), `nbd://` + `http://` for one
served with --insecure.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.api import joined, userconfig
from kvmotion.api.address import nbd_tls, parse_http_url, parse_nbd_url
from kvmotion.api.inventory import not_in_a_cluster
from kvmotion.api.spec import check_name
from kvmotion.core.errors import InvalidInput, NotFound


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
    """The cluster's datastores: the center's (from the joined agent's cache, or asked by a logged-in CLI)."""

    def _load(self) -> dict[str, DatastoreRef]:
        root = joined.active()
        if root is not None:
            views = root.cache().datastores
        elif userconfig.logged_in():
            views = userconfig.center_datastores()
        else:
            raise not_in_a_cluster()
        return {d.name: DatastoreRef(d.name, d.nbd_url, d.control_url) for d in views}

    def all(self) -> list[DatastoreRef]:
        return sorted(self._load().values(), key=lambda r: r.name)

    def get(self, name: str) -> DatastoreRef:
        ref = self._load().get(name)
        if ref is None:
            raise NotFound(f"no datastore {name!r} in the cluster; join it with `kvmotion datastore join` "
                           f"(or, as an admin, `kvmotion datastore add {name} nbds://HOST:PORT`)")
        return ref
