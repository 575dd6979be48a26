"""The datastore service for real: nbdkit + plugin + TLS front end + control API, clients playing hosts.

Each test starts `kvmotion datastore serve` on its own ports and root, joined (`kvmotion datastore
join`) to a center of its own run in the test process, and kills its process group at the end.
The identities the test plays come from that center too: hosts joined (host:HOST, qemu:HOST), users
logged in.
Hosts are NBD connections over TLS presenting host:HOST or qemu:HOST certificates and asking for
DISK@HOST; the lab test puts them in two network namespaces, and the QEMU tests use QEMU's own NBD
client with the options attach.nbd_blockdev gives (a `-M none` QEMU: no guest, no CPU cost).
One test serves with --insecure (plain NBD, the host name a claim), as before TLS.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from kvmotion.api.datastore import DatastoreClient
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.pki import CA_CERT, QEMU_DIR, init_ca, issue_host_cert
from kvmotion.api.tls import client_context
from kvmotion.core.errors import Forbidden, InsufficientResources, LeaseError
from kvmotion.qemu import confine
from kvmotion.storage.attach import nbd_blockdev, nbd_tls_object, reattach_commands
from kvmotion.storage.join import DatastoreRoot
from kvmotion.storage.lease import ExportName
from kvmotion.storage.nbd_client import NbdConnection, NbdError
from tests.center import CenterInThread

DISK = "web1.img"
SIZE = 16 << 20
ADMIN = Identity(Kind.USER, "admin", Role.ADMIN)


def _free_port_pair() -> int:
    for _ in range(200):
        port = random.randint(20000, 60000)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


class Service:
    """One `kvmotion datastore serve` process group (serve + its nbdkit child), TLS unless `secure`
    is off. Secure: ds1 joined to a center in this process (its data and every joined identity's
    state in the cluster folder, next to the root unless given), reachable at `ips`."""

    opened: ClassVar[list[CenterInThread]] = []  # closed after each test (the fixture below)

    def __init__(self, root: Path, ttl: float, host: str = "127.0.0.1", port: int | None = None,
                 secure: bool = True, ips: tuple[str, ...] = ("127.0.0.1",), cluster: Path | None = None) -> None:
        self.root = root
        self.ttl = ttl
        self.host = host
        self.dial = "127.0.0.1" if host == "0.0.0.0" else host  # where this test's clients connect
        self.port = port or _free_port_pair()
        self.secure = secure
        self.log = root.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster = cluster or root.parent / "cluster"
        self.center: CenterInThread | None = None
        self.state: DatastoreRoot | None = None
        if secure:
            self.center = CenterInThread(self.cluster / "center")
            Service.opened.append(self.center)
            self.state = self.center.join_datastore("ds1", ips, self.port, self.cluster / "datastore")

    @property
    def ca_cert(self) -> Path:
        """The cluster CA's certificate, as the datastore's join wrote it."""
        assert self.state is not None
        return self.state.tls_dir / CA_CERT

    @property
    def control_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.dial}:{self.port + 1}"

    @property
    def nbd_url(self) -> str:
        return f"{'nbds' if self.secure else 'nbd'}://{self.dial}:{self.port}"

    def creds(self, who: Identity) -> Path:
        """`who`'s certificate folder (QEMU's x509 layout), from the center on first use: a host's
        (and its QEMUs') from its join, a user's from its login."""
        assert self.center is not None, "an --insecure datastore has no certificates"
        if who.kind in (Kind.HOST, Kind.QEMU):
            root = self.cluster / "hosts" / who.name
            if not root.exists():
                self.center.join_host(who.name, "127.0.0.1", root)
            return root / "tls" / QEMU_DIR if who.kind is Kind.QEMU else root / "tls"
        d = self.cluster / "users" / who.name
        if not d.exists():
            assert who.role is not None
            self.center.user_dir(d, who.name, who.role)
        return d

    def tls(self, who: Identity) -> ssl.SSLContext:
        return client_context(self.creds(who))

    def client(self, who: Identity = ADMIN) -> DatastoreClient:
        if not self.secure:
            return DatastoreClient(self.control_url, host=who.name if who.kind is Kind.HOST else None)
        return DatastoreClient(self.control_url, ssl_context=self.tls(who))

    def as_host(self, name: str) -> DatastoreClient:
        return self.client(Identity(Kind.HOST, name))

    def start(self) -> None:
        argv = [sys.executable, "-m", "kvmotion.cli.main", "datastore", "serve", "ds1", "--root", str(self.root),
                "--listen", f"{self.host}:{self.port}", "--lease-ttl", f"{self.ttl}s"]  # fmt: skip
        argv += ["--state-dir", str(self.state.path)] if self.state is not None else ["--insecure"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        with self.client() as c:
            while not c.reachable():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"datastore did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole group (a crash: no chance to flush anything)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Kill the service, and stop its center."""
        self.kill()
        if self.center is not None and self.center in Service.opened:
            Service.opened.remove(self.center)
            self.center.close()

    def connect(self, export: str, who: Identity | None = None) -> NbdConnection:
        """An NBD connection to `export`, over TLS as `who` (default: the QEMU of the export's host,
        or of host-r for a read-only export)."""
        if not self.secure:
            return NbdConnection.connect(self.dial, self.port, export)
        who = who or Identity(Kind.QEMU, ExportName.parse(export).host or "host-r")
        return NbdConnection.connect(self.dial, self.port, export, tls=self.tls(who))


@pytest.fixture(autouse=True)
def _close_centers() -> Iterator[None]:
    yield
    while Service.opened:
        Service.opened.pop().close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path / "ds1", ttl=30)
    svc.start()
    with svc.client() as c:
        c.create_disk(DISK, SIZE)
    try:
        yield svc
    finally:
        svc.kill()


def refused(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except NbdError as exc:
        assert exc.errno == errno.EPERM, exc
        return True
    return False


def test_holder_writes_other_host_reads_but_cannot_write(service: Service) -> None:
    a = service.connect(f"{DISK}@host-a")
    b = service.connect(f"{DISK}@host-b")
    assert refused(a.write, 0, b"A" * 4096)  # nobody holds the lease yet
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
    a.write(0, b"A" * 4096)
    a.flush()
    assert b.read(0, 4096) == b"A" * 4096
    assert refused(b.write, 0, b"B" * 4096)
    assert refused(b.flush)
    assert refused(b.write, 8192, b"B" * 512, True)  # FUA does not help either
    assert b.read(0, 4) == b"AAAA"
    anon = service.connect(DISK)  # no host: read only, as advertised
    assert anon.read_only and anon.read(0, 4) == b"AAAA"
    for conn in (a, b, anon):
        conn.close()


def test_switchover_early_connection_and_stale_generation(service: Service) -> None:
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
        src = service.connect(f"{DISK}@host-a")
        src.write(0, b"1" * 4096)  # binds src to generation 1
        dst = service.connect(f"{DISK}@host-b")  # shadow VM opens its disk early
        assert refused(dst.write, 0, b"x" * 4096)
        src.flush()
        lease = c.transfer(DISK, "host-a", "host-b", "web1")
        assert (lease.host, lease.generation) == ("host-b", 2)
        assert refused(src.write, 0, b"y" * 4096)  # fenced the moment transfer() returned
        assert refused(src.flush)
        dst.write(4096, b"2" * 4096, fua=True)
        with pytest.raises(LeaseError):
            c.renew(DISK)
        with pytest.raises(Forbidden):  # host-a may take its lease back, not give host-b's to host-c
            c.transfer(DISK, "host-b", "host-c", "web1")
        # The lease comes back (a rollback by host-a): the source's old connection stays refused, a new one writes.
        back = c.transfer(DISK, "host-b", "host-a", "web1")
        assert back.generation == 3
        assert refused(src.write, 0, b"z" * 4096)
        assert refused(dst.write, 0, b"z" * 4096)
        fresh = service.connect(f"{DISK}@host-a")
        fresh.write(8192, b"3" * 4096)
        assert fresh.read(0, 12288) == b"1" * 4096 + b"2" * 4096 + b"3" * 4096
        for conn in (src, dst, fresh):
            conn.close()


def test_unrenewed_lease_expires(tmp_path: Path) -> None:
    svc = Service(tmp_path / "ds1", ttl=1.5)
    svc.start()
    try:
        with svc.client() as admin, svc.as_host("host-a") as c, svc.as_host("host-b") as b:
            admin.create_disk(DISK, SIZE)
            c.acquire(DISK, "web1")
            a = svc.connect(f"{DISK}@host-a")
            a.write(0, b"A" * 512)
            time.sleep(0.8)
            c.renew(DISK)
            time.sleep(0.8)
            a.write(0, b"A" * 512)  # still alive thanks to the renewal
            time.sleep(1.6)
            assert refused(a.write, 0, b"A" * 512)
            with pytest.raises(LeaseError, match="expired"):
                c.renew(DISK)
            lease = b.acquire(DISK, "web1")
            assert lease.generation == 2
            assert admin.list_disks()[0].holder == "host-b"
            a.close()
    finally:
        svc.kill()


def test_restart_loses_no_acknowledged_write_and_keeps_leases(service: Service) -> None:
    data = os.urandom(1 << 20)
    with service.client() as admin, service.as_host("host-a") as c, service.as_host("host-b") as b:
        c.acquire(DISK, "web1")
        admin.create_disk("other.img", SIZE)
        b.acquire("other.img", "db")
        b.transfer("other.img", "host-b", "host-c", "db")
    a = service.connect(f"{DISK}@host-a")
    for off in range(0, len(data), 64 << 10):
        a.write(off, data[off : off + (64 << 10)])  # acknowledged, neither FUA nor FLUSH
    service.kill(signal.SIGKILL)
    service.start()
    with service.client() as admin, service.as_host("host-a") as c:
        disks = {d.name: d for d in admin.list_disks()}
        assert disks[DISK].holder == "host-a" and disks[DISK].generation == 1
        assert disks["other.img"].holder == "host-c" and disks["other.img"].generation == 2
        assert c.renew(DISK).generation == 1
    with service.connect(f"{DISK}@host-b") as reader:
        assert reader.read(0, len(data)) == data
    with service.connect(f"{DISK}@host-a") as again:  # QEMU's reconnect is a new connection like this
        again.write(0, b"after restart".ljust(512, b"\0"))
    with service.connect(f"{DISK}@host-b") as b:
        assert refused(b.write, 0, b"B" * 512)


def test_sigterm_stops_the_service_and_nbdkit(tmp_path: Path) -> None:
    svc = Service(tmp_path / "ds1", ttl=30)
    svc.start()
    assert svc.proc is not None
    children = subprocess.run(["pgrep", "-P", str(svc.proc.pid)], capture_output=True, text=True).stdout.split()
    argvs = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
    assert len(children) == 2, argvs  # nbdkit and the NBD TLS front end
    assert any(a[0].endswith(b"nbdkit") for a in argvs) and any(b"kvmotion.storage.nbd_front" in a for a in argvs), argvs
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    svc.proc = None


def _qemu_img(service: Service, creds: Path, export: str, command: str, *options: str,
              output: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`qemu-img COMMAND OPTIONS` on `export` over TLS with the certificate folder `creds` (QEMU's x509 layout)."""
    opts = (f"driver=nbd,server.type=inet,server.host={service.dial},server.port={service.port},"
            f"export={export},tls-creds=tls0")
    argv = ["qemu-img", command, "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts", *options, opts, *([str(output)] if output else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nbdinfo_and_qemu_img_read_exports_with_cluster_certificates(service: Service, tmp_path: Path) -> None:
    """The certificate folders `kvmotion host join` and `login` give (QEMU's x509 layout) work as they are
    with libnbd (`nbds://...?tls-certificates=DIR`) and qemu-img (`--object tls-creds-x509`)."""
    for tool in ("nbdinfo", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    pattern = os.urandom(64 << 10)
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
    with service.connect(f"{DISK}@host-a") as a:
        a.write(1 << 20, pattern)
        a.flush()
    qemu_a = service.creds(Identity(Kind.QEMU, "host-a"))
    url = f"{service.nbd_url}/{DISK}?tls-certificates={qemu_a}"
    info = json.loads(subprocess.run(["nbdinfo", "--json", url], check=True, capture_output=True).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    assert info["exports"][0]["is_read_only"] is True
    operator = service.creds(Identity(Kind.USER, "otto", Role.OPERATOR))
    listing = subprocess.run(["nbdinfo", "--list", f"{service.nbd_url}/?tls-certificates={operator}"],
                             check=True, capture_output=True, text=True).stdout
    assert DISK in listing
    qinfo = _qemu_img(service, qemu_a, DISK, "info", "--output=json")
    assert qinfo.returncode == 0, qinfo.stderr
    assert json.loads(qinfo.stdout)["virtual-size"] == SIZE
    out = tmp_path / "copy.raw"
    copied = _qemu_img(service, operator, DISK, "convert", "-O", "raw", output=out)
    assert copied.returncode == 0, copied.stderr
    assert out.read_bytes()[1 << 20 : (1 << 20) + len(pattern)] == pattern


def test_clients_without_the_right_certificate_are_refused(service: Service, tmp_path: Path) -> None:
    """No certificate, another CA's, plain NBD, another host's writable export, a viewer's read:
    each refused, on NBD and on the control API."""
    for tool in ("nbdinfo", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    rogue_ca = tmp_path / "rogue"
    init_ca(rogue_ca / "ca")
    issue_host_cert(rogue_ca / "ca", "host-a", ["127.0.0.1"], rogue_ca / "host-a", qemu_key_gid=confine.qemu_gid())
    rogue = rogue_ca / "host-a" / QEMU_DIR
    qemu_a = service.creds(Identity(Kind.QEMU, "host-a"))

    def nbdinfo(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nbdinfo", url], capture_output=True, text=True, timeout=30)

    assert nbdinfo(f"{service.nbd_url}/{DISK}").returncode != 0  # nbds:// without a certificate
    assert nbdinfo(f"{service.nbd_url}/{DISK}?tls-certificates={rogue}").returncode != 0
    plain = nbdinfo(f"nbd://{service.dial}:{service.port}/{DISK}")
    assert plain.returncode != 0
    other = nbdinfo(f"{service.nbd_url}/{DISK}@host-b?tls-certificates={qemu_a}")
    assert other.returncode != 0
    assert _qemu_img(service, rogue, DISK, "info").returncode != 0
    refused_plain = subprocess.run(["qemu-img", "info", f"nbd://{service.dial}:{service.port}/{DISK}"],
                                   capture_output=True, text=True)
    assert refused_plain.returncode != 0 and "TLS" in refused_plain.stderr
    denied = _qemu_img(service, qemu_a, f"{DISK}@host-b", "info")
    assert denied.returncode != 0 and "qemu:host-a may not open web1.img@host-b" in denied.stderr
    # The same with kvmotion's own client: plain, another CA, another host, a viewer.
    with pytest.raises(NbdError, match="refused: this datastore requires TLS"):
        NbdConnection.connect(service.dial, service.port, DISK)
    with pytest.raises((ssl.SSLError, OSError)):
        NbdConnection.connect(service.dial, service.port, DISK, tls=client_context(rogue))
    with pytest.raises(NbdError, match=r"host:host-b may not open web1.img@host-a") as err:
        service.connect(f"{DISK}@host-a", Identity(Kind.HOST, "host-b"))
    assert err.value.errno == errno.EACCES
    with pytest.raises(NbdError, match="may not read"):
        service.connect(DISK, Identity(Kind.USER, "vera", Role.VIEWER))
    with service.connect(DISK, Identity(Kind.USER, "otto", Role.OPERATOR)) as reader:
        assert reader.read_only and len(reader.read(0, 512)) == 512
    # The control API: plain HTTP, no certificate, another CA's.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{service.dial}:{service.port + 1}/v1/info", timeout=5)
    anonymous = ssl.create_default_context(cafile=str(service.ca_cert))
    for ctx in (anonymous, client_context(rogue_ca / "host-a")):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{service.control_url}/v1/info", verify=ctx, timeout=5)
    audit = [json.loads(line) for line in (service.root / ".kvmotion" / "audit.log").read_text().splitlines()]
    assert {"who": "qemu:host-a", "path": f"{DISK}@host-b", "status": 403} in [
        {k: e[k] for k in ("who", "path", "status")} for e in audit]


def test_insecure_serves_plain_text_with_a_warning_on_every_start(tmp_path: Path) -> None:
    """--insecure keeps the old behaviour: plain NBD from nbdkit, the host name in the export and
    in a header a mere claim; every start says so."""
    svc = Service(tmp_path / "ds1", ttl=30, secure=False)
    svc.start()
    try:
        with svc.client() as c, svc.as_host("host-a") as a:
            c.create_disk(DISK, SIZE)
            a.acquire(DISK, "web1")
        with svc.connect(f"{DISK}@host-a") as conn:
            conn.write(0, b"plain".ljust(512, b"\0"))
        svc.kill(signal.SIGTERM)
        svc.start()
        with svc.connect(DISK) as reader:
            assert reader.read(0, 5) == b"plain"
    finally:
        svc.kill()
    warnings = [line for line in svc.log.read_text().splitlines() if line.startswith("WARNING")]
    assert len([w for w in warnings if "plain text with --insecure" in w]) == 2, warnings
    assert len([w for w in warnings if "serves plain HTTP with --insecure" in w]) == 2, warnings


def test_full_datastore_is_one_line_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    svc = Service(mnt / "ds1", ttl=30, cluster=tmp_path / "cluster")  # the center's data beside, not in, the tmpfs
    try:
        svc.start()
        with svc.client() as c:
            with pytest.raises(InsufficientResources, match="full") as info:
                c.create_disk("thick.img", 64 << 20, prealloc=True)
            assert "\n" not in str(info.value)
            c.create_disk("thin.img", 64 << 20)  # thin: fits until written
        with svc.as_host("host-a") as a:
            a.acquire("thin.img", "vm")
        with svc.connect("thin.img@host-a") as a:
            with pytest.raises(NbdError) as err:
                for off in range(0, 8 << 20, 1 << 20):
                    a.write(off, b"x" * (1 << 20))
            assert err.value.errno == errno.ENOSPC  # QEMU's default werror=enospc pauses the VM
    finally:
        svc.kill()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- QEMU's own NBD client -------------------------------------------------------------------


class QemuNoGuest:
    """`qemu-system-x86_64 -M none` holding block nodes; qemu-io runs through HMP. On a TLS
    datastore it presents `host`'s QEMU identity, as a VM's QEMU on that host does."""

    def __init__(self, tmp: Path, blockdevs: list[dict[str, object]], service: Service | None = None,
                 host: str = "host-a") -> None:
        self.qmp_path = tmp / f"qmp-{os.getpid()}-{random.randint(0, 1 << 30)}.sock"
        argv = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]  # fmt: skip
        if service is not None and service.secure:
            argv += ["-object", json.dumps(nbd_tls_object(service.creds(Identity(Kind.QEMU, host))))]
        for bd in blockdevs:
            argv += ["-blockdev", json.dumps(bd)]
        self.log = tmp / "qemu.log"
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def qmp(self, cmd: str, args: dict[str, object] | None = None) -> object:
        from qemu.qmp import QMPClient

        async def run() -> object:
            client = QMPClient("test")
            await client.connect(str(self.qmp_path))
            try:
                return await client.execute(cmd, args or {})
            finally:
                await client.disconnect()

        return asyncio.run(run())

    def io(self, node: str, command: str) -> str:
        """Run a qemu-io command on a node; qemu-io prints its result on QEMU's stdout."""
        before = self.log.stat().st_size
        reply = self.qmp("human-monitor-command", {"command-line": f'qemu-io {node} "{command}"'})
        with open(self.log, "rb") as f:
            f.seek(before)
            return str(reply) + f.read().decode(errors="replace")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _need_qemu() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")


def test_qemu_nbd_client_is_fenced_until_transfer(service: Service, tmp_path: Path) -> None:
    """The destination's QEMU opens the disk before switchover; it writes only after transfer()."""
    _need_qemu()
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
    dst = QemuNoGuest(tmp_path, [nbd_blockdev(service.nbd_url, DISK, "host-b", "disk0-proto")], service, "host-b")
    try:
        assert "Operation not permitted" in dst.io("disk0-proto", "write -P 0x42 0 4k")
        with service.connect(f"{DISK}@host-a") as src:
            src.write(0, b"\x41" * 4096)
            src.flush()
            with service.as_host("host-a") as c:
                c.transfer(DISK, "host-a", "host-b", "web1")
            assert refused(src.write, 0, b"\x41" * 4096)
        out = dst.io("disk0-proto", "read -P 0x41 0 4k")
        assert "read 4096/4096" in out, out
        out = dst.io("disk0-proto", "write -P 0x42 0 4k")
        assert "wrote 4096/4096" in out, out
        assert "flush" not in dst.io("disk0-proto", "flush")  # no error printed
    finally:
        dst.stop()
    with service.connect(DISK) as reader:
        assert reader.read(0, 4096) == b"\x42" * 4096


def test_qemu_reconnects_across_datastore_restart(service: Service, tmp_path: Path) -> None:
    _need_qemu()
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
    vm = QemuNoGuest(tmp_path, [nbd_blockdev(service.nbd_url, DISK, "host-a", "disk0-proto")], service)
    try:
        assert "wrote" in vm.io("disk0-proto", "write -P 0x11 0 64k")
        service.kill(signal.SIGKILL)
        service.start()
        out = vm.io("disk0-proto", "write -P 0x22 64k 64k")  # queued until QEMU has reconnected
        assert "wrote 65536/65536" in out, out
        assert "read 65536/65536" in vm.io("disk0-proto", "read -P 0x11 0 64k")
    finally:
        vm.stop()


def test_abort_after_switchover_reattaches_the_source(service: Service, tmp_path: Path) -> None:
    """The lease went to the destination and came back: the source needs a new connection."""
    _need_qemu()
    with service.as_host("host-a") as c:
        c.acquire(DISK, "web1")
    proto = nbd_blockdev(service.nbd_url, DISK, "host-a", "disk0-proto")
    fmt: dict[str, object] = {"driver": "raw", "node-name": "disk0", "file": "disk0-proto"}
    src = QemuNoGuest(tmp_path, [proto, fmt], service)
    try:
        assert "wrote" in src.io("disk0", "write -P 0x11 0 4k")
        with service.as_host("host-a") as c:
            c.transfer(DISK, "host-a", "host-b", "web1")
            c.transfer(DISK, "host-b", "host-a", "web1")  # abort: the lease returns, generation 3
        assert "Operation not permitted" in src.io("disk0", "write -P 0x22 0 4k")
        for cmd in reattach_commands(service.nbd_url, DISK, "host-a", fmt, "disk0-proto-g3"):
            src.qmp(cmd.name, cmd.arguments)
        out = src.io("disk0", "write -P 0x22 0 4k")
        assert "wrote 4096/4096" in out, out
    finally:
        src.stop()
    with service.connect(DISK) as reader:
        assert reader.read(0, 4096) == b"\x22" * 4096


# -- two hosts in two network namespaces -----------------------------------------------------


@pytest.mark.lab
def test_hosts_in_namespaces(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    from pyroute2 import netns as pr_netns

    from kvmotion.net import netns

    tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
    octet = random.randint(16, 250)
    hosts = {"host-a": (f"kvdsa{tag}", f"vdsa{tag}", 0), "host-b": (f"kvdsb{tag}", f"vdsb{tag}", 4)}
    made_ns: list[str] = []
    made_links: list[str] = []
    svc = Service(tmp_path / "ds1", ttl=30, host="0.0.0.0",
                  ips=("127.0.0.1", *(f"10.251.{octet}.{base + 1}" for _, _, base in hosts.values())))
    try:
        for ns, veth, base in hosts.values():
            netns.create_ns(ns)
            made_ns.append(ns)
            netns.create_veth(veth, None, "eth0", ns)
            made_links.append(veth)
            netns.add_address(None, veth, f"10.251.{octet}.{base + 1}/30")
            netns.add_address(ns, "eth0", f"10.251.{octet}.{base + 2}/30")
        svc.start()
        with svc.client() as c, svc.as_host("host-a") as a:
            c.create_disk(DISK, SIZE)
            a.acquire(DISK, "web1")

        def connect(host: str) -> NbdConnection:
            ns, _, base = hosts[host]
            sock = pr_netns.create_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            address = f"10.251.{octet}.{base + 1}"
            sock.connect((address, svc.port))
            return NbdConnection(sock, f"{DISK}@{host}", svc.tls(Identity(Kind.QEMU, host)), address)

        a, b = connect("host-a"), connect("host-b")
        a.write(0, b"from-a".ljust(4096, b"."))
        a.flush()
        assert b.read(0, 6) == b"from-a"
        assert refused(b.write, 0, b"B" * 4096)
        with svc.as_host("host-a") as c:
            c.transfer(DISK, "host-a", "host-b", "web1")
        b.write(0, b"from-b".ljust(4096, b"."), fua=True)
        assert refused(a.write, 0, b"A" * 4096)
        assert a.read(0, 6) == b"from-b"
        a.close()
        b.close()
    finally:
        svc.kill()
        for link in made_links:
            netns.delete_link_in(None, link)
        for ns in made_ns:
            netns.delete_ns(ns)
