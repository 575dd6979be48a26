"""Prerequisite checks (pure, Ganeti-style: every violation is returned, not just the first)."""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.api.migration import Check, Level
from kvmotion.api.spec import VmSpec


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know about one host (gathered by its agent)."""

    name: str
    accel: str
    memory_free: int  # bytes available for a new VM
    portgroups: frozenset[str]
    datastores: frozenset[str]  # datastores this host reaches now
    cpu_unavailable: dict[str, tuple[str, ...]]  # CPU model -> features missing here ({} entry: usable)
    migrations_active: int
    migration_limit: int
    encrypted: bool = True  # the cluster policy this host's agent follows (its cluster.json)


def run_checks(
    spec: VmSpec,
    vm_running: bool,
    source: HostFacts,
    dest: HostFacts,
    vm_migrating: bool,
) -> tuple[Check, ...]:
    out: list[Check] = []

    def add(name: str, ok: bool, reason_ok: str, reason_bad: str, level: Level = Level.ERROR) -> None:
        out.append(Check(name, Level.PASS if ok else level, reason_ok if ok else reason_bad))

    add("different-host", source.name != dest.name, f"{source.name} -> {dest.name}",
        f"VM {spec.name} is already on {dest.name}")
    add("vm-running", vm_running, f"VM {spec.name} is running", f"VM {spec.name} is not running: nothing to migrate live")
    add("single-migration", not vm_migrating, "no other migration of this VM",
        f"VM {spec.name} is already being migrated")
    add("memory", dest.memory_free >= spec.memory,
        f"{dest.name} has {dest.memory_free >> 20} MiB free for {spec.memory >> 20} MiB",
        f"{dest.name} has {dest.memory_free >> 20} MiB free, VM needs {spec.memory >> 20} MiB")
    missing = dest.cpu_unavailable.get(spec.cpu_model)
    if spec.cpu_model not in dest.cpu_unavailable:
        add("cpu-model", False, "", f"CPU model {spec.cpu_model} is not known on {dest.name}")
    else:
        add("cpu-model", not missing, f"CPU model {spec.cpu_model} runs on {dest.name}",
            f"CPU model {spec.cpu_model} on {dest.name} lacks: {', '.join(missing or ())}")
    add("accelerator", source.accel == dest.accel, f"both hosts use {dest.accel}",
        f"{source.name} uses {source.accel} but {dest.name} uses {dest.accel}")
    lacking_pg = sorted({n.portgroup for n in spec.nics} - dest.portgroups)
    add("port-groups", not lacking_pg, f"{dest.name} has every port group of the VM",
        f"port group {', '.join(lacking_pg)} missing on {dest.name}")
    local = [d.source for d in spec.disks if d.datastore is None]
    add("shared-storage", not local, "every disk is on a datastore",
        f"disk {', '.join(local)} is local to {source.name}: move it to a datastore first")
    unreached = sorted({d.datastore for d in spec.disks if d.datastore} - dest.datastores)
    add("datastores", not unreached, f"{dest.name} reaches every datastore of the VM",
        f"datastore {', '.join(unreached)} is not reachable from {dest.name}")
    for facts in (source, dest):
        add(f"concurrency-{facts.name}", facts.migrations_active < facts.migration_limit,
            f"{facts.name}: {facts.migrations_active} of {facts.migration_limit} migrations running",
            f"{facts.name} already runs {facts.migrations_active} migrations (limit {facts.migration_limit})")
    # Encryption is the cluster's policy; both ends read it from their own copy of the settings.
    if source.encrypted != dest.encrypted:
        mode = {True: "encrypted", False: "plain"}
        add("encryption", False, "", f"{source.name}'s cluster settings say {mode[source.encrypted]} migrations, "
            f"{dest.name}'s say {mode[dest.encrypted]}: give both hosts the same cluster.json")
    else:
        add("encryption", source.encrypted, "the migration stream is encrypted (TLS, cluster CA)",
            "the migration stream is NOT encrypted (cluster opted out): use only on a trusted network", Level.WARNING)
    return tuple(out)


def errors_of(checks: tuple[Check, ...]) -> list[Check]:
    return [c for c in checks if c.level is Level.ERROR]
