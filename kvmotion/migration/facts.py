"""Facts a host contributes to prechecks: free memory, CPU models it can run, datastores it reaches."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

from kvmotion.migration.checks import HostFacts
from kvmotion.qemu.qmp import Qmp
from kvmotion.storage.host import reachable_datastores

_cpu_cache: dict[str, dict[str, tuple[str, ...]]] = {}


async def cpu_models(accel: str) -> dict[str, tuple[str, ...]]:
    """CPU model -> features this host's QEMU+accelerator cannot provide (query-cpu-definitions)."""
    if accel in _cpu_cache:
        return _cpu_cache[accel]
    with tempfile.TemporaryDirectory(prefix="kvcpu") as tmp:
        sock = Path(tmp) / "qmp.sock"
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns once forked; the probe's QMP is awaited
            ["qemu-system-x86_64", "-M", "none", "-accel", accel, "-nodefaults", "-display", "none",
             "-chardev", f"socket,id=q,path={sock},server=on,wait=off", "-mon", "chardev=q,mode=control"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        qmp = Qmp("cpu-probe")
        try:
            await qmp.connect(sock, alive=lambda: proc.poll() is None)
            defs = await qmp.execute("query-cpu-definitions")
        finally:
            await qmp.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
    result = {d["name"]: tuple(d.get("unavailable-features", ())) for d in defs}
    _cpu_cache[accel] = result
    return result


def datastores_reached(host: str) -> frozenset[str]:
    """Datastores of the cluster registry that answer host `host` (its certificate, over TLS)."""
    return frozenset(reachable_datastores(host))


def facts_to_json(f: HostFacts) -> dict:
    return {
        "name": f.name, "accel": f.accel, "memory_free": f.memory_free, "portgroups": sorted(f.portgroups),
        "datastores": sorted(f.datastores), "cpu_unavailable": {k: list(v) for k, v in f.cpu_unavailable.items()},
        "migrations_active": f.migrations_active, "migration_limit": f.migration_limit, "encrypted": f.encrypted,
    }


def facts_from_json(d: dict) -> HostFacts:
    return HostFacts(
        name=d["name"], accel=d["accel"], memory_free=int(d["memory_free"]), portgroups=frozenset(d["portgroups"]),
        datastores=frozenset(d["datastores"]), cpu_unavailable={k: tuple(v) for k, v in d["cpu_unavailable"].items()},
        migrations_active=int(d["migrations_active"]), migration_limit=int(d["migration_limit"]),
        encrypted=bool(d.get("encrypted", True)),
    )
