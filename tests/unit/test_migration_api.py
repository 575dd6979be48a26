"""Who may call the migration routes, what a request may ask, and one migration per VM.

In process: the migration router on an app secured like an agent's (kvmotion.api.serving), called
through tests/certs.py's as_caller with certificates of a throw-away cluster CA; the service over a
real VmManager whose VM is only defined (no QEMU). The per-VM reservation is driven through
MigrationService.start with the checks and the migration itself stubbed.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from kvmotion.api.agent import AsyncAgentClient
from kvmotion.api.center import ClusterSettings, HostState
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.joined import StateRoot
from kvmotion.api.migration import (
    PROTOCOL,
    Check,
    Level,
    MigrationOptions,
    MigrationRecord,
    MigrationRequest,
    OptionsBody,
    Phase,
    record_from_json,
)
from kvmotion.api.serving import Security, secure
from kvmotion.api.spec import VmSpec
from kvmotion.center.dispatcher import HttpAgents
from kvmotion.center.store import HostRow
from kvmotion.core.errors import Conflict, InvalidInput, NotFound, PrecheckFailed, Unreachable
from kvmotion.host.vms import HostConfig, VmManager
from kvmotion.migration import engine
from kvmotion.migration.api import routes
from kvmotion.migration.engine import MigrationService
from kvmotion.qemu.accel import Accel, AccelChoice
from tests.certs import TestCA, as_caller
from tests.joinedroot import make_root, save_cache, served

MID = "0123456789ab"
VM = "web1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path) -> Iterator[StateRoot]:
    """host-a's joined root (this agent), served in this process: the center's inventory has host-a
    and host-b (nobody listening)."""
    root = make_root(tmp_path / "host-a", "host-a", hosts={"host-a": f"http://127.0.0.1:{_closed_port()}",
                                                           "host-b": f"http://127.0.0.1:{_closed_port()}"})
    with served(root):
        yield root


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "ca")


def _manager(tmp_path: Path) -> VmManager:
    config = HostConfig(name="host-a", state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                        portgroups={"vm-net": "br0"}, accel=AccelChoice(Accel.TCG, "test"))
    return VmManager(config)


@pytest.fixture
def svc(tmp_path, cluster) -> MigrationService:
    manager = _manager(tmp_path)
    asyncio.run(manager.create(VmSpec(name=VM, memory=256 << 20)))  # defined only: no QEMU
    return MigrationService(manager, "127.0.0.1")


class Agent:
    """The migration routes of host-a's agent, callable as any identity of the test CA."""

    def __init__(self, svc: MigrationService, ca: TestCA, insecure: bool = False) -> None:
        app = FastAPI()
        app.include_router(routes(svc))
        self.asgi = secure(app, Security(tls_files=None, audit_log=None, insecure=insecure), "agent host-a")
        self.ca = ca

    def call(self, who: Identity | None, method: str, path: str, body: object = None) -> httpx.Response:
        pem = self.ca.creds(who).pem if who is not None else None

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=as_caller(self.asgi, pem))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                return await client.request(method, path, json=body)

        return asyncio.run(go())


def host(name: str) -> Identity:
    return Identity(Kind.HOST, name)


def user(name: str, role: Role) -> Identity:
    return Identity(Kind.USER, name, role)


ADMIN, OPERATOR, VIEWER = user("ada", Role.ADMIN), user("otto", Role.OPERATOR), user("vera", Role.VIEWER)


def _incoming(source: str = "host-a", **extra) -> dict:
    return {"protocol": PROTOCOL.model_dump(), "migration_id": MID, "source": source,
            "spec": VmSpec(name="web9", memory=256 << 20).to_json(),
            "offer": {"multifd_channels": 3, "compression": ["zstd", "none"]}, **extra}


def _error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


# ---- who may call what ------------------------------------------------------------------------------
def test_users_and_qemu_identities_cannot_call_host_routes(svc, ca):
    agent = Agent(svc, ca)
    for who in (ADMIN, OPERATOR, Identity(Kind.QEMU, "host-a")):
        _error(agent.call(who, "POST", "/v1/incoming", _incoming()), 403, "may not send this host migrations",
               "host identities")
        _error(agent.call(who, "POST", f"/v1/incoming/{MID}/commit"), 403, "may not commit")
        _error(agent.call(who, "DELETE", f"/v1/incoming/{MID}"), 403, "may not abort")
    _error(agent.call(None, "POST", "/v1/incoming", _incoming()), 401, "no client certificate")


def test_a_host_cannot_claim_another_source(svc, ca):
    agent = Agent(svc, ca)
    _error(agent.call(host("host-b"), "POST", "/v1/incoming", _incoming(source="host-a")), 403,
           "host host-b may not start a migration from host-a")
    assert svc.incoming_sources.get(MID) is None and svc.manager.list()[0].name == VM  # nothing prepared
    # Its own name gets past the check: then an unknown major protocol version is refused in one line,
    # before the fields it may lack or add; also protocol 1's integer `version`.
    _error(agent.call(host("host-b"), "POST", "/v1/incoming",
                      {**_incoming(source="host-b", protocol={"major": 99, "minor": 3}), "extra": 1}), 422,
           "migration protocol 99.3 is not spoken here", f"speaks {PROTOCOL.major}.x")
    old = {k: v for k, v in _incoming("host-b").items() if k not in ("protocol", "offer")}
    _error(agent.call(host("host-b"), "POST", "/v1/incoming", {**old, "version": 1, "compression": "none"}), 422,
           "migration protocol 1.0 is not spoken here")
    _error(agent.call(host("host-b"), "POST", "/v1/incoming", {k: v for k, v in _incoming("host-b").items()
                                                               if k != "protocol"}), 422, "protocol: is required")


def test_commit_and_abort_only_by_the_source(svc, ca, tmp_path):
    agent = Agent(svc, ca)
    svc.incoming_sources.remember(MID, "host-a")  # what prepare_incoming records for a request from host-a
    for method, path, verb in (("POST", f"/v1/incoming/{MID}/commit", "commit"), ("DELETE", f"/v1/incoming/{MID}", "abort")):
        _error(agent.call(host("host-c"), method, path), 403, f"host host-c may not {verb} migration {MID}",
               "only its source, host-a")
    # The source gets through (no shadow here: the commit finds nothing) ...
    _error(agent.call(host("host-a"), "POST", f"/v1/incoming/{MID}/commit"), 404, f"no incoming migration {MID}")
    # ... also after the agent restarted: the source is on disk.
    restarted = MigrationService(_manager(tmp_path), "127.0.0.1")
    _error(Agent(restarted, ca).call(host("host-c"), "POST", f"/v1/incoming/{MID}/commit"), 403, "only its source, host-a")
    # The source's abort of a shadow that is gone succeeds and forgets the migration.
    assert agent.call(host("host-a"), "DELETE", f"/v1/incoming/{MID}").status_code == 204
    assert svc.incoming_sources.get(MID) is None and not (svc.manager.config.state_dir / "incoming" / f"{MID}.json").exists()
    # A migration this host knows nothing of: nothing to protect, answered as unknown to any host.
    _error(agent.call(host("host-c"), "POST", f"/v1/incoming/{MID}/commit"), 404, f"no incoming migration {MID}")


def test_a_viewer_reads_but_cannot_start_check_or_cancel(svc, ca):
    agent = Agent(svc, ca)
    body = {"vm": VM, "destination": "host-b"}
    for path in ("/v1/migrations", "/v1/migrations/check", f"/v1/vms/{VM}/migration/cancel"):
        _error(agent.call(VIEWER, "POST", path, body), 403, "user:vera (viewer) may not migrate VMs",
               "users with role operator or higher")
        # A host certificate acts for no user, whatever the route.
        _error(agent.call(host("host-b"), "POST", path, body), 403, "host:host-b may not migrate VMs")
    _error(agent.call(VIEWER, "POST", f"/v1/migrations/{MID}/cancel"), 403,
           "user:vera (viewer) may not cancel migrations", "users with role operator or higher")
    for who in (VIEWER, host("host-b")):
        assert agent.call(who, "GET", "/v1/migrations").json() == []
    _error(agent.call(VIEWER, "GET", f"/v1/migrations/{MID}"), 404, f"no migration {MID}")
    # An operator gets past the check (and the VM is not running: cancel finds no migration).
    _error(agent.call(OPERATOR, "POST", f"/v1/vms/{VM}/migration/cancel"), 404, f"no migration of VM {VM}")


def test_only_its_destination_host_may_cancel_a_migration(svc, ca):
    """A restarted destination agent asks the source to cancel before it destroys the shadow
    (_end_stale_shadow); no other host may."""
    agent = Agent(svc, ca)
    svc.records.add(MigrationRecord(id=MID, vm=VM, source="host-a", destination="host-b", options=MigrationOptions(),
                                       phase=Phase.PRECOPY, started_at=1.0))
    svc.cancels[MID] = asyncio.Event()
    _error(agent.call(host("host-c"), "POST", f"/v1/migrations/{MID}/cancel"), 403,
           "host host-c may cancel only migrations to itself")
    assert not svc.cancels[MID].is_set()
    assert agent.call(host("host-b"), "POST", f"/v1/migrations/{MID}/cancel").status_code == 200
    assert svc.cancels[MID].is_set() and svc.cancelled_by[MID] == "host-b, which gave up its shadow VM"


def test_encryption_cannot_be_asked_off(svc, ca):
    agent = Agent(svc, ca)
    _error(agent.call(OPERATOR, "POST", "/v1/migrations", {"vm": VM, "destination": "host-b", "options": {"encrypted": False}}),
           422, "options.encrypted: is not a known field")
    _error(agent.call(host("host-a"), "POST", "/v1/incoming", _incoming(encrypted=False)), 422,
           "encrypted: is not a known field")
    # The destination comes from the inventory: the request names a host, never an address.
    _error(agent.call(OPERATOR, "POST", "/v1/migrations",
                      {"vm": VM, "destination": "host-b", "destination_url": "http://10.9.9.9:1"}), 422,
           "destination_url: is not a known field")
    schemas = agent.call(VIEWER, "GET", "/openapi.json").json()["components"]["schemas"]
    assert set(schemas["OptionsBody"]["properties"]) == {"max_downtime_ms", "bandwidth", "policy", "allow_postcopy"}
    assert set(schemas["MigrationRequest"]["properties"]) == {"vm", "destination", "options"}
    assert "encrypted" not in schemas["IncomingRequest"]["properties"]
    assert {"protocol", "offer"} <= set(schemas["IncomingRequest"]["required"])


def test_unknown_destination_is_one_line(svc, ca):
    r = Agent(svc, ca).call(OPERATOR, "POST", "/v1/migrations", {"vm": VM, "destination": "host-q"})
    _error(r, 404, "no host named host-q in the cluster", "host-a, host-b")
    assert svc.migrating == {}


def test_an_insecure_listener_checks_no_identity(svc, ca):
    """--insecure: every caller may do everything, host routes included (no names to compare)."""
    agent = Agent(svc, ca, insecure=True)
    _error(agent.call(None, "POST", "/v1/incoming", _incoming(source="host-b", protocol={"major": 99, "minor": 0})), 422,
           "protocol 99.0")
    svc.incoming_sources.remember(MID, "host-b")
    assert agent.call(None, "DELETE", f"/v1/incoming/{MID}").status_code == 204


def test_records_from_before_the_policy_still_load():
    old = {"id": MID, "vm": VM, "source": "host-a", "destination": "host-b", "phase": "done", "started_at": 1.0,
           "options": {"max_downtime_ms": 300, "bandwidth": 0, "policy": "balanced", "allow_postcopy": False,
                       "encrypted": False}}
    rec = record_from_json(json.loads(json.dumps(old)))
    assert rec.options == MigrationOptions(max_downtime_ms=300) and rec.encrypted is False and rec.phase is Phase.DONE
    assert record_from_json({**old, "options": {}}).encrypted is True


# ---- one migration per VM -----------------------------------------------------------------------------
def in_service(svc: MigrationService, scenario):  # type: ignore[no-untyped-def]
    """Run `scenario` while the service's task group is open, as in an agent's lifespan."""
    async def go():  # type: ignore[no-untyped-def]
        async with svc.running():
            return await scenario()

    return asyncio.run(go())


class Stubbed:
    """MigrationService.start with stubbed checks (they pause `check_delay`, then pass or fail as
    told) and a stubbed migration that runs until `finish` is set (or raises `fail_with`)."""

    def __init__(self, svc: MigrationService, monkeypatch, check_delay: float = 0.0) -> None:
        self.svc = svc
        self.check_delay = check_delay
        self.checks: tuple[Check, ...] = (Check("vm-running", Level.PASS, "ok"),)
        self.finish = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.checked = 0
        monkeypatch.setattr(svc, "_checks", self._checks)
        monkeypatch.setattr(svc, "_run", self._run)

    async def _checks(self, vm, dest, migrating):
        self.checked += 1
        await asyncio.sleep(self.check_delay)
        return self.checks

    async def _run(self, mid, dest):
        await dest.aclose()
        if self.fail_with is not None:
            raise self.fail_with
        await self.finish.wait()
        self.svc._update(mid, phase=Phase.DONE)

    async def start(self) -> MigrationRecord:
        return await self.svc.start(VM, "host-b", MigrationOptions())

    async def settle(self) -> None:
        await asyncio.gather(*self.svc.tasks.values(), return_exceptions=True)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.02])
def test_simultaneous_starts_of_one_vm_exactly_one_proceeds(svc, monkeypatch, delay):
    async def scenario() -> None:
        stub = Stubbed(svc, monkeypatch, check_delay=delay)
        results = await asyncio.gather(*(stub.start() for _ in range(5)), return_exceptions=True)
        started = [r for r in results if isinstance(r, MigrationRecord)]
        refused = [r for r in results if isinstance(r, Conflict)]
        assert len(started) == 1 and len(refused) == 4, results
        assert stub.checked == 1  # the others were refused before checking anything
        assert f"VM {VM} is already being migrated from host-a" in str(refused[0]) and "\n" not in str(refused[0])
        assert svc.migrating == {VM: started[0].id}
        # Still refused while it runs, by id now; free again once it has ended.
        with pytest.raises(Conflict, match=f"migration {started[0].id}"):
            await stub.start()
        stub.finish.set()
        await stub.settle()
        assert svc.migrating == {}
        assert (await stub.start()).id != started[0].id

    in_service(svc, scenario)


def test_the_reservation_is_released_on_every_failure(svc, monkeypatch):
    async def scenario() -> None:
        stub = Stubbed(svc, monkeypatch)
        # Prechecks failing.
        stub.checks = (Check("memory", Level.ERROR, "host-b has 0 MiB free"),)
        with pytest.raises(PrecheckFailed, match="refused: host-b has 0 MiB free"):
            await stub.start()
        assert svc.migrating == {}
        # The migration failing (or being cancelled) after it started.
        stub.checks = (Check("memory", Level.PASS, "ok"),)
        stub.fail_with = RuntimeError("the stream broke")
        await stub.start()
        await stub.settle()
        assert svc.migrating == {}
        stub.fail_with = asyncio.CancelledError()
        await stub.start()
        await stub.settle()
        assert svc.migrating == {}
        # The start request itself cancelled while the checks run.
        stub.check_delay = 30
        task = asyncio.create_task(stub.start())
        await asyncio.sleep(0.01)
        assert VM in svc.migrating
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert svc.migrating == {}

    in_service(svc, scenario)


def test_unreachable_or_unknown_destination_releases_the_vm(svc):
    async def scenario() -> None:
        with pytest.raises(Unreachable, match=f"migration of {VM} to host-b refused: host agent at .* is not reachable"):
            await svc.start(VM, "host-b", MigrationOptions())
        assert svc.migrating == {}
        with pytest.raises(NotFound, match="no host named host-q"):
            await svc.start(VM, "host-q", MigrationOptions())
        assert svc.migrating == {}

    in_service(svc, scenario)


def test_the_record_carries_the_cluster_policy(svc, monkeypatch, cluster):
    async def scenario() -> list[bool]:
        stub = Stubbed(svc, monkeypatch)
        stub.finish.set()
        seen = []
        for encrypted in (True, False):
            save_cache(cluster, settings=ClusterSettings(encrypted=encrypted))  # the center's word, as a heartbeat brings it
            seen.append((await stub.start()).encrypted)
            await stub.settle()
        return seen

    assert in_service(svc, scenario) == [True, False]
    assert engine.encryption_policy() is False


def test_background_tasks_belong_to_the_service(svc, monkeypatch):
    """A migration runs in the service's task group: refused while the group is closed, cancelled
    (its VM released) when the group ends with the agent."""
    async def scenario() -> None:
        stub = Stubbed(svc, monkeypatch)
        with pytest.raises(Conflict, match="migration service of host-a is not running"):
            await stub.start()
        assert svc.migrating == {} and svc.history() == []
        async with svc.running():
            rec = await stub.start()
            await asyncio.sleep(0)
            assert list(svc.tasks) == [rec.id] and svc.migrating == {VM: rec.id}
        assert svc.tasks == {} and svc.migrating == {}

    asyncio.run(scenario())


# ---- the center's request, as its dispatcher sends it ---------------------------------------------------
def wired(agents: HttpAgents, url: str, asgi) -> None:  # type: ignore[no-untyped-def]
    """`agents`' client for `url` sends to the ASGI app `asgi` in process."""
    client = AsyncAgentClient(url)
    client._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=url)
    agents._clients[url] = client


def test_the_centers_typed_request_starts_a_migration(svc, ca, monkeypatch):
    """HttpAgents sends MigrationRequest (no hand-made dict) as the center's certificate; the route
    reads it as the CLI's: options kept, an unknown policy refused in one line."""
    agent = Agent(svc, ca)
    row = HostRow(name="host-a", address="127.0.0.1", agent_url="http://agent", state=HostState.CONNECTED, joined=0.0)

    async def scenario() -> MigrationRecord:
        stub = Stubbed(svc, monkeypatch)
        stub.finish.set()
        agents = HttpAgents(None)
        wired(agents, row.agent_url, as_caller(agent.asgi, ca.creds(Identity(Kind.CENTER, "center")).pem))
        try:
            asked = OptionsBody(max_downtime_ms=300, policy="fast")
            rec = await agents.start_migration(row, MigrationRequest(vm=VM, destination="host-b", options=asked))
            await stub.settle()
            with pytest.raises(InvalidInput, match=r"^unknown policy 'nope': use one of balanced"):
                await agents.start_migration(row, MigrationRequest(vm=VM, destination="host-b",
                                                                   options=OptionsBody(policy="nope")))
        finally:
            await agents.aclose()
        return rec

    rec = in_service(svc, scenario)
    assert (rec.vm, rec.source, rec.destination) == (VM, "host-a", "host-b")
    assert rec.options == MigrationOptions(max_downtime_ms=300, policy="fast")
