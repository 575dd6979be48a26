"""Builds (once) and finds the guest image: Debian's cloud kernel plus kvmotion's initramfs.

Cache layout under cache_dir()/guest/:
  kernel/current                the kernel package in use (pinned: apt updates do not change it)
  kernel/<package>/             the unpacked .deb (boot/vmlinuz-*, lib/modules/<version>/)
  initramfs-<hash>.cpio         keyed by every input, so any source change builds a new one
The host's own kernel and /lib/modules are never touched.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.core import paths
from kvmotion.core.errors import KvmotionError, SetupError
from kvmotion.guest import cpio, elf, vmlinux

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
GUEST_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = GUEST_DIR / "init.sh"
SOURCES = GUEST_DIR / "src"
# Wanted drivers in load order; their real dependencies (from .modinfo) are added if missing.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)

# Older initramfs files are deleted after a rebuild once unused this long (QEMU reads -initrd at start).
STALE_AFTER = 3600.0

INITTAB = b"""\
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
"""
PROFILE = b"""\
export PATH=/bin
PS1='\\h# '
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_version: str


@dataclass(frozen=True)
class _Kernel:
    vmlinuz: Path
    version: str
    modules_dir: Path  # lib/modules/<version>


def ensure_image(cache: Path | None = None) -> GuestImage:
    """The guest kernel and initramfs, fetched and built on first use; fast when cached."""
    root = cache if cache is not None else paths.cache_dir() / "guest"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create the guest image cache {root}: {exc.strerror}") from exc
    with _locked(root / ".lock"):
        kernel = _ensure_kernel(root / "kernel")
        boot = _bootable_kernel(kernel)
        initramfs = _ensure_initramfs(root, kernel)
    return GuestImage(kernel=boot, initramfs=initramfs, kernel_version=kernel.version)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialises builders sharing one cache (several agents on one machine)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise SetupError(f"{argv[0]} is not installed (needed to {what}): run make setup")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise SetupError(f"cannot {what}: {argv[0]} says: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


# ---- kernel ----


def _ensure_kernel(kdir: Path) -> _Kernel:
    kdir.mkdir(exist_ok=True)
    current = kdir / "current"
    package = current.read_text().strip() if current.exists() else ""
    if not package or not (kdir / package / ".complete").exists():
        package = _kernel_package()
        if not (kdir / package / ".complete").exists():
            try:
                _download_kernel(kdir, package)
            except SetupError:
                # Stale package lists name a version the mirror no longer has: refresh them once.
                _apt_update()
                package = _kernel_package()
                _download_kernel(kdir, package)
        tmp = kdir / f".current.{os.getpid()}"
        tmp.write_text(package + "\n")
        tmp.replace(current)
    return _find_kernel(kdir / package)


def _apt_update() -> None:
    _run(["apt-get", "update"], what="update the package lists")


def _kernel_package() -> str:
    """The versioned package linux-image-cloud-amd64 points to, e.g. linux-image-6.1.0-56-cloud-amd64."""
    if shutil.which("apt-cache") is None:
        raise SetupError("apt-cache is not installed: the guest kernel comes from Debian's archive")
    for attempt in range(2):
        if attempt:
            _apt_update()  # a fresh machine has no package lists yet
        proc = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            kind, _, name = line.strip().partition(":")
            name = name.strip()
            if kind.lstrip("|") == "Depends" and name.startswith("linux-image-"):
                return name
    raise SetupError(f"apt knows no package {KERNEL_META_PACKAGE}: add Debian's main archive to apt's sources")


def _download_kernel(kdir: Path, package: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=kdir))
    try:
        _run(["apt-get", "download", package], cwd=tmp, what=f"download {package}")
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise SetupError(f"apt-get download {package} left no .deb file in {tmp}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], what=f"unpack {debs[0].name}")
        debs[0].unlink()  # the unpacked tree is all we use
        _find_kernel(tmp)  # refuse a package without a kernel and modules
        (tmp / ".complete").touch()
        os.chmod(tmp, 0o755)  # mkdtemp's 0700: QEMU reads the kernel as its unprivileged user
        dest = kdir / package
        if dest.exists():
            shutil.rmtree(dest)  # an interrupted earlier attempt
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _find_kernel(tree: Path) -> _Kernel:
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    moddirs = sorted(p for p in (tree / "lib" / "modules").glob("*") if (p / "kernel").is_dir())
    if not vmlinuz or not moddirs:
        raise SetupError(f"{tree} holds no boot/vmlinuz-* or lib/modules/*/kernel: delete it and retry")
    return _Kernel(vmlinuz=vmlinuz[-1], version=moddirs[-1].name, modules_dir=moddirs[-1])


def _bootable_kernel(kernel: _Kernel) -> Path:
    """The PVH-bootable vmlinux extracted from the bzImage (faster to boot), else the bzImage."""
    target = kernel.vmlinuz.with_name(f"vmlinux-{kernel.version}")
    unusable = target.with_name(target.name + ".unusable")
    if target.exists():
        return target
    if unusable.exists():
        return kernel.vmlinuz
    inner = vmlinux.payload(kernel.vmlinuz.read_bytes())
    data = vmlinux.decompress(inner) if inner is not None else None
    if data is None:
        return kernel.vmlinuz  # a compression this host cannot undo (is lz4 or zstd missing?)
    if data[:4] != b"\x7fELF" or not elf.has_pvh_entry(data):
        unusable.touch()  # a kernel built without CONFIG_PVH: do not look again
        return kernel.vmlinuz
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)  # QEMU reads it as its unprivileged user, whatever the umask
    tmp.replace(target)
    return target


def _module_files(kernel: _Kernel) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in (kernel.modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko", 1)[0]
        files[elf.normalize(name)] = path
    return files


def _module_bytes(path: Path) -> bytes:
    """A module's ELF, decompressed if Debian shipped it compressed (kernels after 6.1 do)."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise SetupError("zstd is not installed (needed to unpack the guest's kernel modules): run make setup")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise SetupError(f"unknown kernel module compression: {path}")


def _modules(kernel: _Kernel) -> list[tuple[str, bytes]]:
    """(name, ELF bytes) of MODULES and their dependencies, in load order."""
    files = _module_files(kernel)
    blobs: dict[str, bytes] = {}

    def blob(name: str) -> bytes:
        if name not in blobs:
            if name not in files:
                raise SetupError(f"kernel {kernel.version} has no module {name}: it may be built in or renamed")
            blobs[name] = _module_bytes(files[name])
        return blobs[name]

    order = elf.load_order(MODULES, lambda name: elf.module_depends(blob(name), f"module {name}"))
    return [(name, blob(name)) for name in order]


# ---- initramfs ----


def _busybox() -> bytes:
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        raise SetupError("busybox-static is not installed: run make setup") from None
    if not elf.is_static(data):
        raise SetupError(f"{BUSYBOX} is a dynamic busybox: install busybox-static instead (run make setup)")
    return data


def _sources() -> list[Path]:
    return sorted(SOURCES.glob("*.c"))


def _ensure_initramfs(root: Path, kernel: _Kernel) -> Path:
    busybox = _busybox()
    init = INIT_SCRIPT.read_bytes()
    modules = _modules(kernel)
    digest = hashlib.sha256()
    for part in (
        # The builder itself (layout, inittab, profile): changing it must rebuild too.
        Path(__file__).read_bytes(),
        Path(cpio.__file__).read_bytes(),
        kernel.version.encode(),
        init,
        busybox,
        *(name.encode() + b"\0" + data for name, data in modules),
        *(src.name.encode() + b"\0" + src.read_bytes() for src in _sources()),
    ):
        digest.update(len(part).to_bytes(8, "little") + part)
    target = root / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    programs = _compile_programs()
    data = cpio.archive(_entries(init, busybox, modules, programs))
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)  # QEMU reads it as its unprivileged user, whatever the umask
    tmp.replace(target)
    _prune(root, keep=target)
    return target


def _prune(root: Path, keep: Path) -> None:
    """Drops initramfs files of earlier sources, once nothing can still be about to start with them."""
    cutoff = time.time() - STALE_AFTER
    for old in root.glob("initramfs-*.cpio"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:
            pass


def _compile_programs() -> list[tuple[str, bytes]]:
    """(name, static executable) of each src/*.c."""
    if shutil.which("gcc") is None:
        raise SetupError("gcc is not installed (needed to build the guest's programs): run make setup")
    out = []
    with tempfile.TemporaryDirectory(prefix="kvmotion-guest-") as tmp:
        for src in _sources():
            exe = Path(tmp) / src.stem
            # Relative source name and C locale: messages read "kvm-mem.c:12:3: error: ...".
            proc = subprocess.run(
                ["gcc", "-static", "-O2", "-s", "-Wall", "-o", str(exe), src.name],
                cwd=src.parent,
                capture_output=True,
                text=True,
                env={**os.environ, "LC_ALL": "C"},
            )
            if proc.returncode != 0:
                if "cannot find -lc" in proc.stderr:
                    raise SetupError("static glibc (package libc6-dev) is missing: run make setup")
                lines = proc.stderr.splitlines()
                errors = [line for line in lines if " error: " in line] or lines or [f"gcc exit {proc.returncode}"]
                raise SetupError(f"compiling {src.name} failed: {errors[0]}")
            out.append((src.stem, exe.read_bytes()))
    return out


def _applets() -> list[str]:
    out = _run([str(BUSYBOX), "--list"], what="list busybox's applets")
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def _entries(
    init: bytes, busybox: bytes, modules: list[tuple[str, bytes]], programs: list[tuple[str, bytes]]
) -> list[cpio.Entry]:
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "usr")]
    entries += [
        cpio.directory("root", 0o700),
        cpio.symlink("sbin", "bin"),
        cpio.symlink("usr/bin", "../bin"),
        cpio.symlink("usr/sbin", "../bin"),
        # The kernel opens /dev/console for /init before anything is mounted.
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, 0o666),
        cpio.regular("init", init, 0o755),
        cpio.regular("etc/inittab", INITTAB),
        cpio.regular("etc/profile", PROFILE),
        cpio.regular("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        cpio.regular("etc/group", b"root:x:0:\n"),
        cpio.regular("etc/kvmotion-modules", "".join(f"{name}\n" for name, _ in modules).encode()),
        cpio.regular("bin/busybox", busybox, 0o755),
    ]
    names = {name for name, _ in programs}
    entries += [cpio.regular(f"bin/{name}", exe, 0o755) for name, exe in programs]
    entries += [cpio.symlink(f"bin/{a}", "busybox") for a in _applets() if a not in names]
    entries += [cpio.regular(f"lib/modules/{name}.ko", data) for name, data in modules]
    return entries


def main() -> int:
    try:
        image = ensure_image()
    except KvmotionError as exc:
        print(f"kvmotion: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"kernel:    {image.kernel}")
    print(f"initramfs: {image.initramfs}")
    print(f"version:   {image.kernel_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
