"""API routers beyond the VM lifecycle that an agent mounts (each takes the VM manager and host config)."""

from __future__ import annotations


def routers() -> tuple:
    return ()
