"""The agent's API refuses a bad VM spec with HTTP 422 and one line naming the field, and creates
nothing (no record, no disk file); in-process through httpx.ASGITransport, no QEMU started."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from functools import partial
from pathlib import Path

import httpx
import pytest

from kvmotion.api.agent import VmState, raise_for_error
from kvmotion.api.center import ClusterSettings, HostState
from kvmotion.api.joined import StateRoot
from kvmotion.api.migration import PROTOCOL
from kvmotion.api.serving import Security, secure
from kvmotion.api.spec import DiskSpec, VmSpec
from kvmotion.center.dispatcher import HttpAgents
from kvmotion.center.store import HostRow
from kvmotion.core.errors import InvalidInput
from kvmotion.host.api import create_app
from kvmotion.host.vms import HostConfig
from kvmotion.migration.api import migration_router
from kvmotion.qemu import cpus
from kvmotion.qemu.accel import Accel, AccelChoice
from tests.joinedroot import make_root, save_cache, serve_in_test
from tests.unit.test_migration_api import wired

MAC = "52:54:00:12:34:56"
QEMU_MODELS = frozenset({"qemu64", "qemu64-v1", "Haswell-v4", "max", "host"})


class Agent:
    def __init__(self, root: Path, accel: Accel = Accel.TCG) -> None:
        self.root = root
        self.config = HostConfig(name="host-a", state_dir=root / "state", run_dir=root / "run",
                                 portgroups={"vm-net": "kv-vm-net"}, accel=AccelChoice(accel, "test"))
        router = partial(migration_router, listen_ip="127.0.0.1", limit=4)
        # Insecure: every caller acts as an admin (authorization has its own tests, test_agent_authz.py).
        self.app = secure(create_app(self.config, extra_routers=(router,)),
                          Security(tls_files=None, audit_log=None, insecure=True), "agent host-a")

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(go())

    def files(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Agent:
    serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a"))
    monkeypatch.setattr(cpus, "listed_models", lambda binary=cpus.QEMU: QEMU_MODELS)
    return Agent(tmp_path)


def _spec(**changes: object) -> dict:
    return {"name": "web1", "memory": 256 << 20, **changes}


def _refused(agent: Agent, response: httpx.Response, before: set[str]) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["kind"] == "InvalidInput"
    assert "\n" not in error["message"]
    assert agent.files() == before  # nothing created: no record, no disk file
    return error["message"]


@pytest.mark.parametrize("change, says", [
    ({"nics": [{"mac": f"{MAC},romfile=/etc/shadow", "portgroup": "vm-net"}]}, "invalid VM spec: nics.0.mac: invalid MAC"),
    ({"cpu_model": "qemu64,+vmx"}, "invalid VM spec: cpu_model: invalid CPU model"),
    ({"nics": [{"mac": MAC, "portgroup": "vm-net", "ip": "1.2.3.4/24 init=/bin/sh"}]},
     "invalid VM spec: nics.0.ip: invalid NIC address"),
    ({"disks": [{"source": "../../../../etc/shadow", "size": 1 << 20}]}, "invalid VM spec: disks.0.source: invalid local disk"),
    ({"disks": [{"source": "/dev/sda"}]}, "invalid VM spec: disks.0.source: invalid local disk"),
    ({"memory": "lots"}, "invalid VM spec: memory: Input should be a valid integer (got 'lots')"),
    ({"romfile": "/etc/shadow"}, "invalid VM spec: romfile: is not a known field"),
])
def test_bad_spec_is_422_with_one_line_and_creates_nothing(agent: Agent, change: dict, says: str) -> None:
    before = agent.files()
    message = _refused(agent, agent.request("POST", "/v1/vms", json=_spec(**change)), before)
    assert message.startswith(says), message
    assert agent.request("GET", "/v1/vms").json() == []


def test_unparsable_body_is_422_with_one_line(agent: Agent) -> None:
    before = agent.files()
    message = _refused(agent, agent.request("POST", "/v1/vms", content=b'{"name": "web1",',
                                            headers={"content-type": "application/json"}), before)
    assert message.startswith("invalid VM spec: ") and "JSON" in message


def test_good_spec_creates_the_record_and_the_disk(agent: Agent) -> None:
    r = agent.request("POST", "/v1/vms", json=_spec(disks=[{"source": "web1.img", "size": 1 << 20}],
                                                   nics=[{"mac": MAC.upper(), "portgroup": "vm-net"}]))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["nics"][0]["mac"] == MAC  # normalised
    disk = agent.config.state_dir / "disks" / "web1.img"
    assert disk.stat().st_size == 1 << 20
    assert json.loads((agent.config.state_dir / "vms" / "web1.json").read_text())["spec"]["name"] == "web1"


@pytest.mark.parametrize("make, says", [
    (lambda p: p.symlink_to("/etc/passwd"), "is a symlink"),
    (lambda p: p.symlink_to(p.with_name("absent.img")), "is a symlink"),  # a dangling one would be created through
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: p.mkdir(), "is not a regular file"),
    pytest.param(lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "is not a regular file",
                 marks=pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")),  # /dev/null's numbers
])
def test_local_disk_must_be_a_plain_file_in_the_disk_folder(agent: Agent, make, says: str) -> None:  # type: ignore[no-untyped-def]
    disks = agent.config.state_dir / "disks"
    disks.mkdir(parents=True)
    make(disks / "evil.img")
    before = agent.files()
    message = _refused(agent, agent.request("POST", "/v1/vms", json=_spec(disks=[{"source": "evil.img", "size": 1 << 20}])),
                       before)
    assert message.startswith(f"disk evil.img of VM web1 {says}"), message


def test_a_refused_second_disk_leaves_no_first_disk(agent: Agent) -> None:
    before = agent.files()
    r = agent.request("POST", "/v1/vms", json=_spec(disks=[{"source": "new.img", "size": 1 << 20}, {"source": "absent.img"}]))
    assert r.status_code == 404 and "absent.img" in r.json()["error"]["message"]
    assert agent.files() == before


def test_cpu_model_must_run_on_this_host(agent: Agent, tmp_path: Path) -> None:
    before = agent.files()
    message = _refused(agent, agent.request("POST", "/v1/vms", json=_spec(cpu_model="Nehalem-v9")), before)
    assert message == "CPU model 'Nehalem-v9' is unknown to QEMU on host host-a: see `qemu-system-x86_64 -cpu help`"
    message = _refused(agent, agent.request("POST", "/v1/vms", json=_spec(cpu_model="host")), before)
    assert message.startswith("CPU model host needs KVM")
    # The cluster's baseline is accepted, as is a model QEMU lists.
    save_cache(StateRoot(tmp_path / "host-a"), settings=ClusterSettings(cpu_baseline="Nehalem-v9"))  # the center's word
    assert agent.request("POST", "/v1/vms", json=_spec(cpu_model="Nehalem-v9")).status_code == 201
    assert agent.request("POST", "/v1/vms", json=_spec(name="web2", cpu_model="Haswell-v4")).status_code == 201


def test_the_centers_create_sends_the_spec_model(agent: Agent) -> None:
    """HttpAgents.create_vm sends the VmSpec model itself (its own JSON); the agent defines it as given."""
    row = HostRow(name="host-a", address="127.0.0.1", agent_url="http://agent", state=HostState.CONNECTED, joined=0.0)
    spec = VmSpec(name="web1", memory=256 << 20, vcpus=2, disks=(DiskSpec(source="web1.img", size=1 << 20),))

    async def go() -> VmState | None:
        agents = HttpAgents(None)
        wired(agents, row.agent_url, agent.app)
        try:
            await agents.create_vm(row, spec)
            return await agents.vm_state(row, "web1")
        finally:
            await agents.aclose()

    assert asyncio.run(go()) is VmState.STOPPED
    assert VmSpec.from_json(agent.request("GET", "/v1/vms/web1").json()["spec"]) == spec


def test_host_cpu_model_under_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_in_test(monkeypatch, make_root(tmp_path / "host-a", "host-a"))
    monkeypatch.setattr(cpus, "listed_models", lambda binary=cpus.QEMU: QEMU_MODELS)
    assert Agent(tmp_path, Accel.KVM).request("POST", "/v1/vms", json=_spec(cpu_model="host")).status_code == 201


@pytest.mark.parametrize("path, says", [
    ("/v1/vms/web1/start?timeout=0", "invalid query parameter: timeout: "),
    ("/v1/vms/web1/start?timeout=601", "invalid query parameter: timeout: "),
    ("/v1/vms/web1/start?wait_ready=maybe", "invalid query parameter: wait_ready: "),
    ("/v1/vms/Web_1/start", "invalid path parameter: name: "),
])
def test_bad_parameters_are_422_with_one_line(agent: Agent, path: str, says: str) -> None:
    before = agent.files()
    assert _refused(agent, agent.request("POST", path), before).startswith(says)


def test_incoming_migration_spec_goes_through_the_same_model(agent: Agent) -> None:
    before = agent.files()
    body = {"protocol": PROTOCOL.model_dump(), "offer": {"multifd_channels": 3, "compression": ["none"]},
            "spec": _spec(nics=[{"mac": f"{MAC},romfile=/etc/shadow", "portgroup": "vm-net"}]),
            "migration_id": "0123456789ab", "source": "host-b"}
    message = _refused(agent, agent.request("POST", "/v1/incoming", json=body), before)
    assert message.startswith("invalid request body: spec.nics.0.mac: invalid MAC"), message
    message = _refused(agent, agent.request("POST", "/v1/incoming", json={"migration_id": "m1"}), before)
    assert message.startswith("invalid request body: "), message


def test_openapi_describes_the_spec(agent: Agent) -> None:
    doc = agent.request("GET", "/openapi.json").json()
    body = doc["paths"]["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/VmSpec"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["VmSpec"]["properties"]) == {"name", "memory", "vcpus", "cpu_model", "disks", "nics",
                                                    "workloads", "params", "version"}
    assert schemas["VmSpec"]["additionalProperties"] is False
    assert schemas["VmSpec"]["properties"]["vcpus"]["maximum"] == 64
    assert "pattern" in schemas["NicSpec"]["properties"]["mac"]
    start = doc["paths"]["/v1/vms/{name}/start"]["post"]["parameters"]
    timeout = next(p for p in start if p["name"] == "timeout")["schema"]
    assert (timeout["minimum"], timeout["maximum"]) == (1, 600)


def test_client_maps_422_back_to_invalid_input(agent: Agent) -> None:
    r = agent.request("POST", "/v1/vms", json=_spec(vcpus=0))
    with pytest.raises(InvalidInput, match=r"^invalid VM spec: vcpus: vCPU count 0 is out of range: use 1 to 64$"):
        raise_for_error(r, "host-a")


def test_cpu_help_is_parsed() -> None:
    text = ("Available CPUs:\n  486                   (alias configured by machine type)\n"
            "  Haswell-v4            Intel Core Processor (Haswell, no TSX, IBRS)\n"
            "  host                  processor with all supported host features \n\n"
            "Recognized CPUID flags:\n  3dnow 3dnowext abm\n")
    assert cpus.parse_cpu_help(text) == {"486", "Haswell-v4", "host"}


@pytest.mark.skipif(cpus.shutil.which(cpus.QEMU) is None, reason="needs qemu-system-x86_64")
def test_this_hosts_qemu_lists_its_models() -> None:
    models = cpus.listed_models()
    assert {"qemu64", "max"} <= models and "aes" not in models  # models, not CPUID flags
    assert cpus.listed_models() is models  # cached


@pytest.mark.parametrize("method, path, kwargs, status, kind, says", [
    # Found by the fuzz test: answered by the framework as {"detail": ...}, not the shared error shape.
    ("POST", "/v1/vms", {"content": b"\x80", "headers": {"content-type": "application/json"}}, 400, "InvalidInput",
     "POST '/v1/vms': There was an error parsing the body"),
    ("GET", "/v1/nothing/here", {}, 404, "NotFound", "no API route GET '/v1/nothing/here': see /openapi.json"),
    ("GET", "/v1/vms/a%0Ab/more", {}, 404, "NotFound", "no API route GET '/v1/vms/a\\nb/more': see /openapi.json"),
    ("PUT", "/v1/vms", {}, 405, "InvalidInput", "method PUT is not allowed on '/v1/vms': see /openapi.json"),
])
def test_framework_errors_have_the_error_shape(agent: Agent, method: str, path: str, kwargs: dict, status: int,
                                               kind: str, says: str) -> None:
    before = agent.files()
    r = agent.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"kind": kind, "message": says}}
    assert agent.files() == before


def test_a_vm_name_in_a_migration_path_is_checked(agent: Agent) -> None:
    """Found by the fuzz test: the name was echoed as given, a newline splitting the message."""
    before = agent.files()
    message = _refused(agent, agent.request("POST", "/v1/vms/a%0Ab/migration/cancel"), before)
    assert message.startswith("invalid path parameter: name: "), message


@pytest.mark.parametrize("extra, says", [
    # Found by the fuzz test: an unknown key was named as given, a "\r" splitting the message.
    ({"\r": 1}, "invalid VM spec: '\\r': is not a known field"),
    ({"a.b c": 1}, "invalid VM spec: 'a.b c': is not a known field"),
    ({"params": {"x\ny": 1}}, "invalid VM spec: params.'x\\ny': is not a known field"),
])
def test_an_unknown_field_is_named_on_one_line(agent: Agent, extra: dict, says: str) -> None:
    before = agent.files()
    assert _refused(agent, agent.request("POST", "/v1/vms", json=_spec(**extra)), before) == says
