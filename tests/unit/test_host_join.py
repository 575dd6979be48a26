"""`kvmotion host join` against a center served in-process on loopback TLS: the state root it writes,
and every refusal leaving nothing behind."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509

from kvmotion.api import joined
from kvmotion.api.agent import VmState, VmStatus
from kvmotion.api.center import (
    ActiveMigration,
    CenterClient,
    Credentials,
    DatastoreSpec,
    HostState,
    HostView,
    LoginRequest,
    MigrationRole,
    parse_token,
    trusting,
)
from kvmotion.api.config import load_config
from kvmotion.api.identity import Identity, Kind, identity_of
from kvmotion.api.inventory import Inventory
from kvmotion.api.joined import StateRoot
from kvmotion.api.pki import CA_CERT, CLIENT_KEY, QEMU_DIR, SERVER_CERT, SERVER_KEY, new_key_and_csr
from kvmotion.api.registry import Registry
from kvmotion.api.spec import VmSpec
from kvmotion.api.tls import host_dir
from kvmotion.core.errors import Conflict, InvalidInput, SetupError, Unauthorized, Unreachable
from kvmotion.host.heartbeat import Heartbeats, LoadSampler
from kvmotion.host.join import join
from kvmotion.host.schedstat import SchedStat
from tests.unit.test_center_serve import Served, _free_port


@pytest.fixture
def served(tmp_path: Path):
    s = Served(tmp_path / "data")
    yield s
    s.close()


def _token(served: Served) -> str:
    return served.line("join token").rsplit(" ", 1)[1]


def _admin(served: Served) -> CenterClient:
    password = served.line("user admin's password").rsplit(" ", 1)[1]
    key, csr = new_key_and_csr()
    with CenterClient(served.url, trusting(served.prepared.center.ca_pem)) as anonymous:
        answer = anonymous.login(LoginRequest(user="admin", password=password, csr=csr))
    return Credentials(center=served.url, user="admin", ca_cert=answer.ca_cert, cert=answer.cert,
                       key=key.decode()).client()


def _left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_join_writes_the_state_root(served: Served, tmp_path: Path) -> None:
    root = StateRoot(tmp_path / "hosts" / "root")
    done = join(served.url, _token(served), "host-a", "127.0.0.1", root, agent_port=7801, qemu_key_gid=os.getgid())
    assert _left(root.path.parent) == ["root"]  # the staging folder is gone
    config = root.config()
    assert (config.center, config.name, config.address, config.agent_port) == (served.url, "host-a", "127.0.0.1", 7801)
    assert done.answer.host.agent_url == "https://127.0.0.1:7801"
    for folder, who in ((root.tls_dir, Identity(Kind.HOST, "host-a")), (root.tls_dir / QEMU_DIR, Identity(Kind.QEMU, "host-a"))):
        cert = x509.load_pem_x509_certificate((folder / SERVER_CERT).read_bytes())
        assert identity_of(cert) == who
        assert (folder / CA_CERT).read_text().strip() == served.prepared.center.ca_pem.strip()
    assert stat.S_IMODE((root.tls_dir / SERVER_KEY).stat().st_mode) == 0o600
    qemu_key = (root.tls_dir / QEMU_DIR / CLIENT_KEY).stat()
    assert stat.S_IMODE(qemu_key.st_mode) == 0o640 and qemu_key.st_gid == os.getgid()
    assert (root.tls_dir / SERVER_KEY).read_bytes() != (root.tls_dir / QEMU_DIR / SERVER_KEY).read_bytes()
    assert (root.path / "vms").is_dir() and (root.path / "disks").is_dir()
    cache = root.cache()
    assert cache.settings.heartbeat_interval == 2.0 and [h.name for h in cache.hosts] == ["host-a"]

    # Activated (as `host serve` does), the cluster's lookups read the root.
    joined.activate(root)
    try:
        assert [(h.name, h.url) for h in Inventory().hosts()] == [("host-a", "https://127.0.0.1:7801")]
        assert Registry().all() == [] and load_config().encrypted
        assert host_dir("host-a") == root.tls_dir
        with pytest.raises(SetupError, match="serves host host-a, not host-b: a host's keys stay on that host"):
            host_dir("host-b")
        with _admin(served) as admin:
            admin.add_datastore(DatastoreSpec(name="ds1", nbd_url="nbds://127.0.0.1:10809",
                                              control_url="https://127.0.0.1:10810"))
            root.save_cache(root.cache().model_copy(update={"datastores": tuple(admin.datastores())}))
        assert [r.name for r in Registry().all()] == ["ds1"]
    finally:
        joined.activate(None)
    with pytest.raises(SetupError, match="no joined state root is served in this process"):
        host_dir("host-a")


def test_refusals_leave_nothing(served: Served, tmp_path: Path) -> None:
    parent = tmp_path / "hosts"
    root = StateRoot(parent / "root")
    token = _token(served)
    parts = parse_token(token)
    forged = f"kvm1.{parts.ca_sha256}.{parts.id}.{'0' * 32}"
    other_ca = f"kvm1.{'1' * 64}.{parts.id}.{parts.secret}"
    cases = [
        (forged, "host-a", "127.0.0.1", Unauthorized, "is forged"),
        (other_ca, "host-a", "127.0.0.1", Unauthorized, "nothing was sent"),
        ("kvm1.abc", "host-a", "127.0.0.1", InvalidInput, "malformed join token"),
        (token, "bad_name", "127.0.0.1", InvalidInput, "invalid host name"),
        (token, "host-a", "0.0.0.0", InvalidInput, "no address peers can reach"),
    ]
    for tok, name, address, error, says in cases:
        with pytest.raises(error, match=says):
            join(served.url, tok, name, address, root)
        assert _left(parent) == [], says
    with pytest.raises(Unreachable, match="not reachable"):
        join(f"https://127.0.0.1:{_free_port()}", token, "host-a", "127.0.0.1", root)
    with pytest.raises(InvalidInput, match="invalid center URL"):
        join("ftp://127.0.0.1:1", token, "host-a", "127.0.0.1", root)

    center = served.prepared.center
    real_clock = center.clock
    center.clock = lambda: real_clock() + 2 * 86400  # the first start's token lasts 24 h
    try:
        with pytest.raises(Unauthorized, match="expired"):
            join(served.url, token, "host-a", "127.0.0.1", root)
    finally:
        center.clock = real_clock
    assert _left(parent) == []

    join(served.url, token, "host-a", "127.0.0.1", root)
    with pytest.raises(Conflict, match=r"joined already as host host-a .* give --force"):
        join(served.url, token, "host-b", "127.0.0.1", root)
    with pytest.raises(Conflict, match="host host-a has joined already"):  # the name is taken at the center
        join(served.url, token, "host-a", "127.0.0.1", StateRoot(parent / "other"))
    assert _left(parent) == ["root"]
    (root.path / "vms" / "web1.json").write_text("{}")
    before = (root.tls_dir / SERVER_KEY).read_bytes()

    # --force: a new identity over the old one; the VMs stay.
    join(served.url, token, "host-b", "127.0.0.2", root, force=True)
    assert root.config().name == "host-b" and (root.path / "vms" / "web1.json").exists()
    assert (root.tls_dir / SERVER_KEY).read_bytes() != before
    assert identity_of(x509.load_pem_x509_certificate((root.tls_dir / SERVER_CERT).read_bytes())).name == "host-b"
    assert _left(parent) == ["root"] and _left(root.path) == ["cache.json", "config.json", "disks", "tls", "vms"]


def test_a_damaged_root_says_so(tmp_path: Path) -> None:
    root = StateRoot(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"center": "https://x:1"}))
    with pytest.raises(SetupError, match=r"config\.json is damaged"):
        root.config()
    with pytest.raises(SetupError, match=r"cache\.json is missing"):
        root.cache()


def test_join_into_an_existing_empty_root(served: Served, tmp_path: Path) -> None:
    root = StateRoot(tmp_path / "root")
    root.path.mkdir()  # as a package or systemd's StateDirectory= makes it
    join(served.url, _token(served), "host-a", "127.0.0.1", root)
    assert root.is_joined() and _left(tmp_path) == ["data", "root"]
    assert time.time() - root.config().joined < 60


def _vm(name: str, pid: int | None) -> VmStatus:
    spec = VmSpec(name=name, memory=256 << 20)
    return VmStatus(name=name, state=VmState.RUNNING if pid else VmState.STOPPED, host="host-a", memory=spec.memory,
                    vcpus=1, pid=pid, started_at=None, ready=True, spec=spec)


def test_heartbeats_report_vms_load_and_migrations(served: Served, tmp_path: Path, caplog) -> None:
    root = StateRoot(tmp_path / "root")
    join(served.url, _token(served), "host-a", "127.0.0.1", root)
    store = served.prepared.center.store  # full reports every 2 s: the second brings the demand
    store.save_settings(store.settings().model_copy(update={"report_interval": 1.0}))
    vms = [_vm("web1", 4321), _vm("db1", None)]
    moving = ActiveMigration(id="0123456789ab", vm="web1", role=MigrationRole.SOURCE, peer="host-b", phase="precopy")
    asked: list[float] = []

    async def dirty_rates() -> dict[str, float]:  # VmManager.dirty_rates: asked at each full report
        asked.append(time.monotonic())
        return {"web1": 30e6}

    beats = Heartbeats(root, lambda: vms, lambda: [moving], tick_timeout=5, dirty_rates=dirty_rates)
    ticks = itertools.count(0.0, 2.0)  # the sampler's clock: 2 s between samples
    runs = itertools.count(0, 1_000_000_000)  # 1 s of vCPU run time per 2 s: half a CPU
    beats.sampler = LoadSampler(clock=lambda: next(ticks), rss=lambda pid: 300 << 20,
                                read=lambda pid: {pid + 1: SchedStat(next(runs), 0, 0)})

    async def run() -> HostView:
        stop = asyncio.Event()
        task = asyncio.create_task(beats.run(stop))
        deadline = time.monotonic() + 15
        while True:
            view = await asyncio.to_thread(_host_view, served, "host-a")
            if view.cpu_demand is not None:
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 3)  # ends within its bounded wait once stopped
        return view

    view = asyncio.run(run())
    assert view.state is HostState.CONNECTED and view.vms == 2
    assert view.cpu_demand == pytest.approx(0.5)  # web1's vCPU ran 1 s of every 2 (the sampler's fake clock)
    assert view.migrations == (moving,)
    assert view.load is not None and {v.name: v.dirty_rate for v in view.load.vms} == {"web1": 30e6}
    assert len(asked) >= 2  # at each full report: the second brought the demand
    assert [h.state for h in root.cache().hosts] == [HostState.CONNECTED]  # the cache refreshed from the center

    # The center unreachable: the loop goes on (one warning), and cancellation is not swallowed.
    dead = StateRoot(tmp_path / "dead")
    dead.path.mkdir()
    shutil.copytree(root.tls_dir, dead.tls_dir)
    dead.save_cache(root.cache())
    (dead.config_path).write_text(root.config().model_copy(update={"center": f"https://127.0.0.1:{_free_port()}"})
                                  .model_dump_json())
    lonely = Heartbeats(dead, lambda: vms, lambda: [], tick_timeout=5)
    lonely.interval = 0.1

    async def unreachable() -> None:
        task = asyncio.create_task(lonely.run(asyncio.Event()))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="kvmotion.agent"):
        asyncio.run(unreachable())
    warned = [r.getMessage() for r in caplog.records if "heartbeat to the center failed" in r.getMessage()]
    assert len(warned) == 1 and "not reachable" in warned[0]


def _host_view(served: Served, name: str) -> HostView:
    return served.prepared.center.host(name)
