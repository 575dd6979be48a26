"""The VMs of one host: lifecycle (create, start, stop, delete), supervision and re-attach.

QEMU processes outlive the agent (own session, pid files): a restarted agent finds each running
VM by its pid file and reconnects QMP; it never starts a second copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmotion.api.agent import VmState, VmStatus
from kvmotion.api.config import load_config
from kvmotion.api.spec import DiskSpec, VmSpec
from kvmotion.core.errors import Conflict, InsufficientResources, InvalidInput, KvmotionError, LeaseError, NotFound, VmFailed
from kvmotion.guest import image as guest_image
from kvmotion.guest.cmdline import kernel_cmdline
from kvmotion.host import resources, throttle
from kvmotion.host.store import VmRecord, VmStore
from kvmotion.net import links
from kvmotion.qemu import confine, cpus, dirtyrate
from kvmotion.qemu.accel import AccelChoice
from kvmotion.qemu.cancel import cancel_migration
from kvmotion.qemu.cmdline import HostContext, QemuFds, VmPaths, build_argv, local_file_node, process_tag
from kvmotion.qemu.process import QemuProcess, close_own_fds, open_fds
from kvmotion.qemu.qmp import Qmp
from kvmotion.storage import host as storage_host

log = logging.getLogger("kvmotion.agent")

READY_MARK = b"KVMOTION READY"
LEASE_RENEW_INTERVAL = 5.0  # s; datastore leases expire after 15 s by default
LEASE_RETRY_INTERVAL = 1.0  # s; after a failed renewal: an unreachable datastore may be back any moment
ORPHAN_CANCEL_WAIT = 5.0  # s a restarted agent waits for QEMU to end the migration it cancels
# Memory the host keeps for itself and QEMU's own overhead when admitting VMs.
HOST_RESERVE = 256 << 20


@dataclass(frozen=True)
class HostConfig:
    name: str
    state_dir: Path
    run_dir: Path
    portgroups: dict[str, str]  # port group -> bridge on this host
    accel: AccelChoice
    confinement: confine.Confinement | None = None  # None: decided from this host (confine.choose)


@dataclass
class _Vm:
    record: VmRecord
    paths: VmPaths
    state: VmState = VmState.STOPPED
    proc: QemuProcess | None = None
    qmp: Qmp | None = None
    serial_offset: int = 0
    # NBD node under each disk's format node; changes when a rolled-back migration reattaches.
    proto_nodes: list[str] = field(default_factory=list)
    io_error_since: float | None = None  # QEMU paused it on a disk error (werror=stop); the agent resumes it
    watcher: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.record.spec.name


class VmManager:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.confinement = config.confinement or confine.choose(config.accel.accel)
        confine.say_once(self.confinement)
        self.store = VmStore(config.state_dir)
        self.disk_dir = config.state_dir / "disks"
        self._vms: dict[str, _Vm] = {}
        self._lease_task: asyncio.Task | None = None
        # Uncommitted shadows found running at recover(), (VM, migration id): with keeps_stale_shadows
        # the migration service has their source stop its stream before they go (a source QEMU 10.0
        # can abort when its multifd TLS stream's sockets die under it: migration/cancel.py).
        self.keeps_stale_shadows = False
        self.stale_shadows: list[tuple[str, str]] = []

    # ---- helpers -------------------------------------------------------------------------------
    def _paths(self, name: str) -> VmPaths:
        return VmPaths(self.config.run_dir / "vms" / name)

    def _vm(self, name: str) -> _Vm:
        try:
            return self._vms[name]
        except KeyError:
            raise NotFound(f"no VM named {name} on host {self.config.name}") from None

    def local_disk_path(self, disk: DiskSpec) -> Path:
        """A local disk's file: always directly inside this host's disk folder."""
        name = disk.source
        if disk.datastore is not None or name in (".", "..") or Path(name).name != name:
            raise InvalidInput(f"local disk {name!r} is not a file name in {self.disk_dir}")
        return self.disk_dir / name

    def _local_disk_exists(self, spec: VmSpec, disk: DiskSpec) -> bool:
        """Whether the disk's file exists; refused (InvalidInput) unless it is a regular file of
        its own: not a symlink, device, FIFO or folder that QEMU would follow or open."""
        path = self.local_disk_path(disk)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise InvalidInput(f"disk {disk.source} of VM {spec.name} is {kind} in {self.disk_dir}: "
                               "a local disk must be a plain file there")
        return True

    def status(self, name: str) -> VmStatus:
        vm = self._vm(name)
        spec = vm.record.spec
        return VmStatus(
            name=spec.name,
            state=vm.state,
            host=self.config.name,
            memory=spec.memory,
            vcpus=spec.vcpus,
            pid=vm.proc.pid if vm.proc else None,
            started_at=vm.proc.started_at if vm.proc else None,
            ready=self._ready(vm),
            spec=spec,
        )

    def list(self) -> list[VmStatus]:
        return [self.status(n) for n in sorted(self._vms)]

    async def dirty_rates(self) -> dict[str, float]:
        """Each running VM's last measured dirty rate, bytes/s, and its next measurement started
        (kvmotion.qemu.dirtyrate). VMs not running, migrating included, are not measured."""
        return await dirtyrate.sample_all({vm.name: vm.qmp.execute_within for vm in self._vms.values()
                                           if vm.state is VmState.RUNNING and vm.qmp is not None})

    def incoming_migration(self, name: str) -> str | None:
        """The migration VM `name` is the uncommitted shadow of, if it is one."""
        vm = self._vms.get(name)
        return vm.record.incoming_migration if vm is not None else None

    def committed_memory(self, exclude: str | None = None) -> int:
        return sum(
            vm.record.spec.memory
            for vm in self._vms.values()
            if vm.proc is not None and vm.name != exclude
        )

    def check_memory(self, spec: VmSpec) -> None:
        mem = resources.meminfo()
        if spec.memory > mem.total - HOST_RESERVE:
            raise InsufficientResources(
                f"VM {spec.name} wants {spec.memory >> 20} MiB but host {self.config.name} has only "
                f"{(mem.total - HOST_RESERVE) >> 20} MiB for VMs"
            )
        free = min(mem.available, mem.total - HOST_RESERVE - self.committed_memory(exclude=spec.name))
        if spec.memory > free:
            raise InsufficientResources(
                f"VM {spec.name} wants {spec.memory >> 20} MiB but host {self.config.name} has "
                f"{max(free, 0) >> 20} MiB free"
            )

    def _ready(self, vm: _Vm) -> bool:
        if vm.proc is None:
            return False
        if vm.record.committed_migration:
            return True  # the guest said READY on the host it came from; its log stayed there
        try:
            with open(vm.paths.serial_log, "rb") as f:
                f.seek(vm.serial_offset)
                return READY_MARK in f.read()
        except OSError:
            return False

    # ---- recovery ------------------------------------------------------------------------------
    async def recover(self) -> None:
        """Load every defined VM; re-attach to those whose QEMU still runs."""
        self._lease_task = asyncio.create_task(self._keep_leases())
        for record in self.store.all():
            vm = _Vm(record=record, paths=self._paths(record.spec.name))
            self._vms[vm.name] = vm
            proc = QemuProcess.attach(vm.paths, process_tag(record.spec))
            if record.incoming_migration:
                # An uncommitted shadow VM: the source never got our commit, so it keeps (or
                # takes back) the VM. Destroy the shadow so there is never a second copy; one
                # still receiving is left to `stale_shadows` (the migration service) to end in order.
                if proc is not None and self.keeps_stale_shadows:
                    vm.proc, vm.state = proc, VmState.INCOMING
                    vm.watcher = asyncio.create_task(self._watch(vm, proc))  # forgets it once it exits
                    self.stale_shadows.append((vm.name, record.incoming_migration))
                    continue
                if proc is not None:
                    proc.kill_and_wait()
                await self._release_host_resources(record.spec)
                self._forget(vm.name)
                continue
            if proc is None:
                continue
            vm.proc = proc
            vm.serial_offset = self._last_ready_offset(vm)
            try:
                await self._connect(vm)
            except VmFailed:
                vm.proc = None
                vm.state = VmState.CRASHED
                continue
            await self._find_proto_nodes(vm)
            await self._cancel_orphan_migration(vm)
            await asyncio.to_thread(self._lift_leftover_throttle, vm.name, proc.pid)
            vm.state = await self._qemu_state(vm)

    @staticmethod
    def _lift_leftover_throttle(name: str, pid: int) -> None:
        """A migration this agent drove before it was killed may have left the VM's vCPUs throttled."""
        try:
            moved = throttle.lift_leftover(pid)
        except KvmotionError as exc:
            log.warning("VM %s: cannot lift a throttle left by a migration before this agent restarted: %s", name, exc)
            return
        if moved:
            log.warning("VM %s: lifted the vCPU throttle a migration left before this agent restarted (%d threads)",
                        name, moved)

    async def _find_proto_nodes(self, vm: _Vm) -> None:
        """A rolled-back migration gave a datastore disk a new NBD node; a restarted agent asks
        QEMU which one it is now, so a later rollback replaces the right one."""
        spec = vm.record.spec
        if not spec.on_datastore:
            return
        assert vm.qmp is not None
        nodes = self.proto_nodes(vm.name)
        try:
            found = await vm.qmp.execute("query-named-block-nodes", flat=True)
        except VmFailed as exc:
            log.warning("VM %s: cannot list its block nodes (%s): assuming the command line's", vm.name, exc)
            return
        nodes[:] = storage_host.current_proto_nodes(spec, self.config.name, found, nodes)  # type: ignore[arg-type]

    async def _cancel_orphan_migration(self, vm: _Vm) -> None:
        """An outgoing migration whose driving agent died: cancel it so QEMU resumes the source
        (the destination's guard destroys the uncommitted shadow when it finds the source forgot it).
        From pre-switchover on, the agent may have handed the disk leases over, or its request may
        still land: they are taken back first (as the engine's rollback does) and QEMU gets new NBD
        connections, or the resumed guest's writes would be fenced."""
        assert vm.qmp is not None
        status = (await vm.qmp.execute("query-migrate")).get("status")  # type: ignore[union-attr]
        if status not in ("setup", "active", "pre-switchover", "device", "wait-unplug"):
            return
        log.warning("VM %s had a migration in %s when this agent restarted: cancelling it", vm.name, status)
        # Paused before switchover the stream's end has not been sent: no other host can run the
        # VM, so the leases come back before QEMU resumes it (it does so itself on cancel).
        if status == "pre-switchover" and not await self._reclaim_leases(vm):
            return
        # A stalled stream is broken off in the order QEMU 10.0 survives (qemu/cancel.py).
        final = (await cancel_migration(vm.qmp.execute, vm.proc.pid if vm.proc else None, ORPHAN_CANCEL_WAIT)).value
        # Only a migration that did not complete may resume here: a completed one may run elsewhere.
        if final not in ("cancelled", "failed"):
            return
        if status in ("device", "wait-unplug") and not await self._reclaim_leases(vm):
            return
        if (await vm.qmp.execute("query-status"))["status"] != "running":  # type: ignore[index]
            await vm.qmp.execute("cont")  # also past a fenced write QEMU paused on (werror=stop)

    async def _reclaim_leases(self, vm: _Vm) -> bool:
        """Take the VM's disk leases back from wherever an interrupted hand-over left them, under a
        new generation, and give QEMU new NBD connections. False (logged) if that failed: the VM
        must then not run."""
        spec = vm.record.spec
        if not spec.on_datastore:
            return True
        assert vm.qmp is not None
        try:
            await asyncio.to_thread(storage_host.take_back_leases, spec, None, self.config.name)
            await storage_host.reattach_disks(spec, self.config.name, vm.qmp, self.proto_nodes(vm.name), f"r{time.time_ns() % 10**8:08d}")
        except KvmotionError as exc:
            log.error("VM %s stays paused: its disk leases could not be taken back after its migration "
                      "was interrupted: %s", vm.name, exc)
            return False
        return True

    def _last_ready_offset(self, vm: _Vm) -> int:
        """Offset of the last boot's READY line in the (appended) serial log, so `ready` stays true."""
        try:
            data = vm.paths.serial_log.read_bytes()
        except OSError:
            return 0
        idx = data.rfind(READY_MARK)
        return max(idx, 0)

    async def _qemu_state(self, vm: _Vm) -> VmState:
        assert vm.qmp is not None
        status = await vm.qmp.execute("query-status")
        st = status["status"]  # type: ignore[index]
        if st == "running":
            return VmState.RUNNING
        if st == "inmigrate":
            return VmState.INCOMING
        if st in ("finish-migrate", "postmigrate") or vm.record.incoming_migration:
            return VmState.MIGRATING if not vm.record.incoming_migration else VmState.INCOMING
        return VmState.PAUSED

    async def _connect(self, vm: _Vm) -> None:
        assert vm.proc is not None
        proc = vm.proc
        qmp = Qmp(vm.name)
        await qmp.connect(vm.paths.qmp, alive=proc.alive)
        vm.qmp = qmp
        vm.watcher = asyncio.create_task(self._watch(vm, proc))

    async def _watch(self, vm: _Vm, proc: QemuProcess) -> None:
        await proc.wait_exit()
        if vm.proc is not proc:
            return
        expected = vm.state in (VmState.STOPPING, VmState.STOPPED)
        vm.state = VmState.STOPPED if expected else VmState.CRASHED
        vm.proc = None
        if vm.qmp is not None:
            await vm.qmp.close()
            vm.qmp = None
        await self._release_host_resources(vm.record.spec)
        if not vm.record.incoming_migration:
            await self._release_leases(vm.record.spec)
        if vm.record.incoming_migration and vm.name in self._vms:
            self._forget(vm.name)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def create(self, spec: VmSpec, *, incoming_migration: str | None = None) -> VmStatus:
        if spec.name in self._vms:
            raise Conflict(f"VM {spec.name} already exists on host {self.config.name}")
        mem = resources.meminfo()
        if spec.memory > mem.total - HOST_RESERVE:
            raise InsufficientResources(
                f"VM {spec.name} wants {spec.memory >> 20} MiB but host {self.config.name} has only "
                f"{(mem.total - HOST_RESERVE) >> 20} MiB for VMs"
            )
        for nic in spec.nics:
            if nic.portgroup not in self.config.portgroups:
                raise NotFound(
                    f"port group {nic.portgroup} does not exist on host {self.config.name} "
                    f"(it has: {', '.join(sorted(self.config.portgroups)) or 'none'})"
                )
        self.check_cpu_model(spec)
        # Every disk is checked before any is created, and a failure removes the ones this call made.
        missing = [disk for disk in spec.disks if not self._check_disk(spec, disk)]
        created: list[Path] = []
        try:
            for disk in missing:
                created.append(self._create_disk(disk))
            record = VmRecord(spec=spec, created_at=time.time(), incoming_migration=incoming_migration)
            self.store.add(record)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
        self._vms[spec.name] = _Vm(record=record, paths=self._paths(spec.name))
        return self.status(spec.name)

    def check_cpu_model(self, spec: VmSpec) -> None:
        """The VM's CPU model is one this host's QEMU lists, 'host' under KVM, or the cluster's baseline."""
        model = spec.cpu_model
        listed = frozenset() if model == "host" else cpus.listed_models()
        baseline = None if model == "host" or model in listed else load_config().cpu_baseline
        cpus.check_runnable_cpu(model, self.config.accel.accel, listed, baseline, self.config.name)

    def _check_disk(self, spec: VmSpec, disk: DiskSpec) -> bool:
        """Whether the disk exists; raises if it is unusable, or missing with no size to create it."""
        if disk.datastore is not None:
            storage_host.check_disk(disk, self.config.name)  # datastore disks are checked by the storage layer
            return True
        if self._local_disk_exists(spec, disk):
            return True
        if not disk.size:
            raise NotFound(f"disk {disk.source} of VM {spec.name} does not exist in {self.disk_dir} "
                           f"(give a size, e.g. {disk.source}:2G, to create it)")
        return False

    def _create_disk(self, disk: DiskSpec) -> Path:
        path = self.local_disk_path(disk)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL|O_NOFOLLOW: never through a symlink, never over a file that appeared meanwhile;
            # 0600: QEMU gets it open from the agent, the QEMUs of other VMs (one user) must not read it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InsufficientResources(f"cannot create disk {path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, disk.size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise InsufficientResources(f"cannot create disk {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return path

    def _disk_nodes(self, spec: VmSpec) -> tuple[dict, ...]:
        nodes = []
        for i, disk in enumerate(spec.disks):
            if disk.datastore is not None:
                nodes.append(storage_host.blockdev_for(disk, host=self.config.name, node_name=f"disk{i}-proto"))
            else:
                if not self._local_disk_exists(spec, disk):
                    raise NotFound(f"disk {disk.source} of VM {spec.name} is missing from {self.disk_dir}")
                nodes.append(local_file_node(i))
        return tuple(nodes)

    def _local_disks(self, spec: VmSpec) -> tuple[Path | None, ...]:
        """Each disk's local file (QEMU gets it open), None for a datastore disk."""
        found: list[Path | None] = []
        for disk in spec.disks:
            if disk.datastore is not None:
                found.append(None)
            elif not self._local_disk_exists(spec, disk):
                raise NotFound(f"disk {disk.source} of VM {spec.name} is missing from {self.disk_dir}")
            else:
                found.append(self.local_disk_path(disk))
        return tuple(found)

    async def _setup_host_resources(self, spec: VmSpec) -> tuple[int, ...]:
        """Each NIC's TAP, created on its port group's bridge and opened here, in the agent's
        namespace: descriptors for QEMU, the caller's to close."""
        def setup() -> tuple[int, ...]:
            fds: list[int] = []
            try:
                for i, nic in enumerate(spec.nics):
                    bridge = self.config.portgroups[nic.portgroup]
                    links.ensure_bridge(bridge)
                    tap = links.tap_name(spec.name, i)
                    links.create_tap(tap, bridge)
                    fds.append(links.open_tap(tap))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return tuple(fds)

        # pyroute2's synchronous API runs its own event loop: keep it off the agent's.
        return await asyncio.to_thread(setup) if spec.nics else ()

    async def _release_host_resources(self, spec: VmSpec) -> None:
        def release() -> None:
            for i, _ in enumerate(spec.nics):
                links.delete_tap(links.tap_name(spec.name, i))

        if spec.nics:
            await asyncio.to_thread(release)

    def _argv(self, spec: VmSpec, fds: QemuFds, incoming: bool) -> list[str]:
        image = guest_image.ensure_image()
        if self.confinement.user is not None:  # the only files QEMU opens by path
            for path in (image.kernel, image.initramfs):
                confine.check_readable(path, self.confinement.user)
        ctx = HostContext(
            accel=self.config.accel.accel,
            kernel=image.kernel,
            initramfs=image.initramfs,
            kernel_cmdline=kernel_cmdline(spec),
            fds=fds,
            disk_nodes=self._disk_nodes(spec),
            incoming=incoming,
            paused=incoming,
            objects=self._qemu_objects(spec),
        )
        return build_argv(spec, self._paths(spec.name), ctx)

    def _qemu_objects(self, spec: VmSpec) -> tuple[dict, ...]:
        """-objects for datastore disks (NBD TLS credentials); an unprivileged QEMU must read their files."""
        if not spec.on_datastore:
            return ()
        objects = storage_host.qemu_objects(spec, self.config.name)
        if self.confinement.user is not None:
            fix = (f"join {self.config.name} again (`kvmotion host join --force`) now that the user exists, "
                   f"or chgrp {confine.QEMU_USER} and chmod 0640 the key")
            for obj in objects:
                for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
                    confine.check_readable(Path(str(obj["dir"])) / name, self.confinement.user, fix)
        return objects

    async def start(self, name: str, *, wait_ready: bool = False, timeout: float = 60.0, incoming: bool = False) -> VmStatus:
        vm = self._vm(name)
        async with vm.lock:
            if vm.proc is not None and vm.proc.alive():
                raise Conflict(f"VM {name} is already {vm.state.value} on host {self.config.name} (pid {vm.proc.pid})")
            running = QemuProcess.attach(vm.paths, process_tag(vm.record.spec))
            if running is not None:  # belt and braces: never a second copy
                raise Conflict(f"VM {name} already has a QEMU process (pid {running.pid})")
            spec = vm.record.spec
            vm.proto_nodes.clear()  # a new QEMU has the disk nodes of its command line
            self.check_memory(spec)
            if not incoming:
                self._acquire_leases(spec)
            taps = await self._setup_host_resources(spec)
            try:
                # Root's only: QEMU gets its sockets and files as descriptors (open_fds).
                vm.paths.root.mkdir(parents=True, exist_ok=True)
                os.chmod(vm.paths.root, 0o700)
                try:
                    vm.serial_offset = vm.paths.serial_log.stat().st_size
                except OSError:
                    vm.serial_offset = 0
                fds = open_fds(vm.paths, taps, self._local_disks(spec))
                try:
                    argv = self._argv(spec, fds, incoming)
                    vm.state = VmState.STARTING
                    vm.proc = QemuProcess.start(argv, vm.paths, process_tag(spec), pass_fds=fds.passed(),
                                                user=self.confinement.user)
                finally:
                    close_own_fds(fds)  # QEMU has its own copies
                try:
                    await self._connect(vm)
                except VmFailed as exc:
                    detail = vm.proc.last_log_line() if vm.proc else ""
                    if vm.proc is not None and vm.proc.alive():
                        await asyncio.to_thread(vm.proc.kill_and_wait)  # never leave a QEMU we gave up on
                    vm.proc = None
                    vm.state = VmState.STOPPED
                    raise VmFailed(f"VM {name} failed to start: {detail or exc}") from exc
            except BaseException:
                if vm.proc is None:
                    await self._release_host_resources(spec)
                    vm.state = VmState.STOPPED
                raise
            finally:
                for fd in taps:
                    os.close(fd)
            vm.state = VmState.INCOMING if incoming else VmState.RUNNING
        if wait_ready:
            await self.wait_ready(name, timeout)
        return self.status(name)

    def _acquire_leases(self, spec: VmSpec) -> None:
        if spec.on_datastore:
            storage_host.acquire_leases(spec, host=self.config.name)

    async def wait_ready(self, name: str, timeout: float) -> None:
        vm = self._vm(name)
        deadline = time.monotonic() + timeout
        while not self._ready(vm):
            if vm.proc is None:
                raise VmFailed(f"VM {name} stopped before its guest was ready (see {vm.paths.serial_log})")
            if time.monotonic() > deadline:
                raise VmFailed(f"VM {name} did not print its ready line within {timeout:.0f} s (see {vm.paths.serial_log})")
            await asyncio.sleep(0.02)

    async def stop(self, name: str, *, force: bool = False, timeout: float = 15.0) -> VmStatus:
        vm = self._vm(name)
        async with vm.lock:
            proc = vm.proc
            if proc is None:
                raise Conflict(f"VM {name} is not running on host {self.config.name}")
            vm.state = VmState.STOPPING
            if not force and vm.qmp is not None:
                try:
                    # quit flushes every block device before QEMU exits, so acknowledged writes are on disk.
                    await vm.qmp.execute("stop")
                    await vm.qmp.execute("quit")
                except VmFailed:
                    pass
                try:
                    await asyncio.wait_for(proc.wait_exit(), timeout)
                except TimeoutError:
                    proc.kill(signal.SIGKILL)
            else:
                proc.kill(signal.SIGKILL)
            await proc.wait_exit()
            if vm.watcher is not None:
                await vm.watcher
            vm.state = VmState.STOPPED
        return self.status(name)

    async def delete(self, name: str) -> None:
        vm = self._vm(name)
        if vm.proc is not None:
            raise Conflict(f"VM {name} is {vm.state.value}: stop it before deleting it")
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.store.remove(name)
        self._vms.pop(name, None)

    async def _keep_leases(self) -> None:
        """Renew the disk leases of the VMs that hold them; a VM whose lease is lost is stopped,
        never run without its disk (another host may hold it now). A source VM keeps renewing
        during its migration (pre-copy can outlast the lease), until switchover moves the lease.
        After a renewal, a VM that QEMU paused on a disk error is resumed (see _resume_after_io_error)."""
        failing: set[str] = set()  # VMs whose last renewal failed: retried sooner, logged once
        while True:
            await asyncio.sleep(LEASE_RETRY_INTERVAL if failing else LEASE_RENEW_INTERVAL)
            for vm in list(self._vms.values()):
                spec = vm.record.spec
                # Not PAUSED: a source held paused after a commit with no answer has handed its
                # lease over, and must neither renew nor be stopped until the engine settles it.
                if vm.state not in (VmState.RUNNING, VmState.MIGRATING) or not spec.on_datastore:
                    failing.discard(vm.name)
                    continue
                try:
                    await asyncio.to_thread(storage_host.renew_leases, spec, self.config.name)
                except LeaseError as exc:
                    failing.discard(vm.name)
                    if vm.state is VmState.MIGRATING:
                        continue  # moved to the destination at switchover; a rollback brings it back
                    log.error("VM %s lost its disk lease (%s): stopping it", vm.name, exc)
                    try:
                        await self.stop(vm.name, force=True)
                    except KvmotionError as stop_exc:
                        log.warning("stopping VM %s: %s", vm.name, stop_exc)
                    continue
                except KvmotionError as exc:
                    if vm.name not in failing:
                        log.warning("renewing the leases of VM %s: %s (retrying every %.0f s)", vm.name, exc,
                                    LEASE_RETRY_INTERVAL)
                    failing.add(vm.name)
                    continue
                if vm.name in failing:
                    log.warning("renewed the leases of VM %s again", vm.name)
                    failing.discard(vm.name)
                if vm.state is VmState.RUNNING:
                    await self._resume_after_io_error(vm)

    async def _resume_after_io_error(self, vm: _Vm) -> None:
        """`cont` a VM that QEMU paused on a disk error while this host holds its leases.

        werror/rerror=stop pause the VM when its datastore stays away longer than NBD's
        reconnect-delay (storage/attach.py); QEMU keeps the failed requests and retries them on
        `cont`. Nothing else resumes it: once the lease renews the datastore is back, so try. If
        QEMU's NBD client has not reconnected yet (it retries every 16 s by then), the retry
        fails and the VM pauses again until a later round."""
        if vm.qmp is None:
            return
        try:
            status = await vm.qmp.execute("query-status")
            if not isinstance(status, dict) or status.get("status") != "io-error":
                vm.io_error_since = None
                return
            if vm.io_error_since is None:
                vm.io_error_since = time.monotonic()
                log.warning("VM %s was paused by a disk I/O error; its leases renew: resuming it", vm.name)
            await vm.qmp.execute("cont")
        except KvmotionError as exc:
            log.warning("resuming VM %s after a disk I/O error: %s", vm.name, exc)

    async def _release_leases(self, spec: VmSpec) -> None:
        if spec.on_datastore:
            try:
                await asyncio.to_thread(storage_host.release_leases, spec, self.config.name)
            except KvmotionError:
                pass  # not ours any more (moved at switchover, or expired): nothing to release

    async def shutdown(self) -> None:
        """Agent exit: leave VMs running, just drop our monitor connections."""
        if self._lease_task is not None:
            self._lease_task.cancel()
        for vm in self._vms.values():
            if vm.watcher is not None:
                vm.watcher.cancel()
            if vm.qmp is not None:
                await vm.qmp.close()

    def proto_nodes(self, name: str) -> list[str]:
        vm = self._vm(name)
        if len(vm.proto_nodes) != len(vm.record.spec.disks):
            vm.proto_nodes[:] = [f"disk{i}-proto" for i in range(len(vm.record.spec.disks))]
        return vm.proto_nodes

    def set_state(self, name: str, state: VmState) -> None:
        self._vm(name).state = state

    def commit_incoming(self, name: str, migration_id: str) -> None:
        """The shadow VM becomes this host's VM (persisted before it resumes)."""
        vm = self._vm(name)
        vm.record = dataclasses.replace(vm.record, incoming_migration=None, committed_migration=migration_id)
        self.store.put(vm.record)
        vm.state = VmState.RUNNING

    def set_resumed(self, name: str, at: float) -> None:
        vm = self._vm(name)
        vm.record = dataclasses.replace(vm.record, resumed_at=at)
        self.store.put(vm.record)

    def qmp(self, name: str) -> Qmp:
        vm = self._vm(name)
        if vm.qmp is None:
            raise Conflict(f"VM {name} is not running on host {self.config.name}")
        return vm.qmp
