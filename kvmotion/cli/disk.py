"""`kvmotion disk create|rm|show`: disks on a cluster datastore, named DATASTORE/DISK."""

from __future__ import annotations

import json

import typer

from kvmotion.api.datastore import DatastoreClient, client_for
from kvmotion.api.disks import DiskInfo, check_disk_name
from kvmotion.api.registry import Registry
from kvmotion.api.spec import check_name
from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import format_size, parse_size

app = typer.Typer(no_args_is_help=True, help="Disks on shared datastores (DATASTORE/DISK, e.g. ds1/web1.img).")


def _split(path: str) -> tuple[str, str]:
    ds, sep, disk = path.partition("/")
    if not sep or not ds or not disk:
        raise InvalidInput(f"invalid disk {path!r}: use DATASTORE/DISK, e.g. ds1/web1.img")
    return check_name(ds, "datastore"), check_disk_name(disk)


def _client(ds: str) -> DatastoreClient:
    return client_for(Registry().get(ds))  # as the CLI's user


def _describe(ds: str, d: DiskInfo) -> str:
    lease = f"written by {d.lease.host} (vm {d.lease.vm}, generation {d.lease.generation})" if d.lease else "no writer"
    return f"{ds}/{d.name}: {format_size(d.size)}, {format_size(d.allocated)} allocated, {lease}"


@app.command()
def create(
    path: str = typer.Argument(..., help="DATASTORE/DISK, e.g. ds1/web1.img."),
    size: str = typer.Argument(..., help="Size, e.g. 4G (a multiple of 512 bytes)."),
    prealloc: bool = typer.Option(False, "--prealloc", help="Allocate all blocks now (fails now, not later, if full)."),
) -> None:
    """Create an empty raw disk on a datastore."""
    ds, disk = _split(path)
    nbytes = parse_size(size)
    with _client(ds) as client:
        info = client.create_disk(disk, nbytes, prealloc=prealloc)
    typer.echo(_describe(ds, info))


@app.command("rm")
def remove(path: str = typer.Argument(..., help="DATASTORE/DISK.")) -> None:
    """Delete a disk (refused while a VM holds its write lease)."""
    ds, disk = _split(path)
    with _client(ds) as client:
        client.delete_disk(disk)
    typer.echo(f"{ds}/{disk} deleted")


@app.command()
def show(
    path: str = typer.Argument(..., help="DATASTORE/DISK."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a disk's size, allocation and lease."""
    ds, disk = _split(path)
    with _client(ds) as client:
        info = client.disk(disk)
    typer.echo(json.dumps(info.to_dict(), indent=1) if as_json else _describe(ds, info))
