"""`kvmotion host …`: run a host agent, list and inspect hosts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvmotion.api.hosts import client_for
from kvmotion.api.inventory import HostEntry, Inventory
from kvmotion.api.spec import check_name
from kvmotion.cli.common import console, print_json
from kvmotion.core.errors import Unreachable
from kvmotion.core.units import format_size, parse_size

app = typer.Typer(no_args_is_help=True, help="Host agents: run one, list them, inspect one.")


@app.command()
def serve(
    name: str = typer.Option(..., "--name", help="This host's name in the cluster."),
    listen: str = typer.Option("127.0.0.1:7701", help="ADDRESS:PORT of the agent's API."),
    portgroup: list[str] = typer.Option([], "--portgroup", help="NAME[=BRIDGE]; repeat. Default: vm-net."),
    state_dir: Path | None = typer.Option(None, help="VM definitions (default /var/lib/kvmotion/hosts/NAME)."),
    run_dir: Path | None = typer.Option(None, help="Sockets and logs (default /run/kvmotion/hosts/NAME)."),
    accel: str | None = typer.Option(None, help="Force kvm or tcg (default: decided by CPU flags and a probe)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no authentication: anyone who reaches the port "
                                  "owns the host (trusted networks and benchmarks only)."),
    max_body: str = typer.Option("1M", "--max-body", help="Largest request body."),
    max_connections_per_client: int = typer.Option(32, "--max-connections-per-client", help="Open connections from one address."),
    migration_limit: int = typer.Option(4, "--migration-limit", help="Migrations in and out of this host at once."),
) -> None:
    """Run the host agent in the foreground (its VMs keep running if it stops).

    The API is served over mutual TLS with the host's certificate from the cluster CA
    (`kvmotion cluster cert NAME --ip ADDRESS`); callers are identified by their certificates.
    """
    from kvmotion.api.serving import Limits  # fastapi and uvicorn: loaded only to serve (CLI start-up time)
    from kvmotion.migration.agent import serve as run  # the whole agent: loaded only to serve (CLI start-up time)

    check_name(name, "host")
    limits = Limits(max_body=parse_size(max_body), max_connections_per_client=max_connections_per_client)
    run(name, listen, portgroup, state_dir, run_dir, accel, insecure=insecure, migration_limit=migration_limit,
        limits=limits)


@app.command("list")
def list_hosts(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every host of the cluster, with its resources."""
    rows = []
    for entry in Inventory().hosts():
        try:
            rows.append((entry, client_for(entry).host()))
        except Unreachable:
            rows.append((entry, None))
    if json_out:
        print_json([{"name": e.name, "url": e.url, "info": info} for e, info in rows])
        return
    table = Table("host", "url", "state", "accel", "CPUs", "memory free/total", "VMs", "port groups")
    for entry, info in rows:
        if info is None:
            table.add_row(entry.name, entry.url, "unreachable", "-", "-", "-", "-", "-")
        else:
            table.add_row(
                entry.name, entry.url, "up", info.accel, str(info.cpus),
                f"{format_size(info.memory_available)} / {format_size(info.memory_total)}",
                str(info.vms), ", ".join(sorted(info.portgroups)),
            )
    console.print(table)


@app.command()
def info(name: str, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One host's resources."""
    data = client_for(Inventory().host(name)).host()
    if json_out:
        print_json(data)
    else:
        for key, value in data.__dict__.items():
            console.print(f"[bold]{key}[/]: {value}")


@app.command()
def add(name: str, url: str) -> None:
    """Add a remote host's agent to the cluster inventory."""
    check_name(name, "host")
    Inventory().add(HostEntry(name=name, url=url))


@app.command()
def remove(name: str) -> None:
    """Remove a host from the cluster inventory (its VMs are not touched)."""
    Inventory().remove(name)
