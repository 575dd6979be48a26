"""Just enough ELF reading for the image builder: a kernel module's .modinfo, and static-ness.

Read in Python rather than with kmod's modinfo, which the host may lack and which wants the module
installed under /lib/modules of the running kernel.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from kvmotion.core.errors import SetupError

_PT_INTERP = 3


def _check_elf64(data: bytes, what: str) -> None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SetupError(f"{what} is not a 64-bit little-endian ELF file")


def modinfo(data: bytes, what: str = "module") -> tuple[tuple[str, str], ...]:
    """The key=value pairs of a kernel module's .modinfo section, in file order."""
    _check_elf64(data, what)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, strtab_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", strtab_off + name_off)
        if data[strtab_off + name_off : end] == b".modinfo":
            pairs = []
            for entry in data[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    pairs.append((key, value))
            return tuple(pairs)
    raise SetupError(f"{what} has no .modinfo section: is it a kernel module?")


def module_depends(data: bytes, what: str = "module") -> tuple[str, ...]:
    """The modules this one needs loaded first (its `depends=` field)."""
    for key, value in modinfo(data, what):
        if key == "depends":
            return tuple(normalize(m) for m in value.split(",") if m)
    return ()


def is_static(data: bytes) -> bool:
    """True if the executable needs no dynamic loader (it has no PT_INTERP program header)."""
    _check_elf64(data, "executable")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != _PT_INTERP for i in range(phnum))


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports them with '_'."""
    return name.replace("-", "_")


def load_order(roots: Iterable[str], depends: Callable[[str], tuple[str, ...]]) -> tuple[str, ...]:
    """Every module the roots need, each after its dependencies; roots keep their given order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise SetupError(f"kernel module {name} depends on itself (through {', '.join(sorted(visiting))})")
        visiting.add(name)
        for dep in depends(name):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(normalize(root))
    return tuple(order)


_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_entry(data: bytes) -> bool:
    """True if a vmlinux declares a PVH entry point, so QEMU can boot it directly with -kernel."""
    _check_elf64(data, "vmlinux")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
