"""The cluster's host agents as a user reaches them: the inventory's URLs, the user's certificate."""

from __future__ import annotations

from kvmotion.api.agent import AgentClient, VmState, VmStatus
from kvmotion.api.inventory import HostEntry, Inventory
from kvmotion.api.tls import cli_ssl_context
from kvmotion.core.errors import NotFound, Unreachable


def client_for(entry: HostEntry) -> AgentClient:
    if not entry.url.startswith("https"):
        return AgentClient(entry.url)
    return AgentClient(entry.url, ssl_context=cli_ssl_context())


def all_vms() -> tuple[list[VmStatus], list[str]]:
    """Every VM of every reachable host, and the hosts that did not answer."""
    vms: list[VmStatus] = []
    down: list[str] = []
    for entry in Inventory().hosts():
        try:
            vms.extend(client_for(entry).vms())
        except Unreachable:
            down.append(entry.name)
    if down and not vms and len(down) == len(Inventory().hosts()):
        raise Unreachable(f"no host agent answered (tried {', '.join(down)}): are the agents running?")
    return vms, down


def locate_vm(name: str) -> tuple[HostEntry, AgentClient, VmStatus]:
    """The host that has VM `name` (running there, or defined there if it runs nowhere)."""
    found: list[tuple[HostEntry, AgentClient, VmStatus]] = []
    down: list[str] = []
    for entry in Inventory().hosts():
        client = client_for(entry)
        try:
            found.append((entry, client, client.vm(name)))
        except NotFound:
            continue
        except Unreachable:
            down.append(entry.name)
    if not found:
        if down:
            raise Unreachable(f"VM {name} is on none of the reachable hosts; not answering: {', '.join(down)}")
        raise NotFound(f"no VM named {name} in the cluster")
    # A running copy wins over a stopped definition, and the VM wins over a migration's shadow.
    found.sort(key=lambda f: (f[2].pid is None, f[2].state is VmState.INCOMING))
    return found[0]
