"""kvmotion's wire: the typed models every service serves and the clients of the center, the host
agents and the datastores, plus the cluster's identities, certificates and shared files.

The CLI, the demo and the benchmarks reach the services through this package. It imports only
kvmotion.core. Stdlib only in this file: nbdkit's embedded interpreter imports kvmotion.api.disks.
"""
