"""Datastore: disks on a network block (NBD) server, exclusive write leases with fencing.

Stdlib only at this level: nbdkit's embedded interpreter imports this package (nbd_plugin).
"""

from pathlib import Path


def nbd_plugin_path() -> Path:
    """The nbdkit Python plugin that serves a datastore root."""
    return Path(__file__).with_name("nbd_plugin.py")
