"""`kvmotion demo`: a lab cluster, a VM with a service, a client, live migrations around the hosts,
a checked report (table, JSON, picture); the lab is torn down at the end, also on Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kvmotion.api.agent import AgentClient
from kvmotion.api.migration import MigrationRecord, Phase
from kvmotion.cli.common import console, err_console
from kvmotion.cli.migrate import _follow
from kvmotion.core.interrupts import terminate_as_interrupt
from kvmotion.core.units import format_size, parse_rate, parse_size
from kvmotion.demo.report import DemoReport, MigrationResult
from kvmotion.demo.runner import DemoOptions, run_demo


class _RichView:
    def step(self, text: str) -> None:
        console.print(f"[cyan]▶[/] {text}")

    def follow(self, client: AgentClient, rec: MigrationRecord) -> MigrationRecord:
        return _follow(client, rec, live=True)

    def migrated(self, index: int, rec: MigrationRecord) -> None:
        s = rec.summary
        if rec.phase is not Phase.DONE or s is None:
            console.print(f"  [red]migration {index} {rec.phase.value}[/]: {rec.error}")
            return
        downtime = f"{s.downtime_ms:.0f} ms" if s.downtime_ms is not None else "-"
        pause = f"{s.pause_ms:.0f} ms" if s.pause_ms is not None else "-"
        console.print(
            f"  [green]done[/] in {s.total_ms / 1000:.2f} s: downtime {downtime} (QEMU), pause {pause}, "
            f"{s.rounds} rounds, {format_size(s.bytes)}"
        )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def _mark(ok: bool) -> str:
    return "[green]✔[/]" if ok else "[red]✘[/]"


def _route(m: MigrationResult) -> str:
    hop = f"{m.source.removeprefix('host-')} → {m.destination.removeprefix('host-')}"
    return hop if m.phase == Phase.DONE.value else f"{hop} [red]{m.phase}[/]"


def _print_report(rep: DemoReport, report_path: Path) -> None:
    # Two narrow tables rather than one wide one: the figures, then the checks (fits 80 columns).
    title = f"kvmotion demo: {format_size(rep.memory)} guest, {rep.accel.upper()}, {'encrypted' if rep.encrypted else 'plain'}"
    t = Table(title=title)
    for col in ("#", "host", "total", "downtime\n(QEMU)", "pause\n(kvmotion)", "client\ngap", "rounds", "bytes", "conv."):
        t.add_column(col, justify="left" if col == "host" else "right")
    for m in rep.migrations:
        t.add_row(
            str(m.index), _route(m), "-" if m.total_ms is None else f"{m.total_ms / 1000:.2f} s",
            _ms(m.downtime_ms), _ms(m.pause_ms), _ms(m.client_gap_ms), "-" if m.rounds is None else str(m.rounds),
            "-" if m.bytes is None else format_size(m.bytes), _mark(m.converged),
        )
    console.print(t)
    c = Table(title="checks after each migration")
    for col in ("#", "host", "guest memory", "TCP stream", "disk records", "switch FDB", "one copy"):
        c.add_column(col, justify="left" if col == "host" else "center")
    for m in rep.migrations:
        k = m.checks
        c.add_row(str(m.index), _route(m), _mark(k.memory_ok), _mark(k.tcp_ok), _mark(k.disk_ok), _mark(k.fdb_ok),
                  _mark(k.single_copy_ok))
    console.print(c)
    if rep.probe is not None:
        console.print(f"client: {rep.probe.summary_line()}")
    if rep.disk is not None:
        console.print(f"disk: {rep.disk.summary()}")
    console.print(f"guest memory writer: errors={rep.mem_errors}, corrupt-page lines={rep.mem_corrupt_lines}")
    console.print(f"report: {report_path}   picture: {rep.picture}   ({rep.duration_s:.0f} s)")
    if rep.all_ok:
        console.print("[bold green]every check held[/]")
    else:
        bad = [f"#{m.index} {', '.join(m.checks.failed()) or m.phase}" for m in rep.migrations if not m.checks.all_ok]
        if len(rep.migrations) < rep.migrations_asked:
            bad.append(f"only {len(rep.migrations)} of {rep.migrations_asked} migrations ran")
        console.print(f"[bold red]checks failed[/]: {'; '.join(bad)}")



def app(
    memory: str = typer.Option("512M", "--memory", help="Guest RAM, e.g. 256M, 1G."),
    dirty_rate: str = typer.Option("50M", "--dirty-rate", help="Bytes/s the guest's memory writer dirties (0: flat out)."),
    link: str = typer.Option("none", "--link", help="Shape the lab's links: 1gbit, 10gbit, any rate, or none."),
    migrations: int = typer.Option(3, "--migrations", help="Live migrations: host-a → host-b → host-c → host-a …"),
    plain: bool = typer.Option(False, "--plain", help="Do not encrypt (no cluster CA, plain migration streams)."),
    report: Path = typer.Option(Path("kvmotion-demo.json"), "--report", help="JSON report; the picture goes beside it (.svg)."),
) -> None:
    """The whole story: build a lab, boot a VM, probe it from a client, live-migrate it around, check, report."""
    opts = DemoOptions(
        memory=parse_size(memory),
        dirty_rate=parse_rate(dirty_rate),
        link_rate=None if link.strip().lower() in ("none", "", "0") else parse_rate(link),
        migrations=migrations,
        encrypted=not plain,
        report=report.absolute(),
    )
    try:
        with terminate_as_interrupt():
            rep = run_demo(opts, _RichView())
    except KeyboardInterrupt:
        err_console.print("kvmotion: demo interrupted; the lab was torn down")
        raise typer.Exit(130) from None
    _print_report(rep, opts.report)
    if not rep.all_ok:
        raise typer.Exit(1)
