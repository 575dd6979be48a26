"""API routers beyond the VM lifecycle that an agent mounts (each made from the VM manager and host config)."""

from __future__ import annotations

from functools import partial


def routers(listen_ip: str, migration_limit: int) -> tuple:
    from kvmotion.migration.api import migration_router

    return (partial(migration_router, listen_ip=listen_ip, limit=migration_limit),)
