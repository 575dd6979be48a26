"""QEMU's confinement: the sandbox and descriptors on its command line, who it runs as, what it
can read, and the descriptors the agent opens for it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec
from kvmotion.core.errors import NotFound, SetupError, VmFailed
from kvmotion.qemu import confine
from kvmotion.qemu.accel import Accel
from kvmotion.qemu.cmdline import HostContext, QemuFds, VmPaths, build_argv, local_file_node
from kvmotion.qemu.confine import FileAccess, QemuUser
from kvmotion.qemu.process import close_own_fds, open_fds
from kvmotion.qemu.qmp import Qmp

USER = QemuUser(name="kvmotion-qemu", uid=990, gid=990, groups=(993,))
NBD_NODE = {"driver": "nbd", "server": {"type": "inet", "host": "10.0.0.1", "port": "10809"}, "export": "d@h"}


def _spec() -> VmSpec:
    return VmSpec(
        name="web1", memory=256 << 20,
        nics=(NicSpec(mac="52:54:00:00:00:01", portgroup="a"), NicSpec(mac="52:54:00:00:00:02", portgroup="a")),
        disks=(DiskSpec(source="local.img"), DiskSpec(source="web1.img", datastore="ds1")),
    )


def _argv(fds: QemuFds, paths: VmPaths = VmPaths(Path("/run/x/vms/web1"))) -> list[str]:
    ctx = HostContext(accel=Accel.TCG, kernel=Path("/k"), initramfs=Path("/i"), kernel_cmdline="quiet",
                      fds=fds, disk_nodes=(local_file_node(0), NBD_NODE))
    return build_argv(_spec(), paths, ctx)


FDS = QemuFds(qmp=3, serial=4, serial_log=5, taps=(6, 7), disks=(8, None))


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == option]


def test_every_qemu_is_sandboxed() -> None:
    assert _values(_argv(FDS), "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_nics_are_taps_by_descriptor_in_json() -> None:
    argv = _argv(FDS)
    assert [json.loads(v) for v in _values(argv, "-netdev")] == [
        {"type": "tap", "id": "net0", "fd": "6"}, {"type": "tap", "id": "net1", "fd": "7"},
    ]
    assert not any("ifname" in word or "script=" in word for word in argv)


def test_monitor_serial_and_log_are_descriptors_and_qemu_writes_no_pid_file() -> None:
    argv = _argv(FDS)
    assert _values(argv, "-chardev") == [
        "socket,id=ser0,fd=4,server=on,wait=off,logfile=/dev/fdset/0,logappend=on",
        "socket,id=qmp0,fd=3,server=on,wait=off",
    ]
    assert "-pidfile" not in argv
    assert not any("/run/x/vms/web1/" in word and not word.startswith("fd=") for word in argv)


def test_local_disks_are_fd_sets_and_datastore_disks_stay_nbd() -> None:
    argv = _argv(FDS)
    assert _values(argv, "-add-fd") == [
        "fd=5,set=0,opaque=/run/x/vms/web1/serial.log",
        "fd=8,set=1,opaque=disk0",
    ]
    protos = [json.loads(v) for v in _values(argv, "-blockdev") if "disk" in json.loads(v)["node-name"]
              and json.loads(v)["node-name"].endswith("-proto")]
    assert protos[0]["filename"] == "/dev/fdset/1" and protos[0]["driver"] == "file"
    assert protos[1]["driver"] == "nbd"


def test_commas_in_the_run_folder_are_escaped() -> None:
    argv = _argv(FDS, VmPaths(Path("/run/a,b/vms/web1")))
    assert "fd=5,set=0,opaque=/run/a,,b/vms/web1/serial.log" in _values(argv, "-add-fd")


@pytest.mark.parametrize("fds", [
    QemuFds(qmp=3, serial=4, serial_log=5, taps=(6,), disks=(8, None)),
    QemuFds(qmp=3, serial=4, serial_log=5, taps=(6, 7), disks=(8,)),
])
def test_descriptors_must_match_the_spec(fds: QemuFds) -> None:
    with pytest.raises(ValueError):
        _argv(fds)


def test_passed_lists_every_descriptor_once() -> None:
    assert sorted(FDS.passed()) == [3, 4, 5, 6, 7, 8]


# ---- who QEMU runs as


KVM_GROUP_RW = FileAccess(mode=0o660, uid=0, gid=993)
KVM_ROOT_ONLY = FileAccess(mode=0o600, uid=0, gid=0)


def test_runs_as_the_user_when_it_exists() -> None:
    conf = confine.decide(USER, 0, "root", Accel.TCG, None)
    assert conf.user == USER and conf.runs_as == "kvmotion-qemu"


def test_without_the_user_qemu_runs_as_root_and_says_why() -> None:
    conf = confine.decide(None, 0, "root", Accel.TCG, None)
    assert conf.user is None and conf.runs_as == "root"
    assert "no user kvmotion-qemu" in conf.reason and "setup-host.sh" in conf.reason


def test_a_non_root_agent_cannot_switch_users() -> None:
    conf = confine.decide(USER, 1000, "alice", Accel.TCG, None)
    assert conf.user is None and conf.runs_as == "alice"


def test_kvm_needs_the_device_open_to_the_user() -> None:
    assert confine.decide(USER, 0, "root", Accel.KVM, KVM_GROUP_RW).user == USER
    for kvm in (KVM_ROOT_ONLY, None):
        conf = confine.decide(USER, 0, "root", Accel.KVM, kvm)
        assert conf.user is None and "/dev/kvm" in conf.reason
    # TCG never opens /dev/kvm.
    assert confine.decide(USER, 0, "root", Accel.TCG, KVM_ROOT_ONLY).user == USER


def test_access_takes_the_owner_then_group_then_other_bits() -> None:
    assert FileAccess(0o644, 0, 0).allows(USER, confine.READ)
    assert not FileAccess(0o640, 0, 0).allows(USER, confine.READ)
    assert FileAccess(0o640, 0, 993).allows(USER, confine.READ)  # a supplementary group
    assert FileAccess(0o640, 0, 990).allows(USER, confine.READ)  # the primary group
    assert not FileAccess(0o044, 990, 0).allows(USER, confine.READ)  # owner bits win, as in the kernel
    assert not FileAccess(0o750, 0, 993).allows(USER, confine.READ | confine.WRITE)


@pytest.fixture
def open_dir():
    """A folder every user can reach (pytest's own tmp_path sits in a root-only folder)."""
    d = Path(tempfile.mkdtemp(prefix="kvconf"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_check_readable_names_the_folder_in_the_way(open_dir: Path) -> None:
    nobody = QemuUser(name="nobody", uid=65534, gid=65534, groups=())
    tmp_path = open_dir
    folder = tmp_path / "cache" / "guest"
    folder.mkdir(parents=True)
    kernel = folder / "vmlinux"
    kernel.write_bytes(b"k")
    for p in (tmp_path, tmp_path / "cache", folder):
        os.chmod(p, 0o755)
    os.chmod(kernel, 0o644)
    confine.check_readable(kernel, nobody)
    os.chmod(tmp_path / "cache", 0o700)
    with pytest.raises(SetupError, match=f"folder {tmp_path / 'cache'} is not searchable"):
        confine.check_readable(kernel, nobody)
    os.chmod(tmp_path / "cache", 0o755)
    os.chmod(kernel, 0o600)
    with pytest.raises(SetupError, match="cannot read"):
        confine.check_readable(kernel, nobody)


# ---- the descriptors the agent opens


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_fds_binds_the_sockets_and_opens_the_files(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm")
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    (paths.root).mkdir()
    paths.qmp.write_text("stale")  # a dead QEMU's socket file
    fds = open_fds(paths, (), (disk, None))
    try:
        assert fds.disks[1] is None and fds.disks[0] is not None
        for fd, path in ((fds.qmp, paths.qmp), (fds.serial, paths.serial)):
            sock = socket.socket(fileno=os.dup(fd))
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert sock.getsockname() == str(path)
            sock.close()
            assert not os.get_inheritable(fd)  # only pass_fds reaches QEMU
        os.write(fds.serial_log, b"line\n")
        assert paths.serial_log.read_bytes() == b"line\n"
        assert os.read(fds.disks[0], 4) == b"\0" * 4
    finally:
        close_own_fds(fds)


def test_open_fds_leaves_nothing_open_when_a_disk_is_missing(tmp_path: Path) -> None:
    before = _open_fd_count()
    with pytest.raises(NotFound, match="missing"):
        open_fds(VmPaths(tmp_path / "vm"), (), (tmp_path / "nope.img",))
    assert _open_fd_count() == before


def test_monitor_that_never_greets_fails_within_the_deadline(tmp_path: Path) -> None:
    # The agent binds the monitor socket itself: connect succeeds at once, the greeting may never come.
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    try:
        t0 = time.monotonic()
        with pytest.raises(VmFailed, match="did not answer"):
            asyncio.run(Qmp("t").connect(path, timeout=0.5))
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()


def test_disks_are_created_private(tmp_path: Path) -> None:
    from kvmotion.host.vms import HostConfig, VmManager
    from kvmotion.qemu.accel import AccelChoice

    conf = confine.decide(None, 0, "root", Accel.TCG, None)
    mgr = VmManager(HostConfig(name="h", state_dir=tmp_path / "s", run_dir=tmp_path / "r", portgroups={},
                               accel=AccelChoice(Accel.TCG, "test"), confinement=conf))
    spec = VmSpec(name="v1", memory=128 << 20, disks=(DiskSpec(source="v1.img", size=1 << 20),))
    mgr._create_disk(spec.disks[0])
    st = (tmp_path / "s" / "disks" / "v1.img").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 20


class _RecordingQmp:
    def __init__(self) -> None:
        self.commands: list[tuple[str, dict]] = []

    async def execute(self, command: str, **arguments) -> dict:
        self.commands.append((command, arguments))
        return {}


@pytest.mark.parametrize("qemu_group", [None, 65534])
def test_migration_tls_checks_qemu_can_read_its_key(open_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     qemu_group: int | None) -> None:
    # QEMU's own error for an unreadable key is "Error while reading file": the engine says why first.
    from kvmotion.host.vms import HostConfig, VmManager
    from kvmotion.migration.engine import add_stream_tls
    from kvmotion.qemu.accel import AccelChoice
    from tests.certs import TestCA
    from tests.joinedroot import make_root, serve_in_test

    monkeypatch.setattr(confine, "qemu_gid", lambda: qemu_group)
    root = serve_in_test(monkeypatch, make_root(open_dir / "h1", "h1", ca=TestCA(open_dir / "ca"),
                                                qemu_key_gid=confine.qemu_gid()))
    nobody = QemuUser(name="nobody", uid=65534, gid=65534, groups=())
    conf = confine.decide(nobody, 0, "root", Accel.TCG, None)
    mgr = VmManager(HostConfig(name="h1", state_dir=open_dir / "s", run_dir=open_dir / "r", portgroups={},
                               accel=AccelChoice(Accel.TCG, "test"), confinement=conf))
    qmp = _RecordingQmp()
    if qemu_group is None:
        with pytest.raises(SetupError, match=r"cannot read .*server-key.pem: join h1 again"):
            asyncio.run(add_stream_tls(qmp, "h1", "server", "h2", mgr.confinement.user))
        assert qmp.commands == []
    else:
        asyncio.run(add_stream_tls(qmp, "h1", "server", "h2", mgr.confinement.user))
        assert qmp.commands[-2][1]["dir"] == str(root.tls_dir / "qemu")
