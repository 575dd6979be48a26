"""Test harness: a host agent in its own network namespace, reachable from the test over a veth,
joined to a center that runs in the test process (tests/center.py) on the veth's root-side address.

The host joins with the center's token (`kvmotion host join`'s code, its state root at
STATE/hosts/NAME); the agent serves that root; the test's CLI is logged in to the center as admin
(KVMOTION_CONFIG) and calls the agent with the admin's certificate. Each harness has unique names
(namespace, links, subnets, folders) and removes everything it made, QEMU processes included,
even when the test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmotion.api.agent import AgentClient
from kvmotion.api.center import HostState
from kvmotion.api.tls import client_context
from kvmotion.net import links, netns
from tests.center import CenterInThread


def _free_port() -> int:
    return random.randint(20000, 45000)


@dataclass
class AgentHarness:
    """One host: namespace, VM bridge with a host-side address, an agent process."""

    name: str = "host-a"
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}{random.randint(0, 99):02d}")
    agent: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        k = random.randint(1, 250)
        self.ns = f"kvt-{self.tag}"
        self.root_if, self.ns_if = f"kvr{self.tag}", f"kvn{self.tag}"
        self.mgmt_root, self.mgmt_ns = f"10.213.{k}.1", f"10.213.{k}.2"
        self.bridge = "br-vm"
        self.vm_net = f"10.214.{k}"
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kvt"))
        self.state = self.dir / "state" / "hosts" / self.name  # the host's joined state root
        self.center: CenterInThread | None = None
        self.env = {k: v for k, v in os.environ.items() if k not in ("KVMOTION_CONFIG", "KVMOTION_HOST_STATE")}
        self.env.update(KVMOTION_STATE=str(self.dir / "state"), KVMOTION_RUN=str(self.dir / "run"),
                        KVMOTION_CONFIG=str(self.dir / "admin" / "config"))
        netns.create_ns(self.ns)
        netns.set_up(self.ns, "lo")
        netns.create_veth(self.root_if, None, self.ns_if, self.ns)
        netns.add_address(None, self.root_if, f"{self.mgmt_root}/30")
        netns.add_address(self.ns, self.ns_if, f"{self.mgmt_ns}/30")
        netns.run_in_ns(self.ns, links.ensure_bridge, self.bridge)
        netns.add_address(self.ns, self.bridge, f"{self.vm_net}.1/24")
        try:
            # The center on the root side of the veth: the agent reaches it from its namespace.
            self.center = CenterInThread(self.dir / "center", ip=self.mgmt_root, dispatch=True)
            self.center.join_host(self.name, self.mgmt_ns, self.state, agent_port=self.port)
            self.center.login_config(self.dir / "admin" / "config")  # the test's CLI: user admin
            self.admin = self.center.user_dir(self.dir / "admin" / "tls")  # the test's own calls to the agent
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"https://{self.mgmt_ns}:{self.port}"

    def start_agent(self) -> None:
        log = open(self.dir / "agent.log", "ab")
        self.agent = netns.popen_in_ns(
            self.ns,
            [sys.executable, "-m", "kvmotion.cli.main", "host", "serve", "--state-dir", str(self.state),
             "--portgroup", f"vm-net={self.bridge}"],
            env=self.env, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                AgentClient(self.url, ssl_context=self.tls(), timeout=2).host()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not come up: {(self.dir / 'agent.log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    def wait_connected(self, timeout: float = 60) -> None:
        """Until the center sees the host connected, with its load and facts (what placement needs)."""
        assert self.center is not None
        store = self.center.prepared.center.store
        deadline = time.monotonic() + timeout
        while True:
            row = store.host(self.name)
            if row is not None and row.state is HostState.CONNECTED and row.load is not None and row.facts is not None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the center did not see {self.name} connected: {row}; agent log: "
                                   f"{(self.dir / 'agent.log').read_text()[-1500:]}")
            time.sleep(0.2)

    def kill_agent(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait()

    def tls(self):
        return client_context(self.admin)

    def client(self) -> AgentClient:
        return AgentClient(self.url, ssl_context=self.tls())

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvmotion.cli.main", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def qemu_pids(self) -> list[int]:
        """kvmotion QEMU processes whose run folder is this harness's."""
        out = []
        for pid in netns.pids_in_ns(self.ns):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(self.dir).encode() in cmd:
                out.append(pid)
        return out

    def close(self, keep_log: Path | None = None) -> None:
        """Everything torn down; the agent's log copied into `keep_log` first if given (a failed test's)."""
        self.kill_agent()
        if self.center is not None:
            self.center.close()
        netns.kill_ns_processes(self.ns)
        netns.delete_link_in(None, self.root_if)
        netns.delete_ns(self.ns)
        if keep_log is not None and (self.dir / "agent.log").exists():
            shutil.copy(self.dir / "agent.log", keep_log / f"agent-{self.name}.log")
            print(f"agent {self.name}: log kept in {keep_log}", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)
