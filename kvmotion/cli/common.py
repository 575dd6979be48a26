"""What every CLI command shares: reaching agents, printing tables or JSON, one-line errors."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from kvmotion.cluster.inventory import HostEntry, Inventory
from kvmotion.core.errors import NotFound, Unreachable
from kvmotion.host.client import AgentClient
from kvmotion.host.vms import VmState, VmStatus
from kvmotion.core.jsonio import as_json
from kvmotion.core.units import format_duration, format_size

console = Console()
err_console = Console(stderr=True)


def client_for(entry: HostEntry) -> AgentClient:
    if not entry.url.startswith("https"):
        return AgentClient(entry.url)
    from kvmotion.cluster.tls import cli_ssl_context

    return AgentClient(entry.url, ssl_context=cli_ssl_context())


def host_client(name: str | None) -> tuple[HostEntry, AgentClient]:
    """The named host's agent; with no name, the only host of the cluster."""
    inv = Inventory()
    if name:
        entry = inv.host(name)
    else:
        hosts = inv.hosts()
        if not hosts:
            raise NotFound("no host agent is known: start one with `kvmotion host serve` or add one with `kvmotion host add`")
        if len(hosts) > 1:
            raise NotFound(f"several hosts in the cluster ({', '.join(h.name for h in hosts)}): say which with --host")
        entry = hosts[0]
    return entry, client_for(entry)


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


def print_json(obj: object) -> None:
    json.dump(as_json(obj), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def vm_table(vms: list[VmStatus]) -> Table:
    table = Table("name", "state", "host", "memory", "CPUs", "uptime", "ready")
    now = time.time()
    for vm in vms:
        uptime = format_duration(now - vm.started_at) if vm.started_at and vm.pid else "-"
        table.add_row(vm.name, vm.state.value, vm.host, format_size(vm.memory), str(vm.vcpus), uptime, "yes" if vm.ready else "no")
    return table
