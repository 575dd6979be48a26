"""`kvmotion datastore join|serve|add|rm|ls`: shared disks on an NBD server, write leases per disk.

A datastore joins the center with a token (`datastore join`: its key made on its machine, its CSR
signed by the center's CA) and serves NBD over TLS and its control API over HTTPS with that
certificate; clients present certificates of the same CA. `--insecure` serves both in plain text
(trusted networks and benchmarks only)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kvmotion.api.address import NBD_PORT, parse_listen
from kvmotion.api.datastore import client_for
from kvmotion.api.disks import DiskInfo
from kvmotion.api.registry import DatastoreRef, Registry
from kvmotion.api.spec import check_name
from kvmotion.cli import centerops
from kvmotion.core.errors import InvalidInput, SetupError
from kvmotion.core.units import format_size, parse_duration, parse_size

app = typer.Typer(no_args_is_help=True, help="Shared datastores: disks on an NBD server with fenced write leases.")


@app.command()
def join(
    url: str = typer.Argument(..., help="The center, e.g. https://10.0.0.5:7700."),
    token: str = typer.Option(..., "--token", help="A join token (`kvmotion center token create`, or the center's first start)."),
    name: str = typer.Option(..., "--name", help="The datastore's name in the cluster, e.g. ds1."),
    address: list[str] = typer.Option(..., "--address", help="Its address: where hosts reach it (its certificate names "
                                      "it); repeat for more networks, the first is the one the center records."),
    port: int = typer.Option(NBD_PORT, "--port", help="Its NBD port (the control API listens on the next one)."),
    state_dir: Path | None = typer.Option(None, help="The datastore's state root (default $KVMOTION_DATASTORE_STATE "
                                          "or /var/lib/kvmotion/datastore)."),
    force: bool = typer.Option(False, "--force", help="Join again over an already joined state root (its disks stay)."),
) -> None:
    """Join the cluster of a center: the datastore's key is made here, the center signs it and
    records the datastore; then `kvmotion datastore serve` needs no flags."""
    from kvmotion.storage.join import DatastoreRoot, default_root
    from kvmotion.storage.join import join as run

    root = DatastoreRoot(state_dir or default_root())
    answer = run(url, token, name, address[0], root, nbd_port=port, more_addresses=tuple(address[1:]), force=force)
    typer.echo(f"joined {url} as datastore {answer.datastore.name} ({answer.datastore.nbd_url}, control "
               f"{answer.datastore.control_url}); state in {root.path}; start it with `kvmotion datastore serve`")


@app.command()
def serve(
    name: str | None = typer.Argument(None, help="Datastore name: only for an --insecure datastore that never joined "
                                      "(a joined one knows its own)."),
    root: Path | None = typer.Option(None, "--root", help="Directory holding the disk files (created if missing; "
                                     "default: the state root's disks/)."),
    listen: str | None = typer.Option(None, "--listen", help="NBD address HOST:PORT (default: the joined address "
                                      "and port, or 0.0.0.0:10809)."),
    control: str = typer.Option(None, "--control", help="Control API HOST:PORT (default: NBD port + 1)."),
    lease_ttl: str = typer.Option("15s", "--lease-ttl", help="A lease expires this long after its last renewal."),
    state_dir: Path | None = typer.Option(None, help="The datastore's state root from `kvmotion datastore join` "
                                          "(default $KVMOTION_DATASTORE_STATE or /var/lib/kvmotion/datastore)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain NBD and HTTP, no authentication: anyone who "
                                  "reaches the ports reads every disk (trusted networks and benchmarks only)."),
    max_body: str = typer.Option("1M", "--max-body", help="Largest control API request body."),
    max_connections_per_client: int = typer.Option(32, "--max-connections-per-client",
                                                   help="Open control API connections from one address."),
) -> None:
    """Serve a datastore: nbdkit for the disks (NBD over TLS) and the control API (HTTPS), until
    stopped, with the certificate of its join (`kvmotion datastore join`)."""
    from kvmotion.api.serving import Limits  # fastapi and uvicorn: loaded only to serve (CLI start-up time)
    from kvmotion.storage.join import DatastoreRoot, default_root
    from kvmotion.storage.server import ServeConfig, run  # fastapi and uvicorn: loaded only to serve (CLI start-up time)

    state = DatastoreRoot(state_dir or default_root())
    if state.is_joined():
        joined_as = state.config()
        if name is not None and name != joined_as.name:
            raise InvalidInput(f"{state.path} is joined as datastore {joined_as.name}, not {name}: drop the name")
        if insecure and not joined_as.center.startswith("http:"):
            raise InvalidInput(f"datastore {joined_as.name} is joined to {joined_as.center}: it serves with its "
                               "certificate, not --insecure (only a datastore of an --insecure center may)")
        name, nbd, disks = joined_as.name, parse_listen(listen) if listen else joined_as.listen, root or state.disks
    elif not insecure:
        raise SetupError(f"{state.path} holds no joined datastore (no config.json): join the center with "
                         "`kvmotion datastore join`, or give --state-dir (or serve with --insecure on a trusted network)")
    elif name is None or root is None:
        raise InvalidInput("an --insecure datastore that never joined needs its NAME and --root")
    else:
        nbd, disks = parse_listen(listen or "0.0.0.0:10809"), root
    cfg = ServeConfig(
        name=check_name(name, "datastore"),
        root=disks.resolve(),
        listen=nbd,
        control=parse_listen(control) if control else nbd.next_port(),
        lease_ttl=parse_duration(lease_ttl),
        cert_dir=None if insecure else state.tls_dir.resolve(),
        limits=Limits(max_body=parse_size(max_body), max_connections_per_client=max_connections_per_client),
    )
    run(cfg)


@app.command()
def add(
    name: str = typer.Argument(..., help="Datastore name, e.g. ds1."),
    nbd_url: str = typer.Argument(..., help="nbds://HOST[:PORT] as VMs' QEMU reaches it (nbd:// for an --insecure one)."),
    control: str = typer.Option(None, "--control", help="Control API URL (default: https://HOST:PORT+1)."),
) -> None:
    """Record a datastore at the center (as an admin logged in with `kvmotion login`), e.g. one served
    --insecure; a datastore that joins (`kvmotion datastore join`) is recorded by its join."""
    ref = DatastoreRef.make(name, nbd_url, control)
    centerops.datastore_add(ref.name, ref.nbd_url, ref.control_url)


@app.command("rm")
def remove(name: str = typer.Argument(..., help="Datastore to forget (its disks are untouched).")) -> None:
    """Remove a datastore from the cluster (at the center, as a logged-in admin)."""
    centerops.datastore_rm(check_name(name, "datastore"))


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

