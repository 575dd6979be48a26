"""Prerequisite checks are pure: every violation comes back at once, each with its reason."""

from kvmotion.api.migration import Level
from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec
from kvmotion.migration.checks import HostFacts, errors_of, run_checks

GIB = 1 << 30


def facts(name: str, **kw) -> HostFacts:
    base = dict(
        name=name, accel="tcg", memory_free=8 * GIB, portgroups=frozenset({"vm-net"}), datastores=frozenset({"ds1"}),
        cpu_unavailable={"qemu64": (), "Skylake-Server": ("avx512f", "pku")}, migrations_active=0, migration_limit=4,
    )
    base.update(kw)
    return HostFacts(**base)


SPEC = VmSpec(name="web1", memory=GIB, disks=(DiskSpec.parse("ds1/web1.img"),),
              nics=(NicSpec.parse("pg=vm-net,mac=52:54:00:12:34:56"),))


def levels(checks) -> dict[str, Level]:
    return {c.name: c.level for c in checks}


def test_all_pass_on_a_good_destination():
    checks = run_checks(SPEC, True, facts("host-a"), facts("host-b"), False)
    assert errors_of(checks) == []
    assert set(levels(checks).values()) == {Level.PASS}


def test_every_violation_is_reported_with_its_reason():
    spec = VmSpec(name="web1", memory=4 * GIB, cpu_model="Skylake-Server",
                  disks=(DiskSpec.parse("local.img:1G"), DiskSpec.parse("ds2/x.img")),
                  nics=(NicSpec.parse("pg=storage-net,mac=52:54:00:12:34:57"),))
    dest = facts("host-b", memory_free=2 * GIB, migrations_active=4, accel="kvm", encrypted=False)
    checks = run_checks(spec, True, facts("host-a", encrypted=False), dest, True)
    bad = {c.name: c.reason for c in errors_of(checks)}
    assert set(bad) == {"single-migration", "memory", "cpu-model", "accelerator", "port-groups",
                        "shared-storage", "datastores", "concurrency-host-b"}
    assert "avx512f" in bad["cpu-model"] and "pku" in bad["cpu-model"]
    assert "storage-net" in bad["port-groups"]
    assert "local.img" in bad["shared-storage"]
    assert "ds2" in bad["datastores"]
    assert "2048 MiB free" in bad["memory"]
    assert levels(checks)["encryption"] is Level.WARNING


def test_unknown_cpu_model_and_same_host_and_stopped_vm():
    spec = VmSpec(name="web1", memory=GIB, cpu_model="NoSuchCPU")
    checks = run_checks(spec, False, facts("host-a"), facts("host-a"), False)
    bad = {c.name for c in errors_of(checks)}
    assert {"different-host", "vm-running", "cpu-model"} <= bad


def test_encryption_is_the_clusters_policy_on_both_hosts():
    """Both plain: a warning. Settings that differ between the hosts: an error naming both."""
    plain = run_checks(SPEC, True, facts("host-a", encrypted=False), facts("host-b", encrypted=False), False)
    assert levels(plain)["encryption"] is Level.WARNING and errors_of(plain) == []
    for src, dst in ((True, False), (False, True)):
        checks = run_checks(SPEC, True, facts("host-a", encrypted=src), facts("host-b", encrypted=dst), False)
        bad = {c.name: c.reason for c in errors_of(checks)}
        assert set(bad) == {"encryption"}, bad
        assert "host-a's cluster settings say" in bad["encryption"] and "host-b's say" in bad["encryption"]
