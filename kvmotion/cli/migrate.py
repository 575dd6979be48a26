"""`kvmotion migrate VM --to HOST`: live migration with a progress view; --check, --cancel; `migrate history`."""

from __future__ import annotations

import time

import typer
from rich.live import Live
from rich.table import Table

from kvmotion.api.hosts import client_for, locate_vm
from kvmotion.api.inventory import Inventory
from kvmotion.api.migration import (
    Check,
    Level,
    MigrationOptions,
    MigrationRecord,
    MigrationRequest,
    OptionsBody,
    Phase,
    record_from_json,
)
from kvmotion.cli import centerops
from kvmotion.cli.common import console, print_json
from kvmotion.core.errors import InvalidInput, MigrationError, Unreachable
from kvmotion.core.units import format_size, parse_duration, parse_rate

_LEVEL_STYLE = {Level.PASS: "green", Level.WARNING: "yellow", Level.ERROR: "red"}


def _progress_table(rec: MigrationRecord) -> Table:
    p = rec.progress
    t = Table(title=f"{rec.vm}: {rec.source} → {rec.destination}  [{rec.phase.value}]", show_header=True)
    for col in ("round", "sent", "remaining", "rate", "dirty rate", "predicted pause", "limit", "throttle", "elapsed"):
        t.add_column(col, justify="right")
    t.add_row(
        str(p.round), format_size(p.transferred), format_size(p.remaining), f"{p.link_rate * 8 / 1e6:.0f} Mbit/s",
        f"{p.dirty_rate / 1e6:.1f} MB/s", f"{p.predicted_downtime_ms:.0f} ms", f"{p.downtime_limit_ms} ms",
        f"{p.throttle * 100:.0f} %", f"{p.elapsed:.1f} s",
    )
    return t


def _summary(rec: MigrationRecord) -> None:
    if rec.phase is not Phase.DONE or rec.summary is None:
        console.print(f"[red]migration {rec.id} {rec.phase.value}[/]: {rec.error}")
        return
    s = rec.summary
    t = Table(title=f"migrated {rec.vm}: {rec.source} → {rec.destination}", show_header=False)
    rows = [
        ("total time", f"{s.total_ms:.0f} ms"),
        ("downtime (QEMU)", f"{s.downtime_ms:.0f} ms" if s.downtime_ms is not None else "-"),
        ("pause (source stop → destination resume)", f"{s.pause_ms:.1f} ms" if s.pause_ms is not None else "-"),
        ("rounds", str(s.rounds)),
        ("bytes sent", format_size(s.bytes)),
        ("zero pages", str(s.zero_pages)),
        ("mean link rate", f"{s.mean_link_rate * 8 / 1e6:.0f} Mbit/s"),
        ("peak dirty rate", f"{s.peak_dirty_rate / 1e6:.1f} MB/s"),
        ("max throttle", f"{s.throttle_max * 100:.0f} %"),
        ("encrypted", "yes (TLS, cluster CA)" if s.encrypted else "no (plain)"),
        ("converged", "yes" if s.converged else "no (post-copy)"),
        ("checks", ", ".join(f"{c.name}:{c.level.value}" for c in rec.checks if c.level is not Level.PASS) or "all passed"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _print_checks(checks) -> None:
    t = Table("check", "result", "reason")
    for c in checks:
        t.add_row(c.name, f"[{_LEVEL_STYLE[c.level]}]{c.level.value}[/]", c.reason)
    console.print(t)


def _history(json_out: bool) -> None:
    records: list[MigrationRecord] = []
    for entry in Inventory().hosts():
        try:
            records += [record_from_json(d) for d in client_for(entry).request("GET", "/v1/migrations")]  # type: ignore[union-attr]
        except Unreachable:
            continue
    records.sort(key=lambda r: r.started_at)
    if json_out:
        print_json(records)
        return
    t = Table("id", "vm", "from", "to", "phase", "started", "total", "downtime", "pause", "error")
    for r in records:
        s = r.summary
        t.add_row(
            r.id, r.vm, r.source, r.destination, r.phase.value, time.strftime("%H:%M:%S", time.localtime(r.started_at)),
            f"{s.total_ms:.0f} ms" if s else "-",
            f"{s.downtime_ms:.0f} ms" if s and s.downtime_ms is not None else "-",
            f"{s.pause_ms:.0f} ms" if s and s.pause_ms is not None else "-",
            (r.error or "")[:60],
        )
    console.print(t)


def app(
    vm: str = typer.Argument(..., help="VM to migrate (or `history`)."),
    to: str | None = typer.Option(None, "--to", help="Destination host (through a center: optional, placement "
                                  "chooses one and says why)."),
    max_downtime: str = typer.Option("500ms", help="Downtime budget: the pause may not exceed it."),
    bandwidth: str | None = typer.Option(None, help="Cap the stream, e.g. 1gbit or 100M (bytes/s)."),
    policy: str = typer.Option("balanced", help="Convergence policy: balanced, fast, gentle."),
    allow_postcopy: bool = typer.Option(False, help="Let the policy switch to post-copy if pre-copy cannot converge."),
    check: bool = typer.Option(False, "--check", help="Only run the prerequisite checks."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel the running migration of VM."),
    no_wait: bool = typer.Option(False, help="Start and return at once with the migration id."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Live-migrate a running VM to another host. The stream is encrypted unless the center runs
    --insecure: that is the cluster's policy, not a per-migration choice."""
    if vm == "history":
        _history(json_out)
        return
    if centerops.logged_in() and not (check or cancel or allow_postcopy):
        centerops.migrate(vm, to, round(parse_duration(max_downtime, default_unit="ms") * 1000),
                          parse_rate(bandwidth) if bandwidth else 0, policy, not no_wait, json_out)
        return
    _entry, client, _ = locate_vm(vm)
    if cancel:
        rec = record_from_json(client.request("POST", f"/v1/vms/{vm}/migration/cancel"))  # type: ignore[arg-type]
        console.print(f"cancelling migration {rec.id} of {vm} ({rec.phase.value})")
        return
    if not to:
        raise InvalidInput("say where to: --to HOST")
    options = MigrationOptions(
        max_downtime_ms=round(parse_duration(max_downtime, default_unit="ms") * 1000),
        bandwidth=parse_rate(bandwidth) if bandwidth else 0,
        policy=policy,
        allow_postcopy=allow_postcopy,
    )
    # The source's agent finds the destination in the cluster inventory.
    body = MigrationRequest(vm=vm, destination=to, options=OptionsBody.of(options))
    if check:
        checks = [Check(c["name"], Level(c["level"]), c["reason"]) for c in client.request("POST", "/v1/migrations/check", body=body)]  # type: ignore[union-attr]
        if json_out:
            print_json(checks)
        else:
            _print_checks(checks)
        if any(c.level is Level.ERROR for c in checks):
            raise typer.Exit(1)
        return
    rec = record_from_json(client.request("POST", "/v1/migrations", body=body, timeout=60))  # type: ignore[arg-type]
    if no_wait:
        print_json(rec) if json_out else console.print(rec.id)
        return
    rec = _follow(client, rec, live=not json_out)
    if json_out:
        print_json(rec)
    else:
        _summary(rec)
    if rec.phase is not Phase.DONE:
        raise MigrationError(f"migration of {vm} {rec.phase.value}: {rec.error}")


def _follow(client, rec: MigrationRecord, live: bool) -> MigrationRecord:
    def poll() -> MigrationRecord:
        return record_from_json(client.request("GET", f"/v1/migrations/{rec.id}"))

    if not live or not console.is_terminal:
        while not rec.phase.terminal:
            time.sleep(0.2)
            rec = poll()
        return rec
    with Live(_progress_table(rec), console=console, refresh_per_second=5, transient=True) as view:
        while not rec.phase.terminal:
            time.sleep(0.2)
            rec = poll()
            view.update(_progress_table(rec))
    return rec
