"""Prechecks and cancel: `migrate --check` rows, refusals that leave the VM where it runs, and a
user's cancel during the pre-copy of a busy guest over a slow link."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

SLOW_LINK = 20_000_000  # bytes/s on the vMotion (mgmt) links: pre-copy of a busy guest lasts seconds


def _one_line_error(r, *patterns: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for p in patterns:
        assert p in lines[0], lines[0]
    return lines[0]


def test_checks_report_rows_and_failed_checks_refuse(lab):
    """--check prints a row per check; a failed check (local disk, same host) refuses the
    migration with its reason and a non-zero exit, and the VM keeps running where it was."""
    lab.create_vm("web1", "host-a", k=0)
    lab.create_vm("disk1", "host-a", k=1, disks=("disk1.img:64M",))

    checks = {c["name"]: c for c in lab.cli_json("migrate", "web1", "--to", "host-b", "--check")}
    assert {"different-host", "vm-running", "memory", "cpu-model", "port-groups", "shared-storage",
            "encryption"} <= set(checks)
    assert all(c["level"] == "pass" for c in checks.values()), checks  # an encrypted lab: TLS passes too
    table = lab.cli_ok("migrate", "web1", "--to", "host-b", "--check").stdout
    assert "shared-storage" in table and "pass" in table and "encryption" in table

    # A local disk: --check says which check fails and why, and exits non-zero.
    r = lab.cli("migrate", "disk1", "--to", "host-b", "--check", "--json")
    assert r.returncode != 0
    failed = {c["name"]: c for c in json.loads(r.stdout) if c["level"] == "error"}
    assert set(failed) == {"shared-storage"}, failed
    assert "disk1.img is local to host-a" in failed["shared-storage"]["reason"]
    table = lab.cli("migrate", "disk1", "--to", "host-b", "--check")
    assert table.returncode != 0 and "error" in table.stdout and "shared-storage" in table.stdout

    # The migration itself is refused with the reason, before anything moves.
    _one_line_error(lab.cli("migrate", "disk1", "--to", "host-b"), "refused", "disk1.img is local to host-a")
    # Migrating to the host it is on.
    _one_line_error(lab.cli("migrate", "web1", "--to", "host-a"), "refused", "already on host-a")
    # A host that does not exist.
    _one_line_error(lab.cli("migrate", "web1", "--to", "host-q"), "host-q")

    assert lab.listed("web1") == [("host-a", "running")]
    assert lab.listed("disk1") == [("host-a", "running")]
    assert lab.qemu_hosts("web1") == ["host-a"] and lab.qemu_hosts("disk1") == ["host-a"]
    assert lab.vm_record("host-b", "web1") is None and lab.vm_record("host-b", "disk1") is None


def test_cancel_during_precopy(make_lab, record_property):
    """`migrate --cancel VM` during the pre-copy of a guest dirtying memory flat out over a slow
    link: the migration ends cancelled, the VM runs on on the source, no shadow is left."""
    lab = make_lab(link_rate=SLOW_LINK)
    vm = "busy1"
    lab.create_vm(vm, "host-a", workload="echo,mem", mem_wss="128M", mem_rate="0")
    before = lab.wait_mem_status("host-a", vm, 0, count=1)
    assert before.statuses, "the memory writer printed no status"
    mig = lab.start_migrate(vm, "host-b")
    try:
        progress = lab.wait_precopy("host-a", vm)
        assert lab.wait_qemu_hosts(vm, ["host-a", "host-b"]) == ["host-a", "host-b"]  # the shadow waits on host-b
        t_cancel = time.time()
        r = lab.cli_ok("migrate", vm, "--cancel")
        assert "cancelling migration" in r.stdout
        rec = lab.finish_migrate(mig, timeout=60)
    finally:
        if mig.poll() is None:
            mig.kill()
    assert rec["phase"] == "cancelled", rec
    assert rec["_returncode"] != 0
    assert "cancelled by the user" in rec["error"] and "keeps running on host-a" in rec["error"], rec["error"]
    assert "cancelled by the user" in rec["_stderr"] and "Traceback" not in rec["_stderr"]
    cancelled_after = dict(rec["phase_times"])["cancelled"] - t_cancel

    assert lab.listed(vm) == [("host-a", "running")]
    assert lab.wait_qemu_hosts(vm, ["host-a"]) == ["host-a"], lab.qemu_pids(vm)
    assert lab.vm_record("host-b", vm) is None  # the shadow's definition is gone too
    # The guest runs on: its counter moves on from where it was, no page corrupted.
    offset = lab.mem_log("host-a", vm).end
    after = lab.wait_mem_status("host-a", vm, offset, count=2)
    assert len(after.statuses) >= 2 and not after.corrupt
    assert before.statuses[-1].seq < after.statuses[0].seq < after.statuses[-1].seq
    assert all(s.errors == 0 for s in after.statuses)
    # A second migration is allowed afterwards (the first left nothing behind): check says so.
    checks = {c["name"]: c["level"] for c in lab.cli_json("migrate", vm, "--to", "host-b", "--check")}
    assert checks["single-migration"] == "pass" and "error" not in checks.values(), checks
    line = (f"FIGURES cancel: pre-copy had sent {progress['progress']['transferred'] >> 20} MiB "
            f"(round {progress['progress']['round']}); phase cancelled {cancelled_after * 1000:.0f} ms after the cancel command started")
    print(line)
    record_property("figures", line)
