"""A lab cluster: the lab's namespaces (kvmotion.net.lab) plus what runs in them, set up the way a
user with separate machines would, through the center:

    machines/center/   the center's machine: `center serve --data data/` in the center namespace
    machines/ds1/      the datastore's: its disks (disks/) and its certificate (tls/)
    machines/host-X/   each host's: its joined state root (state/: config.json, tls/, vms/, disks/)
                       and runtime folder (run/: sockets, serial logs)
    admin/config       the lab admin's login config (`kvmotion login`): the CLI's identity
    logs/              each process's output, collected by the lab (like a console server)

Each process runs in its machine's namespace with every other machine's folder (and admin/, logs/)
covered by an empty read-only tmpfs (kvmotion.net.lab.spawn_in_ns hide=): no machine reads
another's files. The center prints user admin's password and a join token on its first start;
the lab reads them from its log, logs the admin in, issues the datastore's certificate on the
center's machine (`kvmotion center cert datastore`), registers ds1 at the center, then joins each
host with the token from inside its namespace and runs its agent joined (`kvmotion host serve`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api import userconfig
from kvmotion.api.agent import AgentClient
from kvmotion.api.center import HostState
from kvmotion.api.datastore import client_for
from kvmotion.api.joined import StateRoot
from kvmotion.api.registry import DatastoreRef
from kvmotion.core import cgroups
from kvmotion.core.errors import SetupError
from kvmotion.net import lab as labmod

AGENT_PORT = 7701
CENTER_PORT = 7700
NBD_PORT = 10809
DATASTORE = "ds1"
CENTER = "center"
STEP_TIMEOUT = 60.0  # seconds a lab process may take to come up
# What identifies a cluster to a kvmotion process: none of it leaks from the caller into the lab's
# processes or the lab's CLI, which get their own.
_CLUSTER_ENV = ("KVMOTION_CLUSTER_DIR", "KVMOTION_CREDENTIALS", "KVMOTION_USER", "KVMOTION_CONFIG",
                "KVMOTION_HOST_STATE", "KVMOTION_STATE")


@dataclass(frozen=True)
class CenterSecrets:
    """What the center's first start printed (kept in the lab's own folder, readable by root only)."""

    password: str
    token: str
    ca_sha256: str


@dataclass(frozen=True)
class LabCluster:
    topology: labmod.LabTopology
    folder: Path
    encrypted: bool

    # ---- folders -------------------------------------------------------------------------------
    def machine(self, name: str) -> Path:
        """A machine's own folder: CENTER, DATASTORE or a host's name."""
        return self.folder / "machines" / name

    def machines(self) -> tuple[str, ...]:
        return (CENTER, DATASTORE, *(h.name for h in self.topology.hosts))

    def host_state(self, host: str) -> Path:
        """The host's joined state root (VM records: vms/, local disks: disks/, tls/)."""
        return self.machine(self.topology.host(host).name) / "state"

    def host_run(self, host: str) -> Path:
        """The host agent's runtime folder (vms/VM/serial.log, sockets)."""
        return self.machine(self.topology.host(host).name) / "run"

    def serial_log(self, host: str, vm: str) -> Path:
        return self.host_run(host) / "vms" / vm / "serial.log"

    @property
    def center_data(self) -> Path:
        return self.machine(CENTER) / "data"

    @property
    def datastore_root(self) -> Path:
        return self.machine(DATASTORE) / "disks"

    @property
    def datastore_tls(self) -> Path:
        return self.machine(DATASTORE) / "tls"

    @property
    def admin_config(self) -> Path:
        return self.folder / "admin" / "config"

    def log(self, process: str) -> Path:
        """The output of a lab process: CENTER, DATASTORE or a host's name (its agent)."""
        return self.folder / "logs" / f"{process}.log"

    def hide_from(self, machine: str) -> list[Path]:
        """Every folder of the lab a process of `machine` must not see."""
        others = [self.machine(m) for m in self.machines() if m != machine]
        return [*others, self.folder / "admin", self.folder / "logs"]

    # ---- addresses -----------------------------------------------------------------------------
    @property
    def center_url(self) -> str:
        return f"{'https' if self.encrypted else 'http'}://{self.topology.center.ip}:{CENTER_PORT}"

    def agent_url(self, host: str) -> str:
        scheme = "https" if self.encrypted else "http"
        return f"{scheme}://{self.topology.host(host).mgmt_ip}:{AGENT_PORT}"

    @property
    def nbd_url(self) -> str:
        """nbds:// (NBD over TLS) in an encrypted lab, nbd:// in a plain one."""
        scheme = "nbds" if self.encrypted else "nbd"
        return f"{scheme}://{self.topology.datastore.ip}:{NBD_PORT}"

    # ---- environments --------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The lab admin's CLI: logged in to the lab's center (KVMOTION_CONFIG), no cluster folder."""
        env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
        env["KVMOTION_CONFIG"] = str(self.admin_config)
        return env

    def machine_env(self, machine: str) -> dict[str, str]:
        """A process on `machine`: its own state and runtime folders, nothing of the caller's cluster."""
        env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
        env["KVMOTION_STATE"] = str(self.machine(machine) / "var")
        env["KVMOTION_RUN"] = str(self.machine(machine) / "run")
        if machine not in (CENTER, DATASTORE):
            env["KVMOTION_HOST_STATE"] = str(self.host_state(machine))
        return env


def _kvmotion(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmotion.cli.main", *args]


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "no output"


def _wait(what: str, probe: Callable[[], bool], proc: subprocess.Popen | None, log: Path,
          timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise SetupError(f"{what} did not come up: {_tail(log)} (log: {log})")
        time.sleep(0.1)


@contextmanager
def cluster_env(cluster: LabCluster) -> Iterator[None]:
    """Within this block, this process is the lab's admin CLI: logged in to the lab's center, with
    no cluster folder or credentials of the caller's (the run folder, where labs are registered,
    stays the caller's)."""
    old = {k: os.environ.get(k) for k in _CLUSTER_ENV}
    for k in _CLUSTER_ENV:
        os.environ.pop(k, None)
    os.environ["KVMOTION_CONFIG"] = str(cluster.admin_config)
    userconfig.forget()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        userconfig.forget()


# ---- the processes, each on its machine -----------------------------------------------------------
def _spawn(cluster: LabCluster, machine: str, ns: str, argv: list[str]) -> subprocess.Popen:
    return labmod.spawn_in_ns(ns, argv, cluster.log(machine), cluster.machine_env(machine),
                              hide=cluster.hide_from(machine))


def _run_on(cluster: LabCluster, machine: str, ns: str, argv: list[str], what: str, timeout: float = STEP_TIMEOUT) -> None:
    """A one-shot command on `machine` (its namespace, its folders only); SetupError unless it succeeds."""
    proc = _spawn(cluster, machine, ns, argv)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SetupError(f"{what} did not finish within {timeout:.0f} s (log: {cluster.log(machine)})") from None
    if code != 0:
        raise SetupError(f"{what} failed: {_tail(cluster.log(machine))} (log: {cluster.log(machine)})")


def center_argv(cluster: LabCluster) -> list[str]:
    argv = _kvmotion("center", "serve", "--listen", f"{cluster.topology.center.ip}:{CENTER_PORT}",
                     "--data", str(cluster.center_data))
    return argv if cluster.encrypted else [*argv, "--insecure"]


def start_center(cluster: LabCluster) -> subprocess.Popen:
    """Start the center on its machine (also to restart it); returns once it answers."""
    proc = _spawn(cluster, CENTER, cluster.topology.center.ns, center_argv(cluster))
    log = cluster.log(CENTER)

    def answers() -> bool:
        from kvmotion.api.center import pinned_ca

        pinned_ca(cluster.center_url, None, timeout=1)
        return True

    _wait("the center", answers, proc, log)
    return proc


_SECRET_LINES = {
    "password": re.compile(r"user admin's password, shown this once: (\S+)"),
    "token": re.compile(r"join token, valid until [^:]*:\d\d UTC: (\S+)"),
    "ca_sha256": re.compile(r"CA SHA-256 ([0-9a-f]{64})"),
}


def read_first_start(log: Path) -> CenterSecrets:
    """User admin's password, the join token and the CA's SHA-256, as the center's first start printed them."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = {key: m.group(1) for key, rx in _SECRET_LINES.items() if (m := rx.search(text))}
    missing = [key for key in _SECRET_LINES if key not in found]
    if missing:
        raise SetupError(f"the center's first start printed no {', '.join(missing)} (log: {log})")
    return CenterSecrets(**found)


def login_admin(cluster: LabCluster, secrets: CenterSecrets) -> None:
    """`kvmotion login` as admin, the password on stdin, into the lab's admin config."""
    argv = _kvmotion("login", cluster.center_url, "--user", "admin", "--ca-sha256", secrets.ca_sha256, "--password-stdin")
    cluster.admin_config.parent.mkdir(mode=0o700, exist_ok=True)
    r = subprocess.run(argv, env=cluster.env, input=secrets.password + "\n", capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if r.returncode != 0:
        raise SetupError(f"the lab admin's login failed: {r.stderr.strip()}")


def datastore_argv(cluster: LabCluster) -> list[str]:
    """How the lab runs datastore ds1: TLS with the certificate the center's CA issued it, or --insecure."""
    argv = _kvmotion("datastore", "serve", DATASTORE, "--root", str(cluster.datastore_root),
                     "--listen", f"{cluster.topology.datastore.ip}:{NBD_PORT}")
    return [*argv, "--cert-dir", str(cluster.datastore_tls)] if cluster.encrypted else [*argv, "--insecure"]


def issue_datastore_certificate(cluster: LabCluster) -> None:
    """On the center's machine, with its CA: ds1's certificate; then carried to the datastore's
    machine (as an admin would copy it over a trusted channel), and gone from the center's."""
    out = cluster.machine(CENTER) / "outbox" / DATASTORE
    argv = _kvmotion("center", "cert", "datastore", DATASTORE, "--ip", cluster.topology.datastore.ip,
                     "--out", str(out), "--data", str(cluster.center_data))
    _run_on(cluster, CENTER, cluster.topology.center.ns, argv, "issuing ds1's certificate")
    shutil.copytree(out, cluster.datastore_tls)
    shutil.rmtree(out.parent)


def start_datastore(cluster: LabCluster) -> subprocess.Popen:
    """Start ds1 on its machine (also to restart it); returns once it answers the admin."""
    proc = _spawn(cluster, DATASTORE, cluster.topology.datastore.ns, datastore_argv(cluster))
    ref = DatastoreRef.make(DATASTORE, cluster.nbd_url)

    def answers() -> bool:
        with cluster_env(cluster), client_for(ref, timeout=1) as client:  # as the lab's admin user
            return client.reachable()

    _wait("datastore ds1", answers, proc, cluster.log(DATASTORE))
    return proc


def join_host(cluster: LabCluster, host: str, token: str) -> None:
    """`kvmotion host join` from inside the host's namespace, into its own state root."""
    h = cluster.topology.host(host)
    argv = _kvmotion("host", "join", cluster.center_url, "--token", token, "--name", h.name, "--address", h.mgmt_ip,
                     "--port", str(AGENT_PORT), "--state-dir", str(cluster.host_state(h.name)))
    _run_on(cluster, h.name, h.ns, argv, f"{h.name} joining the center")


def agent_argv(cluster: LabCluster, host: str) -> list[str]:
    """How the lab runs `host`'s agent, joined (also used to restart one)."""
    h = cluster.topology.host(host)
    argv = _kvmotion("host", "serve", "--state-dir", str(cluster.host_state(h.name)),
                     "--run-dir", str(cluster.host_run(h.name)),
                     "--portgroup", f"{cluster.topology.portgroup}={h.vm_bridge}")
    return argv if cluster.encrypted else [*argv, "--insecure"]


def lab_agent_client(cluster: LabCluster, host: str, timeout: float = 5.0) -> AgentClient:
    """`host`'s agent as the lab's admin user (the login config's certificate)."""
    if not cluster.encrypted:
        return AgentClient(cluster.agent_url(host), timeout=timeout)
    with cluster_env(cluster):
        ctx = userconfig.user_ssl_context()
    return AgentClient(cluster.agent_url(host), ssl_context=ctx, timeout=timeout)


def start_agent(cluster: LabCluster, host: str, timeout: float = STEP_TIMEOUT) -> subprocess.Popen:
    """Start `host`'s joined agent on its machine (also to restart one); returns once it answers."""
    h = cluster.topology.host(host)
    group = labmod.host_cpu_group(cluster.topology, h.name)
    proc = _spawn(cluster, h.name, h.ns, agent_argv(cluster, h.name))
    if group is not None:
        # At once, while the agent is still starting Python: the QEMUs it starts later inherit the group.
        try:
            cgroups.move_process(group, proc.pid)
        except SetupError:
            proc.kill()
            proc.wait()
            raise
    client = lab_agent_client(cluster, h.name, timeout=2)
    _wait(f"agent {h.name}", lambda: client.host() is not None, proc, cluster.log(h.name), timeout)
    return proc


def wait_hosts_connected(cluster: LabCluster, timeout: float = 90.0) -> None:
    """Until the center sees every host connected, with facts that name ds1 (placement needs them;
    facts fetched in the instant before a host's cache learnt ds1 are refreshed within a minute)."""
    names = {h.name for h in cluster.topology.hosts}

    def ready() -> bool:
        with cluster_env(cluster), userconfig.load_credentials().client(timeout=5) as center:
            hosts = {h.name: h for h in center.hosts()}
        return names <= hosts.keys() and all(
            hosts[n].state is HostState.CONNECTED and hosts[n].facts is not None and DATASTORE in hosts[n].facts.datastores
            for n in names) and all(peers_known(n) for n in names)

    def peers_known(host: str) -> bool:
        """The host's agent has learnt every peer from the center (its cache, refreshed every few beats)."""
        cache = StateRoot(cluster.host_state(host)).cache()
        return names <= {h.name for h in cache.hosts} and DATASTORE in {d.name for d in cache.datastores}

    _wait("the hosts at the center", ready, None, cluster.log(CENTER), timeout)


def start_cluster(topo: labmod.LabTopology, encrypted: bool = True) -> LabCluster:
    """The center, datastore ds1 and a joined agent per host, each on its own machine; the lab's
    admin logged in (cluster.env is its CLI)."""
    folder = labmod.lab_dir(topo.name)
    cluster = LabCluster(topology=topo, folder=folder, encrypted=encrypted)
    for m in cluster.machines():
        cluster.machine(m).mkdir(parents=True, exist_ok=True)
    for d in ("admin", "logs"):
        (folder / d).mkdir(mode=0o700, exist_ok=True)
    cluster.datastore_root.mkdir(exist_ok=True)

    start_center(cluster)
    secrets = read_first_start(cluster.log(CENTER))
    login_admin(cluster, secrets)
    if encrypted:
        issue_datastore_certificate(cluster)
    start_datastore(cluster)
    r = subprocess.run(_kvmotion("datastore", "add", DATASTORE, cluster.nbd_url), env=cluster.env,
                       capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if r.returncode != 0:
        raise SetupError(f"registering ds1 at the center failed: {r.stderr.strip()}")
    for h in topo.hosts:
        join_host(cluster, h.name, secrets.token)
        start_agent(cluster, h.name)
    wait_hosts_connected(cluster)
    return cluster


def load_cluster(name: str) -> LabCluster:
    topo = labmod.load_lab(name)
    folder = labmod.lab_dir(name)
    encrypted = (folder / "machines" / DATASTORE / "tls").exists()
    return LabCluster(topology=topo, folder=folder, encrypted=encrypted)
