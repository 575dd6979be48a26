"""`kvmotion host …`: run a host agent, list and inspect hosts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvmotion.api.hosts import client_for
from kvmotion.api.inventory import Inventory
from kvmotion.cli.common import console, print_json
from kvmotion.core.errors import InvalidInput, SetupError, Unreachable
from kvmotion.core.units import format_size, parse_size

app = typer.Typer(no_args_is_help=True, help="Host agents: run one, list them, inspect one.")


@app.command()
def serve(
    listen: str | None = typer.Option(None, help="ADDRESS:PORT of the agent's API (default: the joined address:7701)."),
    portgroup: list[str] = typer.Option([], "--portgroup", help="NAME[=BRIDGE]; repeat. Default: vm-net."),
    state_dir: Path | None = typer.Option(None, help="The host's joined state root (default $KVMOTION_HOST_STATE or "
                                          "/var/lib/kvmotion/host)."),
    run_dir: Path | None = typer.Option(None, help="Sockets and logs (default /run/kvmotion/hosts/NAME)."),
    accel: str | None = typer.Option(None, help="Force kvm or tcg (default: decided by CPU flags and a probe)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no authentication: anyone who reaches the port "
                                  "owns the host (only a host of an --insecure center; trusted networks and benchmarks)."),
    max_body: str = typer.Option("1M", "--max-body", help="Largest request body."),
    max_connections_per_client: int = typer.Option(32, "--max-connections-per-client", help="Open connections from one address."),
    migration_limit: int = typer.Option(4, "--migration-limit", help="Migrations in and out of this host at once."),
) -> None:
    """Run the host agent in the foreground (its VMs keep running if it stops). The host joins the
    center first (`kvmotion host join`); the agent then serves mutual TLS with the certificate of
    the join, identifies callers by their certificates and reports to the center every 2 s."""
    from kvmotion.api.joined import StateRoot, default_root
    from kvmotion.api.serving import Limits  # fastapi and uvicorn: loaded only to serve (CLI start-up time)
    from kvmotion.migration.agent import serve_joined  # the whole agent: loaded only to serve (CLI start-up time)

    limits = Limits(max_body=parse_size(max_body), max_connections_per_client=max_connections_per_client)
    root = StateRoot(state_dir or default_root())
    if not root.is_joined():
        raise SetupError(f"{root.path} holds no joined host (no config.json): join the center with `kvmotion host "
                         "join`, or give --state-dir")
    joined_as = root.config()
    if insecure and not joined_as.center.startswith("http:"):
        raise InvalidInput(f"host {joined_as.name} is joined to {joined_as.center}: it serves with its certificate, "
                           "not --insecure (only a host of an --insecure center may)")
    serve_joined(root, listen, portgroup, run_dir, accel, migration_limit=migration_limit, limits=limits,
                 insecure=insecure)


@app.command()
def join(
    url: str = typer.Argument(..., help="The center, e.g. https://10.0.0.5:7700."),
    token: str = typer.Option(..., "--token", help="A join token (`kvmotion center token create`, or the center's first start)."),
    name: str = typer.Option(..., "--name", help="This host's name in the cluster."),
    address: str = typer.Option(..., "--address", help="This host's address: where peers and the center reach its agent."),
    port: int = typer.Option(7701, "--port", help="The agent's port."),
    state_dir: Path | None = typer.Option(None, help="The host's state root (default $KVMOTION_HOST_STATE or "
                                          "/var/lib/kvmotion/host)."),
    force: bool = typer.Option(False, "--force", help="Join again over an already joined state root (its VMs stay)."),
) -> None:
    """Join the cluster of a center: this host's keys are made here, the center signs them, and the
    host's state root is written (then `kvmotion host serve` needs no flags)."""
    from kvmotion.api.joined import StateRoot, default_root
    from kvmotion.host.join import join as run
    from kvmotion.qemu.confine import qemu_gid

    root = StateRoot(state_dir or default_root())
    done = run(url, token, name, address, root, agent_port=port, force=force, qemu_key_gid=qemu_gid())
    typer.echo(f"joined {done.config.center} as host {done.config.name} ({done.answer.host.agent_url}); state in "
               f"{root.path}; start the agent with `kvmotion host serve`")


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
