"""`kvmotion vm …`: define, start, stop, list VMs and attach to their consoles."""

from __future__ import annotations

import typer

from kvmotion.api.hosts import all_vms, locate_vm
from kvmotion.api.spec import NIC_SYNTAX, DiskSpec, NicSpec, VmSpec, Workload, WorkloadParams
from kvmotion.cli import centerops
from kvmotion.cli.common import console, err_console, print_json, vm_table
from kvmotion.cli.console import attach
from kvmotion.core.errors import InvalidInput
from kvmotion.core.units import parse_rate, parse_size

app = typer.Typer(no_args_is_help=True, help="Virtual machines.")


def _workloads(text: str) -> tuple[Workload, ...]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    try:
        return tuple(Workload({"memwriter": "mem", "diskwriter": "disk"}.get(w, w)) for w in names) or (Workload.IDLE,)
    except ValueError:
        raise InvalidInput(f"unknown workload in {text!r}: use idle, echo, mem, disk, cpu (comma-separated)") from None


@app.command()
def create(
    name: str,
    memory: str = typer.Option("512M", help="Guest RAM, e.g. 512M, 1G."),
    vcpus: int = typer.Option(1, help="Virtual CPUs."),
    cpu_model: str | None = typer.Option(None, help="QEMU CPU model (default: the cluster's baseline, else qemu64)."),
    disk: list[str] = typer.Option([], "--disk", help="FILE[:SIZE] (a file in the host's disk folder) or DATASTORE/DISK; repeat."),
    nic: list[str] = typer.Option([], "--nic", help=f"{NIC_SYNTAX}; repeat."),
    workload: str = typer.Option("idle", help="Comma-separated: idle, echo, mem, disk, cpu."),
    mem_wss: str = typer.Option("256M", help="Memory writer's working set."),
    mem_rate: str = typer.Option("100M", help="Memory writer's dirty rate in bytes/s (0 = flat out)."),
    mem_stride: int = typer.Option(1, help="Memory writer rewrites every Nth word of a page (power of two): "
                                   "more dirty pages per CPU second."),
    host: str | None = typer.Option(None, help="Host to define it on (default: the only host; through a center: "
                                    "the one placement chooses, unless DRS is manual)."),
    wait: bool = typer.Option(True, help="Through a center: follow the task until it ends."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Define a VM through the center (it does not start). The spec is checked here, by the center
    and again by the agent."""
    spec = VmSpec(
        name=name,
        memory=parse_size(memory),
        vcpus=vcpus,
        cpu_model=cpu_model or "qemu64",  # the center's placement checks hosts against the cluster's baseline
        disks=tuple(DiskSpec.parse(d) for d in disk),
        nics=tuple(NicSpec.parse(n) for n in nic),
        workloads=_workloads(workload),
        params=WorkloadParams(mem_wss=parse_size(mem_wss), mem_rate=parse_rate(mem_rate), mem_stride=mem_stride),
    )
    centerops.vm_create(spec, host, wait, json_out)


@app.command()
def start(
    name: str,
    wait: bool = typer.Option(True, help="Follow the task until it ends."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Start a VM on the host it is defined on (a task of the center)."""
    centerops.vm_power(name, True, wait, json_out)


@app.command()
def stop(
    name: str,
    wait: bool = typer.Option(True, help="Follow the task until it ends."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Stop a VM (a task of the center): vCPUs stop, disks are flushed, QEMU exits."""
    centerops.vm_power(name, False, wait, json_out)


@app.command()
def delete(name: str) -> None:
    """Delete a stopped VM's definition (its disks stay)."""
    _, client, _ = locate_vm(name)
    client.delete(name)
    console.print(f"VM {name} deleted")


@app.command("list")
def list_vms(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every copy of every VM as the hosts' agents report it: name, state, host, memory, CPUs, uptime
    (logged in to a center, the agents are the center's hosts; `vm ls` shows the center's view)."""
    vms, down = all_vms()
    if json_out:
        print_json(vms)
    else:
        console.print(vm_table(vms))
    for h in down:
        err_console.print(f"kvmotion: warning: host {h} did not answer; its VMs are not listed")


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every VM of the cluster as the center knows them (desired and observed)."""
    centerops.vm_ls(json_out)


@app.command()
def show(name: str, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One VM's state and spec."""
    _, _, status = locate_vm(name)
    if json_out:
        print_json(status)
    else:
        console.print(vm_table([status]))
        console.print(status.spec)


@app.command(name="console")
def console_cmd(name: str) -> None:
    """Attach to the guest's serial console (detach with Ctrl-])."""
    entry, _, _ = locate_vm(name)
    attach(entry, name)
