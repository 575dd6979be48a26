"""Datastore: disks on a network block (NBD) server, exclusive write leases with fencing."""
