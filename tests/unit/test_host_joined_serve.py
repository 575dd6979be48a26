"""A joined agent for real, no QEMU: `kvmotion center serve` and `kvmotion host join` / `host serve` as
subprocesses on loopback. The center sees the agent's heartbeats (connected, with its load), the
center's own certificate may use the agent's API, the agent keeps the center's picture in its cache,
and a killed agent turns not responding."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kvmotion.api.agent import AgentClient
from kvmotion.api.center import CenterClient, Credentials, DatastoreSpec, HostState, HostView, LoginRequest, trusting
from kvmotion.api.joined import StateRoot
from kvmotion.api.pki import new_key_and_csr
from kvmotion.core.errors import Unreachable
from tests.unit.test_center_serve import Center, _cli, _free_port


def _wait(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Seconds until `check()` holds (polled every 0.2 s); fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the agent exited ({proc.returncode})")
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_joined_agent_heartbeats_until_killed(tmp_path: Path) -> None:
    center_port, agent_port = _free_port(), _free_port()
    url = f"https://127.0.0.1:{center_port}"
    state = tmp_path / "host-state"
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "HOME": str(tmp_path / "home"), "KVMOTION_HOST_STATE": str(state), "KVMOTION_RUN": str(tmp_path / "run"),
           "KVMOTION_CACHE": str(tmp_path / "cache"),
           "KVMOTION_ACCEL": "tcg", "KVMOTION_CONFIG": str(tmp_path / "home" / "config")}
    center = Center(center_port, tmp_path / "center", env)
    agent: subprocess.Popen | None = None
    log = open(tmp_path / "agent.log", "w+")
    try:
        token = next(line for line in center.lines if line.startswith("join token")).rsplit(" ", 1)[1]
        password = next(line for line in center.lines if line.startswith("user admin's password")).rsplit(" ", 1)[1]
        key, csr = new_key_and_csr()
        with CenterClient(url, trusting(httpx.get(f"{url}/v1/ca", verify=False).json()["ca_cert"])) as anonymous:
            login = anonymous.login(LoginRequest(user="admin", password=password, csr=csr))
        admin = Credentials(center=url, user="admin", ca_cert=login.ca_cert, cert=login.cert, key=key.decode()).client()

        # Not joined yet: `host serve` says what to do, in one line.
        unjoined = _cli("host", "serve", env=env)
        assert unjoined.returncode != 0 and unjoined.stderr.count("\n") == 1 and "host join" in unjoined.stderr

        joined = _cli("host", "join", url, "--token", token, "--name", "host-a", "--address", "127.0.0.1",
                      "--port", str(agent_port), env=env)
        assert joined.returncode == 0, joined.stderr
        assert f"joined {url} as host host-a (https://127.0.0.1:{agent_port})" in joined.stdout
        again = _cli("host", "join", url, "--token", token, "--name", "host-a", "--address", "127.0.0.1", env=env)
        assert again.returncode != 0 and again.stderr.count("\n") == 1 and "give --force" in again.stderr
        admin.add_datastore(DatastoreSpec(name="ds1", nbd_url="nbds://127.0.0.1:10809", control_url="https://127.0.0.1:10810"))

        agent = subprocess.Popen([sys.executable, "-m", "kvmotion.cli.main", "host", "serve"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)

        def host() -> HostView:
            return admin.host("host-a")

        _wait("host-a connected with its load", lambda: host().state is HostState.CONNECTED and host().load is not None,
              30, agent)
        load = host().load
        assert load is not None and load.cpus >= 1 and 0 < load.memory_available <= load.memory_total
        first = host().last_heartbeat
        assert first is not None
        _wait("a second heartbeat", lambda: (host().last_heartbeat or 0) > first, 6, agent)

        # The agent's cache holds the center's picture (peers, datastores, settings).
        root = StateRoot(state)
        _wait("the cache refreshed", lambda: [d.name for d in root.cache().datastores] == ["ds1"], 15, agent)
        assert [h.name for h in root.cache().hosts] == ["host-a"] and root.cache().settings.encrypted

        # The agent serves mutual TLS with its joined certificate; the center's certificate may use it.
        center_tls = tmp_path / "center" / "tls"
        ctx = ssl.create_default_context(cafile=str(state / "tls" / "ca-cert.pem"))
        ctx.load_cert_chain(str(center_tls / "client-cert.pem"), str(center_tls / "client-key.pem"))
        info = AgentClient(f"https://127.0.0.1:{agent_port}", ssl_context=ctx, timeout=10).host()
        assert info.name == "host-a" and info.vms == 0

        # Killed: not responding once silent for the settings' 10 s (the center checks every 0.5 s).
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
        silent_for = _wait("host-a not responding", lambda: host().state is HostState.NOT_RESPONDING, 15)
        assert silent_for <= 13, silent_for
        admin.close()

        # With the center down, a restarted agent comes up from its state root and cache, and says once
        # that it works from the cached cluster state.
        center.close()
        agent = subprocess.Popen([sys.executable, "-m", "kvmotion.cli.main", "host", "serve"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            try:
                return AgentClient(f"https://127.0.0.1:{agent_port}", ssl_context=ctx, timeout=2).host().name == "host-a"
            except Unreachable:
                return False

        _wait("the agent serving with the center down", answers, 30, agent)
        _wait("the agent noting the center is down", lambda: "working from the cached cluster state" in
              (tmp_path / "agent.log").read_text(), 15, agent)
        time.sleep(4.5)  # two more failed beats: not logged again
        assert (tmp_path / "agent.log").read_text().count("working from the cached cluster state") == 1
    finally:
        if agent is not None:
            _stop(agent)
        center.close()
        log.seek(0)
        print(log.read()[-3000:])
        log.close()
