"""A lab cluster: the lab's namespaces (kvmotion.net.lab) plus what runs in them — a host agent
per host, the datastore service, the cluster CA and inventory — all under the lab's own folder,
so two labs never share state."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvmotion.api.agent import AgentClient
from kvmotion.api.config import ClusterConfig, save_config
from kvmotion.api.datastore import client_for
from kvmotion.api.identity import Role
from kvmotion.api.pki import init_ca, issue_datastore_cert, issue_host_cert, issue_user_cert
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.api.tls import DEFAULT_USER, cli_ssl_context
from kvmotion.core.errors import SetupError
from kvmotion.net import lab as labmod
from kvmotion.qemu import confine

AGENT_PORT = 7701
NBD_PORT = 10809
DATASTORE = "ds1"


@dataclass(frozen=True)
class LabCluster:
    topology: labmod.LabTopology
    folder: Path
    encrypted: bool

    @property
    def env(self) -> dict[str, str]:
        """Environment under which the CLI, agents and tests see this lab's cluster."""
        return dict(
            os.environ,
            KVMOTION_CLUSTER_DIR=str(self.folder / "cluster"),
            KVMOTION_STATE=str(self.folder / "state"),
            KVMOTION_RUN=str(self.folder / "run"),
        )

    def agent_url(self, host: str) -> str:
        scheme = "https" if self.encrypted else "http"
        return f"{scheme}://{self.topology.host(host).mgmt_ip}:{AGENT_PORT}"

    @property
    def nbd_url(self) -> str:
        """nbds:// (NBD over TLS) in an encrypted lab, nbd:// in a plain one."""
        scheme = "nbds" if self.encrypted else "nbd"
        return f"{scheme}://{self.topology.datastore.ip}:{NBD_PORT}"


def _kvmotion(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmotion.cli.main", *args]


def _wait(what: str, probe, proc, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise SetupError(f"{what} did not come up: {tail[0] if tail else 'no output'} (log: {log})")
        time.sleep(0.1)


_ENV_KEYS = ("KVMOTION_CLUSTER_DIR", "KVMOTION_STATE", "KVMOTION_RUN")
# The cluster folder alone: the process's CLI helpers (inventory, datastore registry, TLS identity)
# see the lab's cluster, while the run folder stays the machine's, where labs are registered.
CLUSTER_DIR_ONLY = ("KVMOTION_CLUSTER_DIR",)


@contextmanager
def cluster_env(cluster: LabCluster, keys: tuple[str, ...] = _ENV_KEYS) -> Iterator[None]:
    """Within this block, this process sees the lab's cluster (CA, inventory, registry) as its own."""
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: cluster.env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_cluster(topo: labmod.LabTopology, encrypted: bool = True) -> LabCluster:
    """Start the datastore and one agent per host inside the lab; register them in the lab's cluster."""
    folder = labmod.lab_dir(topo.name)
    cluster = LabCluster(topology=topo, folder=folder, encrypted=encrypted)
    env = cluster.env
    with cluster_env(cluster):
        if encrypted:
            issue_lab_certificates(topo, folder / "cluster")
        save_config(ClusterConfig(encrypted=encrypted))
        ds = topo.datastore
        log = folder / "logs" / "datastore.log"
        proc = labmod.spawn_in_ns(ds.ns, datastore_argv(cluster), log, env)
        ref = DatastoreRef.make(DATASTORE, cluster.nbd_url)
        Registry().add(ref, replace=True)
        def answers() -> bool:
            with client_for(ref, timeout=1) as client:  # as the lab's admin user
                return client.reachable()

        _wait("datastore ds1", answers, proc, log)
        for h in topo.hosts:
            log = folder / "logs" / f"{h.name}.log"
            proc = labmod.spawn_in_ns(h.ns, agent_argv(cluster, h.name), log, env)
            client = _lab_client(cluster, h.name)
            _wait(f"agent {h.name}", lambda client=client: client.host() is not None, proc, log)
    return cluster


def datastore_argv(cluster: LabCluster) -> list[str]:
    """How the lab runs datastore ds1: TLS with its certificate from the lab's CA, or --insecure."""
    ds = cluster.topology.datastore
    argv = _kvmotion("datastore", "serve", DATASTORE, "--root", str(cluster.folder / DATASTORE),
                     "--listen", f"{ds.ip}:{NBD_PORT}")
    return argv if cluster.encrypted else [*argv, "--insecure"]


def agent_argv(cluster: LabCluster, host: str) -> list[str]:
    """How the lab runs `host`'s agent (also used to restart one)."""
    h = cluster.topology.host(host)
    argv = _kvmotion("host", "serve", "--name", h.name, "--listen", f"{h.mgmt_ip}:{AGENT_PORT}",
                     "--portgroup", f"{cluster.topology.portgroup}={h.vm_bridge}")
    return argv if cluster.encrypted else [*argv, "--insecure"]


def issue_lab_certificates(topo: labmod.LabTopology, cluster_folder: Path) -> None:
    """The lab's CA, a certificate per host (and its QEMUs), the datastore's, and user admin's."""
    ca_dir = cluster_folder / "ca"
    init_ca(ca_dir)
    for h in topo.hosts:
        issue_host_cert(ca_dir, h.name, [h.mgmt_ip], cluster_folder / "hosts" / h.name, qemu_key_gid=confine.qemu_gid())
    issue_datastore_cert(ca_dir, DATASTORE, [topo.datastore.ip], cluster_folder / "datastores" / DATASTORE)
    issue_user_cert(ca_dir, DEFAULT_USER, Role.ADMIN, cluster_folder / "users" / DEFAULT_USER)


def _lab_client(cluster: LabCluster, host: str) -> AgentClient:
    if not cluster.encrypted:
        return AgentClient(cluster.agent_url(host), timeout=2)
    return AgentClient(cluster.agent_url(host), ssl_context=cli_ssl_context(), timeout=2)


def load_cluster(name: str) -> LabCluster:
    topo = labmod.load_lab(name)
    folder = labmod.lab_dir(name)
    encrypted = (folder / "cluster" / "ca").exists()
    return LabCluster(topology=topo, folder=folder, encrypted=encrypted)
