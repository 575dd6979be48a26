"""The host agent's whole API (VM lifecycle and the migration router) fuzzed from its OpenAPI
document (tests/fuzz.py): no 5xx, one-line errors, nothing written outside the test's folders,
no process started; a viewer and a peer host are refused every change that is not theirs.

In process, as the TLS listener presents certificates of a throw-away cluster CA. Nothing reaches
QEMU, the guest image or the host's network: QEMU's start fails with VmFailed (the one 5xx
expected, `STAND_IN`), the guest image is two empty files, TAPs are pipes, CPU models are listed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from functools import partial
from pathlib import Path

import pytest

from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.migration import PROTOCOL, MigrationOptions, MigrationRecord, Phase
from kvmotion.api.serving import Security, secure
from kvmotion.api.spec import DiskSpec, NicSpec, VmSpec
from kvmotion.core.errors import VmFailed
from kvmotion.core.files import write_atomic
from kvmotion.guest import image
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
from kvmotion.migration import facts
from kvmotion.migration.api import migration_router
from kvmotion.migration.engine import as_record_json
from kvmotion.net import links
from kvmotion.qemu import confine, cpus
from kvmotion.qemu.accel import Accel, AccelChoice
from kvmotion.qemu.process import QemuProcess
from tests.certs import TestCA
from tests.fuzz import FuzzReport, changes_refused, fuzz, label_of
from tests.joinedroot import make_root, serve_in_test

ADMIN = Identity(Kind.USER, "ada", Role.ADMIN)
VIEWER = Identity(Kind.USER, "vera", Role.VIEWER)
PEER = Identity(Kind.HOST, "host-b")
HOST_ROUTES = frozenset({"POST /v1/incoming", "POST /v1/incoming/{mid}/commit", "DELETE /v1/incoming/{mid}"})
VM = "web1"  # defined before the run, with a local disk and a NIC: a start gets as far as QEMU
MID = "0123456789ab"  # a finished migration of the history
SMALL = {"memory": 128 << 20, "vcpus": 1}  # what a generated spec asks of the host
INCOMING = {"source": PEER.name, "protocol": PROTOCOL.model_dump()}  # a migration the peer may send
STAND_IN = frozenset({VmFailed.__name__})
ADMIN_EXAMPLES = 120  # per operation and generation mode
MIN_ADMIN_REQUESTS = 3000


def _no_qemu(argv, paths, tag, **kwargs):  # type: ignore[no-untyped-def]
    raise VmFailed(f"QEMU is not started in this test ({tag})")


def _tap(name: str) -> int:
    read, write = os.pipe()  # a descriptor that stands for the TAP QEMU would be handed
    os.close(write)
    return read


class Agent:
    """host-a's agent app (both routers), secured as `host serve` serves it, with its folders in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        config = HostConfig(name="host-a", state_dir=root / "state", run_dir=root / "run",
                            portgroups={"vm-net": "kv-fuzz0"}, accel=AccelChoice(Accel.TCG, "test"),
                            confinement=confine.Confinement(None, "root", "test: QEMU is never started"))
        router = partial(migration_router, listen_ip="127.0.0.1", limit=4)
        app = create_app(config, extra_routers=(router,))
        spec = VmSpec(name=VM, memory=128 << 20, disks=(DiskSpec(source="web1.img", size=1 << 20),),
                      nics=(NicSpec(mac="52:54:00:12:34:56", portgroup="vm-net"),))
        asyncio.run(app.state.manager.create(spec))
        record = MigrationRecord(id=MID, vm=VM, source="host-a", destination="host-b", options=MigrationOptions(),
                                 phase=Phase.FAILED, started_at=time.time() - 60, ended_at=time.time() - 59,
                                 error="the destination refused it")
        write_atomic(config.state_dir / "migrations" / f"{MID}.json", json.dumps(as_record_json(record)))
        self.app = secure(app, Security(tls_files=None, audit_log=root / "audit.log"), "agent host-a")
        self.ca = TestCA(root / "ca")

    def pem(self, who: Identity) -> str:
        return self.ca.creds(who).pem

    def fuzz(self, examples: int, caller, expect=None, bodies=None) -> FuzzReport:  # type: ignore[no-untyped-def]
        return fuzz(self.app, roots=[self.root], examples=examples, caller=caller, expect=expect, bodies=bodies,
                    known={"name": [VM], "mid": [MID]}, allowed_5xx=STAND_IN)


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Agent:
    serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a"))  # joined, no peers yet
    monkeypatch.setattr(cpus, "listed_models", lambda binary=cpus.QEMU: frozenset({"qemu64", "max"}))
    monkeypatch.setitem(facts._cpu_cache, "tcg", {"qemu64": (), "max": ()})  # no QEMU probe for the facts
    monkeypatch.setattr(QemuProcess, "start", staticmethod(_no_qemu))
    guest = tmp_path / "guest"
    guest.mkdir()
    monkeypatch.setattr(image, "ensure_image", lambda cache=None: image.GuestImage(guest / "vmlinuz", guest / "initrd", "test"))
    for name, stand_in in (("ensure_bridge", lambda name: None), ("create_tap", lambda name, bridge: None),
                           ("open_tap", _tap), ("delete_tap", lambda name: None)):
        monkeypatch.setattr(links, name, stand_in)
    return Agent(tmp_path)


def test_admin_fuzz(agent: Agent) -> None:
    admin, peer = agent.pem(ADMIN), agent.pem(PEER)

    def expect(case, response) -> str | None:  # type: ignore[no-untyped-def]
        # Refused only where the body or the migration names another host than the caller.
        if response.status_code in (401, 403) and label_of(case.operation) not in HOST_ROUTES:
            return "an admin refused"
        return None

    report = agent.fuzz(
        ADMIN_EXAMPLES,
        caller=lambda label: peer if label in HOST_ROUTES else admin,  # host routes: only hosts call them
        expect=expect,
        # Half of the bodies name a VM that exists, or a size this host has, or come from the caller
        # with the right protocol version: past the first refusals, deeper into the handlers.
        bodies={"POST /v1/vms": SMALL, "POST /v1/incoming": {**INCOMING, "spec": SMALL},
                "POST /v1/migrations/check": {"vm": VM}, "POST /v1/migrations": {"vm": VM}},
    )
    print(report.summary(), report.table(), sep="\n")
    report.assert_clean(min_requests=MIN_ADMIN_REQUESTS)
    assert len(report.per_operation) == 17  # every operation of the document was called
    assert report.statuses[201] and report.statuses[204]  # and some calls succeeded


# A destination host may also cancel a migration to itself (its agent restarted: _end_stale_shadow).
PEER_ROUTES = HOST_ROUTES | {"POST /v1/migrations/{mid}/cancel"}


@pytest.mark.parametrize("who, allowed", [(VIEWER, frozenset()), (PEER, PEER_ROUTES)], ids=["viewer", "peer"])
def test_changes_refused_fuzz(agent: Agent, who: Identity, allowed: frozenset[str]) -> None:
    report = agent.fuzz(15, caller=lambda label: agent.pem(who), expect=changes_refused(allowed),
                        bodies={"POST /v1/incoming": INCOMING})
    print(report.summary(), report.table(), sep="\n")
    report.assert_clean(min_requests=300)
    assert report.statuses[403]
