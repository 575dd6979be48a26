"""Datastore disks with a real guest: the disk writer (kvm-disk) through ten migrations, across
restarts of the datastore service, and through migrations rolled back after the lease had moved
(in a lab whose destination agent dies, and by calling the switchover hook on a guest directly).

The guest prints `KVMOTION DISK ack=N` once records 0..N are fsynced; afterwards the image is read
in the datastore's folder (outside any VM) and every acknowledged record must be there, in order,
none lost or duplicated (kvmotion.guest.records.verify_image). Figures are printed as `FIGURES`
lines (pytest -s) and recorded as junit properties.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmotion.api.datastore import DatastoreClient
from kvmotion.api.disks import Lease
from kvmotion.api.registry import Registry
from kvmotion.api.userconfig import user_ssl_context
from kvmotion.guest.records import verify_image
from kvmotion.guest.serial import DiskAck, DiskError, parse_line
from kvmotion.lab.cluster import DATASTORE, cluster_env
from kvmotion.net import lab as labmod
from kvmotion.net import netns
from tests.integration.lab_fixture import MigrationLab

pytestmark = [pytest.mark.qemu]

DISK_SIZE = "256M"


def _other(host: str) -> str:
    return "host-b" if host == "host-a" else "host-a"


@dataclass(frozen=True)
class DiskLog:
    """The disk writer's lines in one serial log from an offset on."""

    acks: tuple[int, ...]
    errors: tuple[str, ...]
    end: int

    @property
    def last(self) -> int:
        return self.acks[-1] if self.acks else -1


def disk_log(lab: MigrationLab, host: str, vm: str, offset: int = 0) -> DiskLog:
    return read_disk_log(lab.serial_log(host, vm), offset)


def read_disk_log(path: Path, offset: int = 0) -> DiskLog:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return DiskLog((), (), offset)
    whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
    events = [parse_line(ln) for ln in whole.decode(errors="replace").splitlines()]
    return DiskLog(
        acks=tuple(e.seq for e in events if isinstance(e, DiskAck)),
        errors=tuple(e.message for e in events if isinstance(e, DiskError)),
        end=offset + len(whole),
    )


def wait_ack_above(lab: MigrationLab, host: str, vm: str, offset: int, above: int, timeout: float = 20) -> DiskLog:
    """Wait for an ack greater than `above` in `host`'s log after `offset`; the lines read so far."""
    deadline = time.monotonic() + timeout
    while True:
        log = disk_log(lab, host, vm, offset)
        if log.last > above or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def highest_ack(lab: MigrationLab, vm: str) -> int:
    """The highest record number the guest saw acknowledged, over every host's serial log."""
    return max(disk_log(lab, h.name, vm).last for h in lab.topo.hosts)


def datastore(lab: MigrationLab) -> DatastoreClient:
    """The lab's datastore, as its user admin (over TLS in an encrypted lab: the admin's login)."""
    with cluster_env(lab.cluster):
        ref = Registry().get(DATASTORE)
        if not ref.tls:
            return DatastoreClient(ref.control_url, timeout=5)
        return DatastoreClient(ref.control_url, timeout=5, ssl_context=user_ssl_context())


def lease_of(lab: MigrationLab, disk: str) -> tuple[Lease | None, int]:
    """(live lease, last generation handed out) of `disk` on the lab's datastore."""
    with datastore(lab) as ds:
        info = ds.disk(disk)
    return info.lease, info.generation


def disk_vm(lab: MigrationLab, vm: str, disk: str, host: str = "host-a") -> None:
    lab.cli_ok("disk", "create", f"{DATASTORE}/{disk}", DISK_SIZE)
    lab.create_vm(vm, host, workload="echo,disk", disks=(f"{DATASTORE}/{disk}",))


def stop_and_verify(lab: MigrationLab, vm: str, disk: str) -> tuple[int, str]:
    """Stop the VM cleanly, then check the image in the datastore's folder against the highest ack."""
    lab.cli_ok("vm", "stop", vm, timeout=60)
    acked = highest_ack(lab, vm)
    assert acked >= 0, "the guest never saw a record acknowledged"
    check = verify_image(lab.cluster.datastore_root / disk, acked)
    assert check.ok and (check.missing, check.duplicate, check.corrupt) == (0, 0, 0), check.summary()
    lease, _ = lease_of(lab, disk)
    assert lease is None, f"the stopped VM still holds the lease: {lease}"
    return acked, check.summary()


@pytest.mark.lab
@pytest.mark.slow
def test_disk_writer_ten_migrations(lab, record_property):
    """a->b->a ... ten times: the lease follows the VM with a new generation each time, the
    writer keeps acknowledging on each destination, and the disk holds every acknowledged record."""
    vm, disk = "dsk1", "dsk1.img"
    disk_vm(lab, vm, disk)
    lease, gen = lease_of(lab, disk)
    assert lease is not None and lease.host == "host-a" and lease.vm == vm, lease
    offsets = {"host-a": 0, "host-b": 0}
    first = wait_ack_above(lab, "host-a", vm, 0, 8)
    assert first.last > 8, "the disk writer acknowledged nothing"
    offsets["host-a"] = first.end
    ack = first.last
    where = "host-a"
    rows = []
    for i in range(10):
        dest = _other(where)
        rec = lab.migrate(vm, dest)
        assert rec["_returncode"] == 0 and rec["phase"] == "done", (
            f"migration {i + 1} {where} -> {dest} {rec['phase']}: {rec.get('error')} {rec['_stderr']}"
        )
        assert lab.listed(vm) == [(dest, "running")]
        lease, new_gen = lease_of(lab, disk)
        assert lease is not None and lease.host == dest and lease.vm == vm, f"migration {i + 1}: lease {lease}"
        assert lease.generation == new_gen > gen, f"migration {i + 1}: generation {gen} -> {lease.generation}"
        gen = new_gen
        src = disk_log(lab, where, vm, offsets[where])
        offsets[where] = src.end
        arrived = wait_ack_above(lab, dest, vm, offsets[dest], max(ack, src.last))
        assert arrived.last > max(ack, src.last), f"migration {i + 1}: no new ack on {dest} after resume"
        acks = [ack, *src.acks, *arrived.acks]
        assert all(a < b for a, b in itertools.pairwise(acks)), f"migration {i + 1}: acks not increasing {acks[-6:]}"
        assert not src.errors and not arrived.errors, f"migration {i + 1}: {src.errors or arrived.errors}"
        offsets[dest] = arrived.end
        ack = arrived.last
        rows.append((rec["summary"]["pause_ms"], rec["summary"]["total_ms"], gen))
        where = dest
    _acked, summary = stop_and_verify(lab, vm, disk)
    line = (f"FIGURES disk writer x10 migrations: pause_ms {[round(r[0], 1) for r in rows]} total_ms "
            f"{[round(r[1]) for r in rows]} generations {[r[2] for r in rows]}; {summary}")
    print(line)
    record_property("figures", line)


def _datastore_processes(lab: MigrationLab) -> list[tuple[int, list[str], dict[str, str]]]:
    """(pid, argv, environment) of every process in the lab's datastore namespace."""
    out = []
    for pid in netns.pids_in_ns(lab.topo.datastore.ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        out.append((pid, [a.decode() for a in argv], dict(e.decode().partition("=")[::2] for e in env)))
    return out


@dataclass(frozen=True)
class ServiceCommand:
    argv: list[str]
    env: dict[str, str]


def kill_datastore(lab: MigrationLab) -> ServiceCommand:
    """SIGKILL the datastore service and its nbdkit; returns how it was started (by
    kvmotion.lab.cluster.start_cluster), read from /proc, to start it again the same way."""
    procs = _datastore_processes(lab)
    serve = [p for p in procs if "datastore" in p[1] and "serve" in p[1]]
    assert len(serve) == 1, f"expected one `datastore serve` in {lab.topo.datastore.ns}: {procs}"
    for pid, _, _ in procs:
        netns._signal(pid, signal.SIGKILL)  # tolerant of a pid already gone
    deadline = time.monotonic() + 5
    while any(netns._alive(p[0]) for p in procs):
        assert time.monotonic() < deadline, "the datastore's processes did not die"
        time.sleep(0.02)
    return ServiceCommand(serve[0][1], serve[0][2])


def start_datastore(lab: MigrationLab, cmd: ServiceCommand) -> None:
    proc = labmod.spawn_in_ns(lab.topo.datastore.ns, cmd.argv, lab.cluster.log(DATASTORE), cmd.env,
                              hide=lab.cluster.hide_from(DATASTORE))
    with datastore(lab) as ds:
        deadline = time.monotonic() + 30
        while not ds.reachable():
            assert proc.poll() is None, f"the restarted datastore exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the restarted datastore did not answer within 30 s"
            time.sleep(0.05)


SERIAL_LAG = 0.5  # s: a guest's line reaches its serial log file within this, even on a loaded CI host


# 0: restarted at once (the service is back in about 0.6 s); 12 s: past QEMU's NBD reconnect
# attempts at 1, 3 and 7 s, and long enough for the lease to expire unless the restarted service
# gives it back; 40 s: longer than NBD's reconnect-delay (35 s), so QEMU fails the queued writes
# and werror=stop pauses the VM until its agent resumes it.
@pytest.mark.lab
@pytest.mark.parametrize("outage", [0.0, 12.0, pytest.param(40.0, marks=pytest.mark.slow)])
def test_datastore_restart_during_writes(lab, outage, record_property):
    """The datastore service is killed while the guest writes and started again after `outage`
    seconds: the writer goes on, on the same host under the same lease generation, and the disk
    holds every acknowledged record."""
    vm, disk = "dsk2", "dsk2.img"
    disk_vm(lab, vm, disk)
    before = wait_ack_above(lab, "host-a", vm, 0, 16)
    assert before.last > 16, "the disk writer acknowledged nothing"
    _, gen = lease_of(lab, disk)
    cmd = kill_datastore(lab)
    t_kill = time.monotonic()
    # Both reads while the service is down, the first once the guest's lines from before the kill
    # are in its serial log. (CI saw two acks past the batch in flight when `during` was read
    # after the restart: late lines, or acks the restarted service had already given.)
    time.sleep(SERIAL_LAG)
    at_kill = disk_log(lab, "host-a", vm)
    time.sleep(max(0.0, outage - SERIAL_LAG))
    during = disk_log(lab, "host-a", vm, at_kill.end)
    start_datastore(lab, cmd)
    t_up = time.monotonic()
    # The writer may have had one batch in flight past the kill, not more.
    assert during.last <= at_kill.last + 8, f"acks while the datastore was down: {during.acks}"
    after = wait_ack_above(lab, "host-a", vm, at_kill.end, max(at_kill.last, during.last), timeout=45)
    t_ack = time.monotonic()
    assert after.last > max(at_kill.last, during.last), (
        f"no ack {t_ack - t_up:.0f} s after the datastore came back; agent: {lab.agent_log('host-a')[-600:]}"
    )
    assert not after.errors, f"the guest saw disk errors: {after.errors[:3]}"
    more = wait_ack_above(lab, "host-a", vm, after.end, after.last)
    assert more.last > after.last, "the writer stopped again"
    assert lab.listed(vm) == [("host-a", "running")]
    lease, gen_after = lease_of(lab, disk)
    assert lease is not None and (lease.host, lease.generation, gen_after) == ("host-a", gen, gen), lease
    resumed = "paused by a disk I/O error" in lab.agent_log("host-a")
    _acked, summary = stop_and_verify(lab, vm, disk)
    line = (f"FIGURES datastore restart after {outage:.0f} s: service answered {t_up - t_kill:.1f} s after the kill, "
            f"guest acks again {t_ack - t_kill:.1f} s after it (agent resumed an I/O-error pause: {resumed}); {summary}")
    print(line)
    record_property("figures", line)


SLOW_LINK = 20_000_000  # bytes/s: pre-copy lasts seconds, time enough to kill an agent in it


@pytest.mark.lab
def test_rollback_after_lease_handoff_keeps_writing_on_source(make_lab, record_property):
    """The destination's agent dies during pre-copy: QEMU completes the stream and the lease moves
    to host-b at switchover, but nobody commits. The source takes the lease back, gives its QEMU a
    fresh NBD connection (the old one is fenced for good) and resumes: the writer acknowledges new
    records on host-a, and the disk holds every acknowledged record."""
    lab = make_lab(link_rate=SLOW_LINK)
    vm, disk = "dsk3", "dsk3.img"
    lab.cli_ok("disk", "create", f"{DATASTORE}/{disk}", DISK_SIZE)
    lab.create_vm(vm, "host-a", workload="echo,mem,disk", mem_wss="16M", mem_rate="5M",
                  disks=(f"{DATASTORE}/{disk}",))
    first = wait_ack_above(lab, "host-a", vm, 0, 16)
    assert first.last > 16, "the disk writer acknowledged nothing"
    _, gen = lease_of(lab, disk)
    mig = lab.start_migrate(vm, "host-b")
    try:
        lab.wait_precopy("host-a", vm, min_bytes=1 << 20)
        lab.kill_agent("host-b")
        rec = lab.finish_migrate(mig, timeout=120)
    finally:
        if mig.poll() is None:
            mig.kill()
    t_failed = time.monotonic()
    phases = [p for p, _ in rec["phase_times"]]
    assert "switchover" in phases and "commit" in phases, f"the lease never moved: {phases} {rec['error']}"
    assert rec["phase"] == "failed" and "keeps running on host-a" in rec["error"], rec["error"]
    assert "disk-leases" not in rec["error"], f"the lease hook's rollback failed: {rec['error']}"
    lease, gen_after = lease_of(lab, disk)
    assert lease is not None and lease.host == "host-a", f"the lease did not come back: {lease}"
    assert gen_after >= gen + 2, f"generation {gen} -> {gen_after}: the lease never went to host-b and back"
    at_fail = disk_log(lab, "host-a", vm)
    after = wait_ack_above(lab, "host-a", vm, 0, at_fail.last)
    assert after.last > at_fail.last, f"no new ack on host-a after the rollback; agent: {lab.agent_log('host-a')[-800:]}"
    t_ack = time.monotonic()
    assert not after.errors, f"the guest saw disk errors: {after.errors[:3]}"
    # Long enough for a lease renewal round: the source still holds its lease and keeps writing.
    time.sleep(6)
    more = disk_log(lab, "host-a", vm, at_fail.end)
    assert more.last > after.last, "the writer stopped after the rollback"
    lab.start_agent("host-b")  # destroys the uncommitted shadow it finds
    assert lab.wait_qemu_hosts(vm, ["host-a"]) == ["host-a"], lab.qemu_pids(vm)
    assert lab.listed(vm) == [("host-a", "running")]
    _acked, summary = stop_and_verify(lab, vm, disk)
    line = (f"FIGURES rollback after the lease moved: generation {gen} -> {gen_after}, first ack on host-a "
            f"{t_ack - t_failed:.1f} s after migrate returned; error: {rec['error']}; {summary}")
    print(line)
    record_property("figures", line)


def test_hook_rollback_reattaches_a_running_guest(tmp_path, record_property):
    """DiskLeaseHook against a real guest, without a lab: the source pauses as at pre-switchover,
    the hook hands the lease to host-b, then rolls back while the lease is still live there (a
    transfer back, generation 3): the old NBD connection is fenced for good, so the hook puts a
    new one under the guest's disk, and once resumed the writer acknowledges new records."""
    from kvmotion.api import joined
    from kvmotion.api.identity import Identity, Kind
    from kvmotion.api.joined import StateRoot
    from kvmotion.api.spec import DiskSpec, VmSpec, Workload
    from kvmotion.guest.image import ensure_image
    from kvmotion.host.vms import HostConfig, VmManager
    from kvmotion.migration.hooks import DiskLeaseHook, SwitchoverContext
    from kvmotion.qemu import accel
    from tests.integration.test_datastore import Service

    # The center's and host-a's state outside pytest's private tmp: an unprivileged QEMU reads its certificate there.
    cluster = Path(tempfile.mkdtemp(prefix="kvmotion-hook-"))
    cluster.chmod(0o711)
    svc = Service(tmp_path / "ds1", ttl=15, cluster=cluster)  # ds1 joined to a center of the test's
    host_a = StateRoot(svc.creds(Identity(Kind.HOST, "host-a")).parent)  # host-a joined: its certificate, its QEMUs'
    assert svc.center is not None
    # What host-a's first heartbeat would bring: the center's datastores (ds1, recorded by its join).
    host_a.save_cache(host_a.cache().model_copy(update={"datastores": tuple(svc.center.prepared.center.datastores())}))
    joined.activate(host_a)  # this process is host-a's agent: its registry and identity from its root
    svc.start()
    try:
        assert Registry().get("ds1").nbd_url == svc.nbd_url
        with svc.client() as c:
            c.create_disk("hook.img", 64 << 20)
        spec = VmSpec(name="hook1", memory=256 << 20, disks=(DiskSpec(source="hook.img", datastore="ds1"),),
                      workloads=(Workload.DISKWRITER,))

        async def run() -> tuple[int, int, list[str]]:
            mgr = VmManager(HostConfig(name="host-a", state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                                       portgroups={}, accel=accel.choose(ensure_image)))
            await mgr.recover()
            try:
                await mgr.create(spec)
                await mgr.start(spec.name, wait_ready=True, timeout=60)
                serial = tmp_path / "run" / "vms" / spec.name / "serial.log"
                deadline = time.monotonic() + 20
                while read_disk_log(serial).last < 16:
                    assert time.monotonic() < deadline, "the disk writer acknowledged nothing"
                    await asyncio.sleep(0.05)
                qmp = mgr.qmp(spec.name)
                ctx = SwitchoverContext(spec=spec, source="host-a", destination="host-b", migration_id="0123456789ab",
                                        source_qmp=qmp, proto_nodes=mgr.proto_nodes(spec.name))
                hook = DiskLeaseHook()
                await hook.before_precopy(ctx)
                assert hook.generations == {"hook.img": 1}
                await qmp.execute("stop")  # as at pre-switchover: vCPUs stopped, disks flushed
                await hook.before_switchover(ctx)
                with svc.client() as c:
                    assert c.disk("hook.img").holder == "host-b"
                await hook.on_rollback(ctx)
                await qmp.execute("cont")
                at_resume = read_disk_log(serial)
                deadline = time.monotonic() + 20
                while read_disk_log(serial, at_resume.end).last <= at_resume.last + 16:
                    assert time.monotonic() < deadline, f"no new acks after the rollback: {read_disk_log(serial, at_resume.end)}"
                    await asyncio.sleep(0.05)
                nodes = [n["node-name"] for n in await qmp.execute("query-named-block-nodes")]  # type: ignore[union-attr]
                status = (await qmp.execute("query-status"))["status"]  # type: ignore[index]
                assert status == "running", status
                await mgr.stop(spec.name)  # clean: QEMU flushes, then quits
                return at_resume.last, read_disk_log(serial).last, nodes
            finally:
                if mgr.status(spec.name).pid is not None:  # a failed test: the agent's shutdown leaves VMs running
                    await mgr.stop(spec.name, force=True)
                await mgr.shutdown()

        at_resume, acked, nodes = asyncio.run(run())
        assert "disk0-01234567" in nodes and "disk0-proto" not in nodes, nodes
        with svc.client() as c:
            info = c.disk("hook.img")
        assert info.lease is None and info.generation == 3, info  # a -> b -> a, then released at stop
        check = verify_image(svc.root / "hook.img", acked)
        assert check.ok and (check.missing, check.duplicate, check.corrupt) == (0, 0, 0), check.summary()
    finally:
        joined.activate(None)
        svc.close()
        shutil.rmtree(cluster, ignore_errors=True)
    line = f"FIGURES hook rollback (lease live at host-b): acks {at_resume} at resume -> {acked} at stop; {check.summary()}"
    print(line)
    record_property("figures", line)
