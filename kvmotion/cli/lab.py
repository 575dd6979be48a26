"""`kvmotion lab up|down|show`: a small data centre of network namespaces on this machine."""

from __future__ import annotations

import typer

from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import parse_rate
from kvmotion.lab.cluster import start_cluster
from kvmotion.net import lab as labmod

app = typer.Typer(no_args_is_help=True, help="Build and remove labs: hosts, a switch, a datastore and a client.")


def _link_rate(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "", "0") else parse_rate(text)


def _host_cpu(text: str | None) -> float | None:
    """--host-cpu: a number of cores, or none (unlimited)."""
    if text is None or text.strip().lower() in ("none", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"invalid --host-cpu {text!r}: use a number of cores, e.g. 1 or 0.5, or none") from None


def _describe(topo: labmod.LabTopology) -> str:
    rate = f"{topo.link_rate * 8 / 1e9:g} Gbit/s (tbf)" if topo.link_rate else "unshaped"
    cpu = f"{topo.host_cpu:g} cores each (cpu cgroup)" if topo.host_cpu is not None else "unlimited (the machine's)"
    health = labmod.lab_health(topo)
    state = "up" if health.ok else f"DAMAGED (missing: {', '.join(health.missing_namespaces) or topo.root_if})"
    lines = [
        f"lab {topo.name}: {state}",
        f"  mgmt {topo.mgmt_subnet} ({rate}), VM subnet {topo.vm_subnet}, port group {topo.portgroup}",
        f"  host CPU capacity {cpu}",
        f"  root namespace    {topo.root_ip:<15} via {topo.root_if}",
    ]
    for h in topo.hosts:
        lines.append(f"  {h.name:<17} {h.mgmt_ip:<15} ns {h.ns}, bridge {h.vm_bridge}")
    lines.append(f"  {'datastore':<17} {topo.datastore.ip:<15} ns {topo.datastore.ns}")
    lines.append(f"  {'center':<17} {topo.center.ip:<15} ns {topo.center.ns}")
    lines.append(f"  {'client':<17} {topo.client.ip:<15} ns {topo.client.ns}")
    return "\n".join(lines)


@app.command()
def up(
    name: str = typer.Option("lab", "--name", help="Lab name: 1-10 lowercase letters and digits."),
    hosts: int = typer.Option(3, "--hosts", help="Number of hypervisor hosts (host-a, host-b, ...)."),
    link: str = typer.Option("none", "--link", help="Shape mgmt/vMotion uplinks: 1gbit, 10gbit, any rate, or none."),
    agents: bool = typer.Option(True, help="Start the center, datastore ds1 and a joined host agent per host."),
    plain: bool = typer.Option(False, help="Center, agents, datastore and migration streams in plain text (--insecure)."),
    host_cpu: str = typer.Option("none", "--host-cpu",
                                 help="CPU capacity of each host in cores (e.g. 1 or 0.5): a cgroup limit on everything "
                                      "the host runs; none = the machine's."),
) -> None:
    """Build a lab (refuses if one of that name is up)."""
    topo = labmod.lab_up(name, hosts, _link_rate(link), _host_cpu(host_cpu))
    typer.echo(_describe(topo))
    if agents:
        try:
            cluster = start_cluster(topo, encrypted=not plain)
        except BaseException:
            labmod.lab_down(name)
            raise
        typer.echo(f"  center at {cluster.center_url}; {len(topo.hosts)} hosts joined by token, agents up "
                   f"({'mutual TLS' if cluster.encrypted else 'plain HTTP'}); datastore ds1 at {cluster.nbd_url}")
        typer.echo(f"  each machine's files under {cluster.folder / 'machines'}, seen by no other machine")
        typer.echo(f"To use it (the lab's admin, logged in):  export KVMOTION_CONFIG={cluster.admin_config}")


@app.command()
def down(name: str = typer.Option("lab", "--name", help="Lab to remove.")) -> None:
    """Remove a lab: kill its processes, delete its namespaces, links and state."""
    report = labmod.lab_down(name)
    if not report.namespaces_removed:
        typer.echo(f"lab {name} was not up; nothing left behind")
        return
    typer.echo(
        f"lab {name} removed: {len(report.namespaces_removed)} namespaces, {len(report.killed_pids)} processes killed"
    )


@app.command()
def show(name: str = typer.Option(None, "--name", help="Show only this lab.")) -> None:
    """Show the labs that are up, their hosts and addresses."""
    labs = [labmod.load_lab(name)] if name else labmod.list_labs()
    if not labs:
        typer.echo("no lab is up (start one with `kvmotion lab up`)")
        return
    typer.echo("\n".join(_describe(t) for t in labs))
