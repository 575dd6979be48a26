"""CLI commands through the center, with the login config `kvmotion login` wrote: VMs, migrations,
tasks, events, hosts and datastores as the center knows them."""

from __future__ import annotations

import datetime as dt
import time

import typer
from rich.table import Table

from kvmotion.api import userconfig
from kvmotion.api.center import (
    CenterClient,
    DatastoreSpec,
    Event,
    MigrateRequest,
    Placement,
    TaskState,
    TaskView,
    VmCreate,
)
from kvmotion.api.hosts import client_for
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import record_from_json
from kvmotion.api.spec import VmSpec
from kvmotion.api.userconfig import load_credentials
from kvmotion.cli.common import console, print_json
from kvmotion.core.errors import InsufficientResources, InvalidInput, KvmotionError, MigrationError
from kvmotion.core.units import format_size

FOLLOW_POLL = 0.5  # seconds between looks at a followed task


def logged_in() -> bool:
    """A login config exists: commands go through the center."""
    return userconfig.logged_in()


def client() -> CenterClient:
    return load_credentials().client()


def when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else "-"


def _placement(p: Placement) -> None:
    for c in p.candidates:
        if c.host == p.chosen:
            console.print(f"  [green]{c.host}[/]: chosen (score {c.score:.3f})")
        elif c.eligible:
            console.print(f"  {c.host}: eligible (score {c.score:.3f})")
        else:
            console.print(f"  {c.host}: " + "; ".join(c.reasons))


def follow(center: CenterClient, task: TaskView, json_out: bool = False) -> TaskView:
    """Poll the task until it ends, printing each change of its progress; KvmotionError unless done."""
    shown = ""
    while not task.state.terminal:
        line = f"{task.kind.value} {task.target} [{task.state.value}] {task.progress.message or task.progress.phase}"
        if task.progress.fraction:
            line += f" {task.progress.fraction * 100:.0f} %"
        if line != shown and not json_out:
            console.print(line, highlight=False)
            shown = line
        time.sleep(FOLLOW_POLL)
        task = center.task(task.id)
    if json_out:
        print(task.model_dump_json(indent=2))
    if task.state is not TaskState.DONE:
        err = MigrationError if task.kind.value == "migrate" else KvmotionError
        raise err(f"task {task.id} ({task.kind.value} {task.target}) {task.state.value}: {task.error or 'no reason given'}")
    if not json_out:
        r = task.result
        extra = ""
        if r is not None and r.total_ms is not None:
            down = r.pause_ms if r.pause_ms is not None else r.downtime_ms  # the guest's, else QEMU's part
            extra = f" in {r.total_ms / 1000:.1f} s" + (f", downtime {down:.0f} ms" if down is not None else "")
        console.print(f"task {task.id} done: {task.kind.value} {task.target}"
                      + (f" on {r.host}" if r and r.host else "") + extra, highlight=False)
    return task


# ---- VMs ----
def vm_ls(json_out: bool) -> None:
    with client() as center:
        vms = center.vms()
    if json_out:
        print("[" + ",".join(v.model_dump_json() for v in vms) + "]")
        return
    t = Table("name", "state", "host", "desired host", "power", "memory", "CPUs")
    for v in vms:
        t.add_row(v.name, v.observed_state.value, v.observed_host or "-", v.desired_host or "-",
                  v.desired_power.value if v.desired_power else "-",
                  format_size(v.spec.memory) if v.spec else "-", str(v.spec.vcpus) if v.spec else "-")
    console.print(t)


def vm_create(spec: VmSpec, host: str | None, wait: bool, json_out: bool) -> None:
    with client() as center:
        created = center.create_vm(VmCreate(spec=spec, host=host))
        if created.placement is not None and not json_out:
            console.print(f"VM {spec.name}: placed on {created.placement.chosen}")
            _placement(created.placement)
        if wait:
            follow(center, created.task, json_out)
        elif json_out:
            print(created.model_dump_json(indent=2))
        else:
            console.print(created.task.id)


def vm_power(name: str, on: bool, wait: bool, json_out: bool) -> None:
    with client() as center:
        task = center.start_vm(name) if on else center.stop_vm(name)
        if wait:
            follow(center, task, json_out)
        elif json_out:
            print(task.model_dump_json(indent=2))
        else:
            console.print(task.id)


# ---- migrations ----
def migrate(vm: str, to: str | None, max_downtime_ms: int, bandwidth: int, policy: str, wait: bool,
            json_out: bool) -> None:
    with client() as center:
        try:
            started = center.migrate(MigrateRequest(vm=vm, destination=to, max_downtime_ms=max_downtime_ms,
                                                    bandwidth=bandwidth, policy=policy))
        except (InvalidInput, InsufficientResources) as exc:  # refused by the center: said as an agent says it
            raise type(exc)(f"migration of {vm}{f' to {to}' if to else ''} refused: {exc}") from None
        task = started.task
        if not json_out:
            console.print(f"migrating {vm}: {task.source} -> {task.destination} (task {task.id})", highlight=False)
            if started.placement is not None:
                _placement(started.placement)
        if wait and json_out:
            _print_outcome(center, task)
        elif wait:
            follow(center, task, json_out)
        elif json_out:
            print(started.model_dump_json(indent=2))


def _print_outcome(center: CenterClient, task: TaskView) -> None:
    """`migrate --json`: the source agent's migration record once the task ends (the shape
    `migrate --json` prints without a center), or the task when no migration was started."""
    while not task.state.terminal:
        time.sleep(FOLLOW_POLL)
        task = center.task(task.id)
    record = None
    if task.result is not None and task.result.migration and task.source:
        try:
            agent = client_for(Inventory().host(task.source))
            record = record_from_json(agent.request("GET", f"/v1/migrations/{task.result.migration}"))  # type: ignore[arg-type]
        except KvmotionError:
            record = None  # the source's agent is gone: the task says what the center knows
    if record is not None:
        print_json(record)
    else:
        print(task.model_dump_json(indent=2))
    if task.state is not TaskState.DONE:
        raise MigrationError(f"task {task.id} (migrate {task.target}) {task.state.value}: {task.error or 'no reason given'}")


# ---- tasks ----
task_app = typer.Typer(no_args_is_help=True, help="Tasks at the center: create, start, stop, migrate.")


def _task_table(tasks: list[TaskView]) -> Table:
    t = Table("id", "kind", "target", "state", "progress", "created", "ended", "by", "error")
    for x in tasks:
        move = f"{x.source}->{x.destination} " if x.source else ""
        t.add_row(x.id, x.kind.value, x.target, x.state.value,
                  move + (x.progress.message or x.progress.phase), when(x.created), when(x.ended),
                  x.requested_by, (x.error or "")[:60])
    return t


@task_app.command("ls")
def task_ls(state: TaskState | None = typer.Option(None, "--state", help="Only tasks in this state."),
            limit: int = typer.Option(100, "--limit", min=1, max=1000, help="At most this many, newest first."),
            json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Tasks, newest first."""
    with client() as center:
        tasks = center.tasks(state, limit)
    if json_out:
        print("[" + ",".join(t.model_dump_json() for t in tasks) + "]")
    else:
        console.print(_task_table(tasks))


@task_app.command("show")
def task_show(task_id: str, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One task."""
    with client() as center:
        task = center.task(task_id)
    if json_out:
        print(task.model_dump_json(indent=2))
    else:
        console.print(_task_table([task]))


@task_app.command("cancel")
def task_cancel(task_id: str) -> None:
    """Cancel a task: a queued one at once, a running migration as its source agent rolls it back."""
    with client() as center:
        task = center.cancel_task(task_id)
    console.print(f"task {task.id}: {'cancelled' if task.state is TaskState.CANCELLED else 'cancel requested'}")


# ---- events, hosts, datastores ----
def _event_line(e: Event) -> str:
    return f"{when(e.at)} {e.id:>6} {e.kind.value:<22} {e.object:<24} {e.message} ({e.who})"


def events(follow_: bool, since: int, json_out: bool) -> None:
    with client() as center:
        if follow_:
            for e in center.follow_events(since):
                print(e.model_dump_json() if json_out else _event_line(e), flush=True)
            return
        page = center.events(since, 1000)
    for e in page.events:
        print(e.model_dump_json() if json_out else _event_line(e))


def host_ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Hosts as the center sees them: state, load, VMs (needs `kvmotion login`)."""
    with client() as center:
        hosts = center.hosts()
    if json_out:
        print("[" + ",".join(h.model_dump_json() for h in hosts) + "]")
        return
    t = Table("name", "state", "address", "CPU demand", "memory used", "VMs", "migrations", "last heartbeat")
    for h in hosts:
        mem = "-"
        if h.load is not None:
            used = h.load.memory_total - h.load.memory_available
            mem = f"{format_size(used)} / {format_size(h.load.memory_total)}"
        capacity = h.load.cpu_capacity if h.load and h.load.cpu_capacity is not None else h.load.cpus if h.load else 0
        cpu = f"{h.cpu_demand:.2f} / {capacity:g}" if h.cpu_demand is not None and h.load else "-"
        t.add_row(h.name, h.state.value, h.address, cpu, mem, str(h.vms), str(len(h.migrations)),
                  when(h.last_heartbeat))
    console.print(t)


def datastore_add(name: str, nbd_url: str, control_url: str) -> None:
    with client() as center:
        added = center.add_datastore(DatastoreSpec(name=name, nbd_url=nbd_url, control_url=control_url))
    print(f"datastore {added.name}: {added.nbd_url} (control {added.control_url}), for the whole cluster")


def datastore_rm(name: str) -> None:
    with client() as center:
        center.remove_datastore(name)
    print(f"datastore {name} removed from the cluster (its disks are untouched)")
