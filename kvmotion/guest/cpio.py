"""A writer of "newc" cpio archives, the format the kernel unpacks as an initramfs.

Pure: entries in, bytes out. All owners are root and all times zero, so the same inputs give the
same archive byte for byte.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One archive member; `path` is relative to the root ("bin/busybox")."""

    path: str
    mode: int  # type bits and permissions, as in st_mode
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # major, minor of a device node


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.path.strip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))


def archive(entries: list[Entry]) -> bytes:
    """The archive of these entries, in order (a directory must come before what it holds)."""
    seen: set[str] = set()
    parts = []
    for ino, entry in enumerate(entries, start=1):
        key = entry.path.strip("/")
        if key in seen:
            raise ValueError(f"duplicate cpio entry {key!r}")
        seen.add(key)
        parts.append(_member(ino, entry))
    parts.append(_member(0, Entry("TRAILER!!!", 0)))
    return b"".join(parts)
