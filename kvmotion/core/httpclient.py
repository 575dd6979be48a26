"""What every kvmotion HTTP client shares: one TLS context for servers verified against the system's CAs."""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx builds a new context for each client created with verify=True, loading certifi's CA
    bundle into it: about 40 ms of CPU per client here. A datastore client made in a VM's
    switchover pause (the lease hand-over) paid that inside the pause. One context serves every
    client: an SSLContext may be shared between clients and threads."""
    return httpx.create_ssl_context()
