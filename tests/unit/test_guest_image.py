"""The image builder: cpio writer, ELF reading, vmlinux extraction, and ensure_image on a fake kernel."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from kvmotion.core.errors import SetupError
from kvmotion.guest import cpio, elf, image, vmlinux


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev): an independent reader, to check the writer against."""
    out = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[pos : pos + size], (rmaj, rmin))
        pos = (pos + size + 3) & ~3


# ---- cpio ----


def test_cpio_round_trip() -> None:
    entries = [
        cpio.directory("bin"),
        cpio.regular("bin/tool", b"\x7fELF123", 0o755),
        cpio.regular("etc/odd", b"x" * 5),
        cpio.symlink("bin/sh", "busybox"),
        cpio.char_device("dev/console", 5, 1),
    ]
    got = read_newc(cpio.archive(entries))
    assert got["bin"][0] == stat.S_IFDIR | 0o755
    assert got["bin/tool"] == (stat.S_IFREG | 0o755, b"\x7fELF123", (0, 0))
    assert got["etc/odd"][1] == b"xxxxx"
    assert got["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox", (0, 0))
    assert got["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))


def test_cpio_is_deterministic_and_refuses_duplicates() -> None:
    entries = [cpio.regular("a", b"1"), cpio.regular("b", b"22")]
    assert cpio.archive(entries) == cpio.archive(list(entries))
    with pytest.raises(ValueError):
        cpio.archive([cpio.regular("a", b"1"), cpio.regular("/a", b"2")])


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_cpio_extracts_with_another_implementation(tmp_path: Path) -> None:
    entries = [cpio.directory("d"), cpio.regular("d/f", b"hello\n", 0o640), cpio.symlink("d/l", "f")]
    (tmp_path / "a.cpio").write_bytes(cpio.archive(entries))
    out = tmp_path / "out"
    out.mkdir()
    with open(tmp_path / "a.cpio", "rb") as f:
        subprocess.run(["busybox", "cpio", "-i", "-d"], stdin=f, cwd=out, check=True, capture_output=True)
    assert (out / "d/f").read_bytes() == b"hello\n"
    assert stat.S_IMODE((out / "d/f").stat().st_mode) == 0o640
    assert os.readlink(out / "d/l") == "f"


# ---- ELF ----


def _fake_module(path: Path, depends: str) -> None:
    src = path.with_suffix(".c")
    src.write_text(
        'static const char info[] __attribute__((section(".modinfo"), used)) =\n'
        f'    "license=GPL\\0depends={depends}\\0vermagic=9.9.9\\0";\n'
    )
    subprocess.run(["gcc", "-c", "-o", str(path), str(src)], check=True)
    src.unlink()


def test_modinfo_depends(tmp_path: Path) -> None:
    ko = tmp_path / "virtio_pci.ko"
    _fake_module(ko, "virtio_ring,virtio-pci-modern-dev")
    data = ko.read_bytes()
    assert ("license", "GPL") in elf.modinfo(data)
    assert elf.module_depends(data) == ("virtio_ring", "virtio_pci_modern_dev")


def test_modinfo_refuses_non_modules(tmp_path: Path) -> None:
    with pytest.raises(SetupError):
        elf.modinfo(b"not an elf at all" * 10)
    obj = tmp_path / "plain.o"
    (tmp_path / "plain.c").write_text("int x;\n")
    subprocess.run(["gcc", "-c", "-o", str(obj), str(tmp_path / "plain.c")], check=True)
    with pytest.raises(SetupError, match=r"no .modinfo"):
        elf.modinfo(obj.read_bytes())


def test_load_order_puts_dependencies_first() -> None:
    deps = {
        "virtio_ring": (),
        "virtio": ("virtio_ring",),
        "virtio_pci_modern_dev": (),
        "virtio_pci_legacy_dev": (),
        "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
        "failover": (),
        "net_failover": ("failover",),
        "virtio_net": ("virtio_ring", "virtio", "net_failover"),
        "virtio_blk": ("virtio", "virtio_ring"),
    }
    order = elf.load_order(["virtio_net", "virtio_blk", "virtio_pci"], deps.__getitem__)
    assert sorted(order) == sorted(deps)
    for name, needs in deps.items():
        assert all(order.index(d) < order.index(name) for d in needs)
    assert elf.load_order(image.MODULES, deps.__getitem__) == image.MODULES


def test_load_order_refuses_cycles() -> None:
    deps = {"a": ("b",), "b": ("a",)}
    with pytest.raises(SetupError, match="depends on itself"):
        elf.load_order(["a"], deps.__getitem__)


def _static_exe(tmp_path: Path, name: str, extra: str = "", flags: tuple[str, ...] = ("-static",)) -> bytes:
    src = tmp_path / f"{name}.c"
    src.write_text(f"{extra}\nint main(void) {{ return 0; }}\n")
    subprocess.run(["gcc", *flags, "-o", str(tmp_path / name), str(src)], check=True)
    return (tmp_path / name).read_bytes()


_PVH_NOTE = """
__asm__(".pushsection .note.Xen, \\"a\\", @note\\n"
        ".balign 4\\n .long 4\\n .long 4\\n .long 18\\n .asciz \\"Xen\\"\\n .balign 4\\n .long 0x1000000\\n"
        ".popsection\\n");
"""


def test_static_and_pvh_detection(tmp_path: Path) -> None:
    static = _static_exe(tmp_path, "s")
    assert elf.is_static(static)
    assert not elf.is_static(_static_exe(tmp_path, "d", flags=()))
    assert not elf.has_pvh_entry(static)
    assert elf.has_pvh_entry(_static_exe(tmp_path, "pvh", _PVH_NOTE))


# ---- vmlinux ----


def _bzimage(payload: bytes, setup_sects: int = 2, version: int = 0x20F) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<II", head, 0x248, 100, len(payload))
    # The kernel's decompressor stub sits before the payload, its size follows it.
    return bytes(head) + b"\x90" * 100 + payload + struct.pack("<I", 123456)


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)


@pytest.mark.parametrize("compress", [_gzip, _xz])
def test_vmlinux_from_bzimage(compress) -> None:  # type: ignore[no-untyped-def]
    kernel = b"\x7fELF" + os.urandom(5000)
    packed = compress(kernel)
    inner = vmlinux.payload(_bzimage(packed))
    assert inner == packed
    assert vmlinux.decompress(inner) == kernel


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_vmlinux_lz4_legacy_frame() -> None:
    kernel = b"\x7fELF" + os.urandom(3000) + bytes(5000)
    packed = subprocess.run(["lz4", "-l", "-c"], input=kernel, capture_output=True, check=True).stdout
    assert vmlinux.decompress(vmlinux.payload(_bzimage(packed)) or b"") == kernel


def test_vmlinux_refuses_non_bzimage() -> None:
    assert vmlinux.payload(b"\0" * 4096) is None
    assert vmlinux.payload(_bzimage(b"x", version=0x207)) is None
    assert vmlinux.decompress(b"BZh91AY&SY") is None  # bzip2: not handled, the bzImage is used


# ---- ensure_image on a fake kernel package ----

FAKE_VERSION = "9.9.9-fake"
FAKE_DEPENDS = {
    "virtio_ring": "",
    "virtio": "virtio_ring",
    "virtio_pci_modern_dev": "",
    "virtio_pci_legacy_dev": "",
    "virtio_pci": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio",
    "failover": "",
    "net_failover": "failover",
    "virtio_net": "virtio_ring,virtio,net_failover",
    "virtio_blk": "virtio,virtio_ring",
}


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache whose pinned kernel package is a fake: no apt, no download."""
    cache = tmp_path / "cache"
    pkg = cache / "kernel" / "linux-image-fake"
    (pkg / "boot").mkdir(parents=True)
    kdir = pkg / "lib" / "modules" / FAKE_VERSION / "kernel" / "drivers"
    kdir.mkdir(parents=True)
    pvh = _static_exe(tmp_path, "fakevmlinux", _PVH_NOTE)
    (pkg / "boot" / f"vmlinuz-{FAKE_VERSION}").write_bytes(_bzimage(_gzip(pvh)))
    for name, deps in FAKE_DEPENDS.items():
        _fake_module(kdir / f"{name}.ko", deps)
    # One module compressed, as newer Debian kernels ship them.
    ko = kdir / "failover.ko"
    (kdir / "failover.ko.xz").write_bytes(lzma.compress(ko.read_bytes(), check=lzma.CHECK_CRC32))
    ko.unlink()
    (pkg / ".complete").touch()
    (cache / "kernel" / "current").write_text("linux-image-fake\n")
    sources = tmp_path / "src"
    shutil.copytree(image.SOURCES, sources)
    monkeypatch.setattr(image, "SOURCES", sources)
    return cache


def test_ensure_image_builds_then_reuses(fake_cache: Path) -> None:
    first = image.ensure_image(fake_cache)
    assert first.kernel_version == FAKE_VERSION
    assert first.kernel.name == f"vmlinux-{FAKE_VERSION}"  # extracted for a direct PVH boot
    assert elf.has_pvh_entry(first.kernel.read_bytes())
    files = read_newc(first.initramfs.read_bytes())
    assert files["init"][1] == image.INIT_SCRIPT.read_bytes()
    assert files["init"][0] & 0o111
    assert files["etc/kvmotion-modules"][1].decode().split() == list(image.MODULES)
    assert files["lib/modules/failover.ko"][1][:4] == b"\x7fELF"  # decompressed
    for program in ("kvm-mem", "kvm-echo", "kvm-disk"):
        assert elf.is_static(files[f"bin/{program}"][1])
    assert elf.is_static(files["bin/busybox"][1])
    assert files["bin/sh"][1] == b"busybox" and stat.S_ISLNK(files["bin/sh"][0])
    assert files["dev/console"][2] == (5, 1)

    start = time.monotonic()
    again = image.ensure_image(fake_cache)
    assert again == first
    assert time.monotonic() - start < 1.0

    (image.SOURCES / "kvm-echo.c").write_text((image.SOURCES / "kvm-echo.c").read_text() + "\n/* changed */\n")
    rebuilt = image.ensure_image(fake_cache)
    assert rebuilt.initramfs != first.initramfs and rebuilt.kernel == first.kernel


def test_missing_busybox_is_one_line(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image, "BUSYBOX", fake_cache / "no-busybox")
    with pytest.raises(SetupError, match=r"^busybox-static is not installed: run make setup$"):
        image.ensure_image(fake_cache)


def test_dynamic_busybox_is_refused(fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _static_exe(tmp_path, "dyn", flags=())
    monkeypatch.setattr(image, "BUSYBOX", tmp_path / "dyn")
    with pytest.raises(SetupError, match="busybox-static"):
        image.ensure_image(fake_cache)


def test_missing_gcc_is_one_line(fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SetupError, match=r"^gcc is not installed") as info:
        image.ensure_image(fake_cache)
    assert "\n" not in str(info.value)


def test_compile_error_is_one_line(fake_cache: Path) -> None:
    (image.SOURCES / "kvm-broken.c").write_text("int main(void) { return nope; }\n")
    with pytest.raises(SetupError, match=r"^compiling kvm-broken.c failed: .*nope") as info:
        image.ensure_image(fake_cache)
    assert "\n" not in str(info.value)


def test_missing_module_is_named(fake_cache: Path) -> None:
    ko = next((fake_cache / "kernel").rglob("virtio_blk.ko"))
    ko.unlink()
    with pytest.raises(SetupError, match="no module virtio_blk"):
        image.ensure_image(fake_cache)


@pytest.mark.skipif(not image.BUSYBOX.exists(), reason="busybox-static is not installed")
def test_init_script_parses_under_busybox_sh() -> None:
    proc = subprocess.run([str(image.BUSYBOX), "sh", "-n", str(image.INIT_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_rebuild_prunes_stale_initramfs_only(fake_cache: Path) -> None:
    first = image.ensure_image(fake_cache)
    stale = fake_cache / "initramfs-0000000000000000.cpio"
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 2 * image.STALE_AFTER,) * 2)
    (image.SOURCES / "kvm-mem.c").write_text((image.SOURCES / "kvm-mem.c").read_text() + "\n/* changed */\n")
    second = image.ensure_image(fake_cache)
    assert second.initramfs.exists() and first.initramfs.exists()  # the recent one may still be starting
    assert not stale.exists()
