"""How a VM's QEMU attaches a datastore disk: QEMU's own NBD client, as `-blockdev json:...`.

The export name is `DISK@HOST`, the host the QEMU runs on: over TLS (an `nbds://` datastore) the
datastore opens it only for a client whose certificate is host:HOST's or qemu:HOST's; QEMU
presents the host's QEMU identity through a `tls-creds-x509` object (`nbd_tls_object`, on the
command line of every VM with datastore disks, so blockdev-add finds it later too). The datastore
lets the connection write only while HOST holds the disk's lease under the generation of the
connection's first write (see lease.check_write). So a destination's shadow VM may connect long
before the switchover and still cannot write until `transfer()` has given its host the lease;
and a connection that wrote under an older generation stays refused, even if the lease comes
back, until QEMU opens a new connection.

Reconnection (QEMU's NBD client, block/nbd.c):
- `reconnect-delay`: when the connection drops (datastore restart, network blip) QEMU keeps the
  guest's requests queued for this many seconds while it reconnects, instead of failing them at
  once (the default, 0). QEMU's connection thread does not retry at will: it sleeps 1, 2, 4, 8,
  then 16 s between attempts (nbd/client-connection.c), so it tries 1, 3, 7, 15, 31, 47, ... s
  after the drop. Measured with a guest writing: a 2.6 s restart passed unseen; with the delay at
  15 s, an 8 s outage still failed the queued writes at 15.0 s (the attempt at 15 s came too
  late), pausing the VM. 35 s is past the attempt at 31 s, so an outage of up to 31 s is only a
  slow write for the guest. Leases survive a restart of the service (it gives back the time it
  was down, Datastore.resume_after_outage); through a network cut longer than the lease TTL the
  lease does expire, and the writes are refused once QEMU is back. The guest device has
  `werror=stop`: a refusal or a longer outage pauses the VM rather than handing the guest an
  I/O error, and the host agent resumes it once its lease renews (host/vms.py).
- `open-timeout`: how long QEMU retries the first connect when the node is created (shadow VM
  start); a few seconds ride out a datastore restart and still fail a VM start promptly.
A reconnect is a new connection: it starts unbound and binds on its next allowed write.

Abort after switchover: once the lease has moved on, the source's connection is fenced for good,
so when the lease comes back (`transfer(disk, dst, src, vm)`), the source QEMU needs a fresh
connection before it resumes: `reattach_commands` adds a new NBD node and points the format node
at it with `blockdev-reopen` (the guest device stays attached; QEMU 10 does this while paused).
blockdev-reopen first flushes the node, through the old connection (QEMU's NBD client sends
every flush, written or not): the datastore allows that flush because the host holds the lease
again (lease.check_flush), while that connection's writes stay refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.address import nbd_tls, parse_nbd_url
from kvmotion.api.disks import check_disk_name, check_host_name
from kvmotion.core.errors import InvalidInput
from kvmotion.storage.lease import ExportName

DEFAULT_RECONNECT_DELAY = 35  # seconds; past QEMU's reconnect attempt at 31 s (see above)
DEFAULT_OPEN_TIMEOUT = 10  # seconds
_NODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,30}$")  # QEMU's rule for node names
NBD_TLS_ID = "kvmotion-nbd-tls"  # the tls-creds-x509 object every nbds:// disk node names


def nbd_tls_object(creds_dir: Path) -> dict[str, object]:
    """QEMU `-object` options for NBD over TLS: the host's QEMU identity folder (ca-cert.pem,
    client-cert.pem, client-key.pem); QEMU checks the datastore's certificate against the CA and
    the address it dials (the certificate's SAN holds the datastore's name and IP)."""
    return {"qom-type": "tls-creds-x509", "id": NBD_TLS_ID, "dir": str(creds_dir), "endpoint": "client",
            "verify-peer": True}


def export_name(disk: str, host: str) -> str:
    return str(ExportName(check_disk_name(disk), check_host_name(host)))


def nbd_blockdev(
    nbd_url: str,
    disk: str,
    host: str,
    node_name: str,
    *,
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
    open_timeout: int = DEFAULT_OPEN_TIMEOUT,
) -> dict[str, object]:
    """QEMU `-blockdev` options for `disk` on the datastore at `nbd_url`, opened from `host`;
    an `nbds://` URL adds the TLS credentials (object NBD_TLS_ID, see nbd_tls_object).

    >>> nbd_blockdev("nbd://10.77.0.1:10809", "web1.img", "host-b", "disk0")["export"]
    'web1.img@host-b'
    """
    ep = parse_nbd_url(nbd_url)
    if not _NODE_RE.fullmatch(node_name):
        raise InvalidInput(
            f"invalid block node name {node_name!r}: a letter, then up to 30 letters, digits, "
            "'.', '_' or '-'"
        )
    node: dict[str, object] = {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "inet", "host": ep.host, "port": str(ep.port)},
        "export": export_name(disk, host),
        "reconnect-delay": int(reconnect_delay),
        "open-timeout": int(open_timeout),
        "discard": "unmap",  # guest TRIM punches holes on the datastore (thin disks stay thin)
    }
    if nbd_tls(nbd_url):
        node["tls-creds"] = NBD_TLS_ID
    return node


@dataclass(frozen=True)
class QmpCommand:
    name: str
    arguments: dict[str, object]


def reattach_commands(
    nbd_url: str,
    disk: str,
    host: str,
    format_node: dict[str, object],
    new_node_name: str,
    *,
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
    open_timeout: int = DEFAULT_OPEN_TIMEOUT,
) -> list[QmpCommand]:
    """QMP commands giving a running QEMU a new NBD connection under its format node.

    `format_node` is the format node's full -blockdev options (e.g. {"driver": "raw",
    "node-name": "disk0", "file": "disk0-proto"}): blockdev-reopen resets options it is not given.
    """
    old = format_node.get("file")
    if not isinstance(old, str):
        raise InvalidInput("the format node's 'file' must name its NBD node")
    proto = nbd_blockdev(
        nbd_url, disk, host, new_node_name, reconnect_delay=reconnect_delay, open_timeout=open_timeout
    )
    return [
        QmpCommand("blockdev-add", proto),
        QmpCommand("blockdev-reopen", {"options": [dict(format_node, file=new_node_name)]}),
        QmpCommand("blockdev-del", {"node-name": old}),
    ]
