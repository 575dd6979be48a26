"""`kvmotion datastore serve|add|rm|ls`: shared disks on an NBD server, write leases per disk.

A datastore serves NBD over TLS and its control API over HTTPS with the certificate
`kvmotion cluster` issued it (<cluster>/datastores/NAME); clients present certificates of the
same CA. `--insecure` serves both in plain text (trusted networks and benchmarks only)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kvmotion.api.address import parse_listen
from kvmotion.api.datastore import client_for
from kvmotion.api.disks import DiskInfo
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.api.spec import check_name
from kvmotion.api.tls import datastore_dir
from kvmotion.cli import centerops
from kvmotion.core.errors import Conflict, InvalidInput, SetupError, Unreachable
from kvmotion.core.units import format_size, parse_duration, parse_size

app = typer.Typer(no_args_is_help=True, help="Shared datastores: disks on an NBD server with fenced write leases.")


@app.command()
def serve(
    name: str = typer.Argument(..., help="Datastore name, e.g. ds1."),
    root: Path = typer.Option(..., "--root", help="Directory holding the disk files (created if missing)."),
    listen: str = typer.Option("0.0.0.0:10809", "--listen", help="NBD address HOST:PORT."),
    control: str = typer.Option(None, "--control", help="Control API HOST:PORT (default: NBD port + 1)."),
    lease_ttl: str = typer.Option("15s", "--lease-ttl", help="A lease expires this long after its last renewal."),
    cert_dir: Path = typer.Option(None, "--cert-dir", help="The datastore's certificate folder (server-cert.pem, "
                                  "server-key.pem, ca-cert.pem); default: the cluster's datastores/NAME."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain NBD and HTTP, no authentication: anyone who "
                                  "reaches the ports reads every disk (trusted networks and benchmarks only)."),
    max_body: str = typer.Option("1M", "--max-body", help="Largest control API request body."),
    max_connections_per_client: int = typer.Option(32, "--max-connections-per-client",
                                                   help="Open control API connections from one address."),
) -> None:
    """Serve a datastore: nbdkit for the disks (NBD over TLS) and the control API (HTTPS), until stopped."""
    from kvmotion.api.serving import Limits  # fastapi and uvicorn: loaded only to serve (CLI start-up time)
    from kvmotion.storage.server import ServeConfig, run  # fastapi and uvicorn: loaded only to serve (CLI start-up time)

    name = check_name(name, "datastore")
    if insecure and cert_dir is not None:
        raise InvalidInput("--cert-dir and --insecure exclude each other: certificates are for TLS")
    nbd = parse_listen(listen)
    certs = None if insecure else (cert_dir or datastore_dir(name)).resolve()
    missing = [f.name for f in (certs / "server-cert.pem", certs / "server-key.pem", certs / "ca-cert.pem")
               if not f.exists()] if certs is not None else []
    if missing:
        raise SetupError(f"{certs} lacks {', '.join(missing)}: issue the datastore's certificate with "
                         f"`kvmotion cluster cert {name} --datastore --ip ADDRESS` (or serve with --insecure on a "
                         "trusted network)")
    cfg = ServeConfig(
        name=name,
        root=root.resolve(),
        listen=nbd,
        control=parse_listen(control) if control else nbd.next_port(),
        lease_ttl=parse_duration(lease_ttl),
        cert_dir=certs,
        limits=Limits(max_body=parse_size(max_body), max_connections_per_client=max_connections_per_client),
    )
    run(cfg)


@app.command()
def add(
    name: str = typer.Argument(..., help="Datastore name, e.g. ds1."),
    nbd_url: str = typer.Argument(..., help="nbds://HOST[:PORT] as VMs' QEMU reaches it (nbd:// for an --insecure one)."),
    control: str = typer.Option(None, "--control", help="Control API URL (default: https://HOST:PORT+1)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an existing entry of that name."),
    force: bool = typer.Option(False, "--force", help="Record it even if it does not answer now."),
) -> None:
    """Record a datastore in the cluster inventory (checks that it answers, over TLS for nbds://, with that name).
    Logged in to a center (`kvmotion login`): once for the whole cluster, at the center."""
    ref = DatastoreRef.make(name, nbd_url, control)
    if centerops.logged_in():
        centerops.datastore_add(ref.name, ref.nbd_url, ref.control_url)
        return
    if not force:
        with client_for(ref, timeout=5) as client:
            try:
                served = client.info().name
            except Unreachable as exc:
                raise Unreachable(f"{exc} (or use --force to record it anyway)") from None
        if served != name:
            raise Conflict(f"the datastore at {ref.control_url} calls itself {served!r}, not {name!r}: "
                           "check the address (or use --force)")
    Registry().add(ref, replace=replace)
    typer.echo(f"datastore {name}: {ref.nbd_url} (control {ref.control_url})")


@app.command("rm")
def remove(name: str = typer.Argument(..., help="Datastore to forget (its disks are untouched).")) -> None:
    """Remove a datastore from the cluster inventory (logged in to a center: at the center)."""
    if centerops.logged_in():
        centerops.datastore_rm(check_name(name, "datastore"))
        return
    Registry().remove(name)
    typer.echo(f"datastore {name} removed from the cluster inventory")


def _lease_cell(d: DiskInfo, now: float) -> tuple[str, str, str]:
    if d.lease is None:
        return "-", "-", "-"
    return d.lease.host, d.lease.vm, f"{max(0.0, d.lease.expires_at - now):.0f}s"


@app.command("ls")
def ls(
    name: str = typer.Argument(None, help="Datastore whose disks to list (default: list datastores)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List a datastore's disks with their lease holder and generation, or all datastores."""
    registry = Registry()
    if name is None:
        rows = []
        for ref in registry.all():
            with client_for(ref, timeout=3) as client:
                rows.append((ref, client.reachable()))
        if as_json:
            typer.echo(json.dumps([{"name": r.name, "nbd_url": r.nbd_url, "control_url": r.control_url,
                                    "reachable": ok} for r, ok in rows], indent=1))  # fmt: skip
            return
        table = Table("datastore", "NBD", "control", "state")
        for ref, ok in rows:
            table.add_row(ref.name, ref.nbd_url, ref.control_url, "up" if ok else "[red]unreachable[/]")
        Console().print(table)
        return
    ref = registry.get(name)
    with client_for(ref) as client:
        info = client.info()
        disks = client.list_disks()
    if as_json:
        typer.echo(json.dumps({"datastore": name, "nbd_url": ref.nbd_url, "lease_ttl": info.lease_ttl,
                               "disks": [d.to_dict() for d in disks]}, indent=1))  # fmt: skip
        return
    now = info.now
    table = Table("disk", "size", "allocated", "writer", "vm", "generation", "expires in",
                  title=f"{name} ({ref.nbd_url}, lease TTL {info.lease_ttl:g}s)")  # fmt: skip
    for d in disks:
        host, vm, left = _lease_cell(d, now)
        table.add_row(d.name, format_size(d.size), format_size(d.allocated), host, vm, str(d.generation), left)
    Console().print(table)

