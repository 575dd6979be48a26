"""The migration stream's TLS between two real QEMUs, set up by the engine's add_stream_tls: the
destination admits the source host's QEMU identity and nothing else the cluster CA signed (another
host's QEMU, or the source's agent identity), and the source talks only to the destination it
named. `-machine none` QEMUs: the stream is a few hundred bytes of device state, so each migration
takes milliseconds and no guest boots."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmotion.api import joined
from kvmotion.api.identity import Identity, Kind
from kvmotion.api.joined import StateRoot
from kvmotion.api.tls import host_dir
from kvmotion.core.errors import VmFailed
from kvmotion.migration.engine import TLS_ID, add_stream_tls
from kvmotion.qemu.qmp import Qmp
from tests.center import CenterInThread

pytestmark = [pytest.mark.qemu]

OUTCOME_TIMEOUT = 20.0  # s for the destination to take or refuse a stream of a few hundred bytes


class Qemu:
    """A `-machine none` QEMU with a QMP socket; its stderr (where QEMU reports a refused peer) in a file."""

    def __init__(self, folder: Path, name: str, incoming: bool) -> None:
        self.sock = folder / f"{name}.qmp"
        self.log = folder / f"{name}.log"
        argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.sock},server=on,wait=off"] + (["-incoming", "defer"] if incoming else [])
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.qmp = Qmp(name)

    async def connect(self) -> Qmp:
        await self.qmp.connect(self.sock, alive=lambda: self.proc.poll() is None)
        return self.qmp

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    async def close(self) -> None:
        await self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 10)


@pytest.fixture
def cluster(tmp_path) -> Iterator[dict[str, StateRoot]]:
    """A center, and hosts host-a, host-b, host-c joined to it (each state root with its agent's and
    its QEMUs' identity, as `kvmotion host join` writes it)."""
    center = CenterInThread(tmp_path / "center")
    try:
        yield {name: center.join_host(name, "127.0.0.1", tmp_path / name) for name in ("host-a", "host-b", "host-c")}
    finally:
        joined.activate(None)
        center.close()


async def _migrate(roots: dict[str, StateRoot], *, source: str, sender: str, receiver: str,
                   agent_identity: bool = False) -> dict:
    """Migrate a QEMU of `sender` (its agent's certificate instead of its QEMUs' with `agent_identity`)
    to a QEMU of `receiver` that expects `source`; the source QEMU expects host-b. The outcome on both ends.
    Each end's credentials are read as its agent reads them: from its own joined root."""
    folder = roots[receiver].path.parent
    dst, src = Qemu(folder, "dst", incoming=True), Qemu(folder, "src", incoming=False)
    try:
        dq, sq = await dst.connect(), await src.connect()
        joined.activate(roots[receiver])
        await dq.execute("migrate-set-parameters", **await add_stream_tls(dq, receiver, "server", source))
        await dq.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = (await dq.execute("query-migrate"))["socket-address"][0]["port"]  # type: ignore[index]
        joined.activate(roots[sender])
        params = await add_stream_tls(sq, sender, "client", "host-b")
        if agent_identity:  # the same sender, presenting its agent's certificate (host:NAME)
            await sq.execute("object-del", id=TLS_ID)
            await sq.execute("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_ID, "endpoint": "client",
                                               "dir": str(host_dir(sender)), "verify-peer": True})
        await sq.execute("migrate-set-parameters", **params)
        await sq.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + OUTCOME_TIMEOUT
        while True:
            s = await sq.execute("query-migrate")
            try:
                d = (await dq.execute("query-migrate")).get("status")  # type: ignore[union-attr]
            except VmFailed:
                d = "exited"  # a destination QEMU whose incoming stream fails exits
            refused = "is denied" in dst.stderr() or s.get("status") == "failed"  # type: ignore[union-attr]
            # The source was asked first: it may still say "setup" when the destination has finished.
            if (d == "completed" and s.get("status") in ("completed", "failed")) or refused:  # type: ignore[union-attr]
                return {"dst": d, "src": s.get("status"), "src_error": s.get("error-desc", ""),  # type: ignore[union-attr]
                        "dst_stderr": dst.stderr()}
            assert time.monotonic() < deadline, f"no outcome within {OUTCOME_TIMEOUT} s: dst {d}, src {s}"
            await asyncio.sleep(0.05)
    finally:
        await src.close()
        await dst.close()


def test_dn_as_qemu_prints_it():
    """What QEMU 10.0.2 (GnuTLS) printed for a qemu:host-a peer: the certificate's attribute order."""
    assert Identity(Kind.QEMU, "host-a").tls_dn() == "O=kvmotion,OU=qemu,CN=host-a"


def test_destination_admits_only_the_source_hosts_qemu(cluster):
    ok = asyncio.run(_migrate(cluster, source="host-a", sender="host-a", receiver="host-b"))
    assert ok["dst"] == "completed" and ok["src"] == "completed", ok
    assert "denied" not in ok["dst_stderr"]

    other = asyncio.run(_migrate(cluster, source="host-a", sender="host-c", receiver="host-b"))
    assert other["dst"] != "completed", other
    assert "TLS x509 authz check for O=kvmotion,OU=qemu,CN=host-c is denied" in other["dst_stderr"], other

    agent = asyncio.run(_migrate(cluster, source="host-a", sender="host-a", receiver="host-b", agent_identity=True))
    assert agent["dst"] != "completed", agent
    assert "TLS x509 authz check for O=kvmotion,OU=host,CN=host-a is denied" in agent["dst_stderr"], agent


def test_source_talks_only_to_the_named_destination(cluster):
    """A QEMU of host-c listening where the source expects host-b: the source refuses the handshake."""
    r = asyncio.run(_migrate(cluster, source="host-a", sender="host-a", receiver="host-c"))
    assert r["src"] == "failed" and r["dst"] != "completed", r
    assert "Certificate does not match the hostname host-b" in r["src_error"], r
