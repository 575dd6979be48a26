"""What every kvmotion package shares: errors, units, paths, atomic files, JSON, the HTTP clients' TLS context.

Imports nothing of kvmotion. Stdlib only in this file: nbdkit's embedded interpreter imports
kvmotion.core.errors (through kvmotion.storage.lease).
"""
