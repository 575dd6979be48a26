"""Datastore: disks on a network block (NBD) server, exclusive write leases with fencing.

Design. `kvmotion datastore serve` runs nbdkit (Debian's 1.32) with our Python plugin
(nbd_plugin.py) for the data path, and the control API (api.py: disks, leases) next to it.
- nbdkit does all of NBD: fixed newstyle, structured replies, block status, FUA and FLUSH. The
  plugin sees each connection's export name and may fail any single request with an errno,
  which is what fencing needs. We wrote no server protocol code; nbd_client.py is a minimal
  client for tests and probes (VMs use QEMU's client, see attach.py).
- qemu-storage-daemon cannot fence: an export is writable for every client or for none, fixed at
  the handshake (QEMU refuses to open a read-only export read-write, so a destination could not
  connect early and be promoted later), and changing it means deleting the export, which drops
  every connection. `nbdkit file` (C) cannot consult leases, and filters would have to be C too.
- Identity: the export name `DISK@HOST` (QEMU sends it; `DISK` alone is a read-only export). A
  connection binds to the lease generation of its first allowed write and is refused once the
  lease carries another generation, even if the lease returns to the same host (it may still
  flush while its host holds the lease: lease.check_flush); a new connection (QEMU's reconnect,
  or attach.reattach_commands after an aborted switchover) starts unbound.
- Authentication: NBD and the control API take TLS client certificates of the cluster CA only.
  nbdkit 1.32 can require a certificate but cannot tell the plugin whose it is, so nbdkit listens
  on a private Unix socket and a TLS front end (nbd_front.py, another child process of `datastore
  serve`) terminates TLS in front of it: it reads the identity from the certificate and opens
  `DISK@HOST` only for host:HOST and qemu:HOST, `DISK` for any host and for operators
  (nbd_gate.py), then relays bytes. Lease calls act for the host
  named in the caller's certificate (api.py). `datastore serve --insecure` is the plain-text
  service of before, with a warning on every start.
- Lease state: leases.json under the root, replaced atomically by the control API under an
  exclusive flock; the plugin holds that lock shared from the check to the end of the pwrite and
  reloads the file when a mapped counter moves (leasefile.py). So fencing is in force when
  transfer() returns, no write authorized under the old generation is still in flight, and
  state survives restarts. Expiry is by the datastore's wall clock, with no writer needed; a
  restarted service first gives every lease that was live when it went down (its heartbeat file
  says when) a new TTL, since no holder could renew meanwhile.

Cost of the Python data path (`python -m kvmotion.storage.bench --scale 0.5 --repeat 2`: QEMU's
NBD client via `qemu-img bench`, 1 GiB file in page cache, loopback, best of 2, on this project's
2-core machine while others were loading it (load average 5), so read the ratios, not the
absolute figures; "rand" is qemu-img's strided mode with a 31 MiB stride):

                          kvmotion plugin   nbdkit file (C)   qemu-storage-daemon
    seq 64K write qd16        653 MiB/s         829 MiB/s          696 MiB/s
    seq 64K read  qd16        856 MiB/s        1455 MiB/s         1306 MiB/s
    rand 4K write qd16      12469 IOPS        19531 IOPS         18165 IOPS
    rand 4K read  qd16      21254 IOPS        24631 IOPS         24691 IOPS
    rand 4K write qd1        9579 IOPS        15823 IOPS          8834 IOPS

The plugin keeps 59-86 % of nbdkit's C file plugin, and more than a 1 Gbit/s link carries for
sequential I/O. The fence is about 6 us of each write (a shared flock taken and dropped plus the
check, measured in a loop); it was 15 us with a turnstile flock and a context manager on every
write, now skipped unless a lease change is waiting.

Stdlib only at this level: nbdkit's embedded interpreter imports this package (nbd_plugin).
"""

from pathlib import Path


def nbd_plugin_path() -> Path:
    """The nbdkit Python plugin that serves a datastore root."""
    return Path(__file__).with_name("nbd_plugin.py")
