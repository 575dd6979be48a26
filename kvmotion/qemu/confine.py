"""QEMU's confinement: every VM QEMU runs under a seccomp sandbox and, where the host has the
user, as the unprivileged `kvmotion-qemu` (scripts/qemu-user.sh creates it).

QEMU is started already unprivileged (the agent's Popen sets uid, gid and groups before exec):
it never holds root. Everything it needs the agent opens for it and passes as descriptors (TAP,
monitor and serial sockets, serial log, local disk files); the only paths QEMU still opens are the
guest kernel and initramfs and, for an encrypted migration, the TLS credentials folder.

The decision is a pure function of the facts, like the accelerator's (kvmotion.qemu.accel).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core.errors import SetupError
from kvmotion.qemu.accel import Accel

QEMU_USER = "kvmotion-qemu"  # user and group of the same name
# libvirt's default sandbox: no obsolete syscalls, no set*id, no fork/exec, no scheduler or
# affinity changes by QEMU itself.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
KVM_DEVICE = Path("/dev/kvm")

READ, WRITE, SEARCH = 4, 2, 1  # permission bits of one class (owner, group or others)


@dataclass(frozen=True)
class QemuUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (kvm when the user is in it)


@dataclass(frozen=True)
class FileAccess:
    """Who owns a file and its mode bits, as stat() tells."""

    mode: int
    uid: int
    gid: int

    def allows(self, user: QemuUser, want: int) -> bool:
        """Whether `user` has every bit of `want` (READ|WRITE|SEARCH): the owner's bits if it owns
        the file, else the group's if it is in the group, else the others' (as the kernel decides)."""
        if user.uid == self.uid:
            bits = self.mode >> 6
        elif self.gid == user.gid or self.gid in user.groups:
            bits = self.mode >> 3
        else:
            bits = self.mode
        return bits & want == want

    @staticmethod
    def of(path: Path) -> FileAccess:
        st = path.stat()
        return FileAccess(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)


@dataclass(frozen=True)
class Confinement:
    user: QemuUser | None  # None: QEMU runs as the agent's own user
    runs_as: str  # the user name QEMU runs as
    reason: str


def decide(user: QemuUser | None, agent_uid: int, agent_name: str, accel: Accel, kvm: FileAccess | None) -> Confinement:
    """Run QEMU as `user` when there is one, the agent may switch to it, and (under KVM) it can
    open /dev/kvm; otherwise as the agent's own user, saying why."""
    if user is None:
        return Confinement(None, agent_name, f"no user {QEMU_USER} on this host (scripts/setup-host.sh creates "
                                             f"it): QEMU runs as {agent_name}, sandboxed only")
    if agent_uid != 0:
        return Confinement(None, agent_name, f"the agent is not root: QEMU runs as {agent_name}, not {QEMU_USER}")
    if accel is Accel.KVM and (kvm is None or not kvm.allows(user, READ | WRITE)):
        return Confinement(None, agent_name, f"user {QEMU_USER} cannot open {KVM_DEVICE} (add it to the device's "
                                             f"group, e.g. kvm): QEMU runs as {agent_name}, sandboxed only")
    return Confinement(user, user.name, f"QEMU runs as user {user.name}, sandboxed")


def lookup(name: str = QEMU_USER) -> QemuUser | None:
    """The user `name` with its primary and supplementary groups, or None if the host has none."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid)) - {pw.pw_gid}))
    return QemuUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid, groups=groups)


def qemu_gid(name: str = QEMU_USER) -> int | None:
    """The group QEMU runs with, for files the agent makes readable to it; None if it does not exist."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def choose(accel: Accel) -> Confinement:
    try:
        kvm = FileAccess.of(KVM_DEVICE)
    except OSError:
        kvm = None
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return decide(lookup(), uid, name, accel, kvm)


def check_readable(path: Path, user: QemuUser, fix: str = "make it readable (chmod o+r)") -> None:
    """Raise SetupError unless `user` can reach and read `path` (every parent searchable); `fix`
    tells how to let it read the file itself."""
    path = path.absolute()
    for folder in reversed(path.parents):
        if not FileAccess.of(folder).allows(user, SEARCH):
            raise SetupError(f"QEMU's user {user.name} cannot reach {path}: folder {folder} is not searchable "
                             f"by it (chmod o+x {folder}, or move the file)")
    try:
        readable = FileAccess.of(path).allows(user, READ)
    except FileNotFoundError:
        raise SetupError(f"{path} is missing (QEMU needs it)") from None
    if not readable:
        raise SetupError(f"QEMU's user {user.name} cannot read {path}: {fix}")


_said: set[str] = set()


def say_once(conf: Confinement) -> None:
    """Tell the operator once per process who QEMU runs as, when it is root."""
    if conf.user is None and conf.reason not in _said:
        _said.add(conf.reason)
        print(f"kvmotion: {conf.reason}", file=sys.stderr)
