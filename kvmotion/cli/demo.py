"""`kvmotion demo`: a lab cluster, a VM with a service, a client, live migrations around the hosts
through the center, then the center at work (DRS, maintenance, host health), a checked report
(tables, JSON, picture); the lab is torn down at the end, also on Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvmotion.api.center import CenterClient, TaskView
from kvmotion.api.migration import MigrationRecord, Phase
from kvmotion.cli.common import console, err_console
from kvmotion.core.errors import InvalidInput
from kvmotion.core.interrupts import terminate_as_interrupt
from kvmotion.core.units import format_size, parse_rate, parse_size
from kvmotion.demo.report import ACT1, DemoReport, MigrationResult
from kvmotion.demo.runner import HOST_CPU, DemoOptions, parse_dirty_rate, run_demo

POLL_S = 0.3


def _task_line(task: TaskView) -> Text:
    hop = f" {task.source} → {task.destination}" if task.source else ""
    p = task.progress
    frac = f" {p.fraction * 100:.0f} %" if p.fraction else ""
    return Text(f"  {task.kind.value} {task.target}{hop} [{task.state.value}] {p.message or p.phase}{frac}")


class _RichView:
    def step(self, text: str) -> None:
        console.print(f"[cyan]▶[/] {text}")

    def detail(self, text: str) -> None:
        console.print(f"    {text}", highlight=False)

    def follow(self, center: CenterClient, task: TaskView) -> TaskView:
        """The center's task until it ends, its progress on one transient line."""
        if not console.is_terminal:
            while not task.state.terminal:
                time.sleep(POLL_S)
                task = center.task(task.id)
            return task
        with Live(_task_line(task), console=console, refresh_per_second=5, transient=True) as live:
            while not task.state.terminal:
                time.sleep(POLL_S)
                task = center.task(task.id)
                live.update(_task_line(task))
        return task

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


def _check(ok: bool | None) -> str:
    return "[dim]not run[/]" if ok is None else _mark(ok)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms" if x >= 10 else f"{x:.1f} ms"


def _mark(ok: bool) -> str:
    return "[green]✔[/]" if ok else "[red]✘[/]"


def _route(m: MigrationResult) -> str:
    hop = f"{m.source.removeprefix('host-')} → {m.destination.removeprefix('host-')}"
    if m.step != ACT1:
        hop += f"\n[dim]{m.step}[/]"  # which step of act 2 moved it, below its hop
    return hop if m.phase == Phase.DONE.value else f"{hop} [red]{m.phase}[/]"


def _print_report(rep: DemoReport, report_path: Path) -> None:
    # Two narrow tables rather than one wide one: the figures, then the checks (fits 80 columns).
    title = f"kvmotion demo: {format_size(rep.memory)} guest, {rep.accel.upper()}, {'encrypted' if rep.encrypted else 'plain'}"
    moved = list(rep.migrations) + [m for s in rep.act2 or () for m in s.migrations]
    t = Table(title=title)
    for col in ("#", "host", "total", "downtime\n(QEMU)", "pause\n(kvmotion)", "client\ngap", "rounds", "bytes", "conv."):
        t.add_column(col, justify="left" if col == "host" else "right")
    for m in moved:
        t.add_row(
            str(m.index), _route(m), "-" if m.total_ms is None else f"{m.total_ms / 1000:.2f} s",
            _ms(m.downtime_ms), _ms(m.pause_ms), _ms(m.client_gap_ms), "-" if m.rounds is None else str(m.rounds),
            "-" if m.bytes is None else format_size(m.bytes), _mark(m.converged),
        )
    console.print(t)
    c = Table(title=f"checks after each migration of {rep.vm}")
    for col in ("#", "host", "guest memory", "TCP stream", "disk records", "switch FDB", "one copy"):
        c.add_column(col, justify="left" if col == "host" else "center")
    for m in moved:
        k = m.checks
        c.add_row(str(m.index), _route(m), _check(k.memory_ok), _mark(k.tcp_ok), _mark(k.disk_ok), _mark(k.fdb_ok),
                  _mark(k.single_copy_ok))
    console.print(c)
    if rep.act2 is not None:
        a = Table(title=f"act 2: the center at work ({rep.act2_s or 0:.0f} s)")
        for col in ("step", "moves", "outcome", "ok"):
            a.add_column(col, justify="center" if col == "ok" else "left")
        for s in rep.act2:
            moves = ", ".join(f"{m.vm} {(m.source or '?').removeprefix('host-')}→{(m.destination or '?').removeprefix('host-')}"
                              for m in s.moves) or "-"
            a.add_row(s.name, moves, s.outcome, _mark(s.all_ok))
        console.print(a)
        for s in rep.act2:
            for w in s.rates:
                ratio = "-" if w.ratio is None else f"x{w.ratio:.2f}"
                before = "-" if w.before is None else f"{w.before:,.0f}"
                after = "-" if w.after is None else f"{w.after:,.0f}"
                console.print(f"work rate {w.vm}: {before} on {w.host_before} → {after} on {w.host_after} "
                              f"units per guest-second ({ratio})")
    if rep.probe is not None:
        console.print(f"client: {rep.probe.summary_line()}")
    if rep.disk is not None:
        console.print(f"disk: {rep.disk.summary()}")
    if rep.dirty_rate is None:
        console.print("guest memory writer: not run (--dirty-rate idle): the memory check was not made")
    else:
        console.print(f"guest memory writer: errors={rep.mem_errors}, corrupt-page lines={rep.mem_corrupt_lines}")
    console.print(f"report: {report_path}   picture: {rep.picture}   ({rep.duration_s:.0f} s)")
    if rep.all_ok:
        console.print("[bold green]every check held[/]")
    else:
        bad = [f"#{m.index} {', '.join(m.checks.failed()) or m.phase}" for m in moved if not m.checks.all_ok
               or m.phase != Phase.DONE.value]
        if len(rep.migrations) < rep.migrations_asked:
            bad.append(f"only {len(rep.migrations)} of {rep.migrations_asked} migrations ran")
        bad += [f"act 2 {s.name}: {s.outcome}" for s in rep.act2 or () if not s.all_ok]
        console.print(f"[bold red]checks failed[/]: {'; '.join(bad)}")


def _host_cpu(text: str) -> float | None:
    word = text.strip().lower()
    if word in ("none", "unlimited"):
        return None
    try:
        return float(word)
    except ValueError:
        raise InvalidInput(f"invalid --host-cpu {text!r}: cores per host (e.g. 1 or 0.5), or none") from None


def app(
    memory: str = typer.Option("512M", "--memory", help="Guest RAM, e.g. 256M, 1G."),
    dirty_rate: str = typer.Option("50M", "--dirty-rate", help="Bytes/s the guest's memory writer dirties; max: flat "
                                   "out; idle: no memory writer (the memory check is then not made)."),
    link: str = typer.Option("none", "--link", help="Shape the lab's links: 1gbit, 10gbit, any rate, or none."),
    migrations: int = typer.Option(3, "--migrations", help="Live migrations: host-a → host-b → host-c → host-a …"),
    plain: bool = typer.Option(False, "--plain", help="Do not encrypt (no cluster CA, plain migration streams)."),
    report: Path = typer.Option(Path("kvmotion-demo.json"), "--report", help="JSON report; the picture goes beside it (.svg)."),
    no_act2: bool = typer.Option(False, "--no-act2", help="Only the migrations: skip DRS, maintenance and host health."),
    host_cpu: str = typer.Option(f"{HOST_CPU:g}", "--host-cpu", help="Cores each lab host may use, or none (unlimited)."),
) -> None:
    """The whole story: build a lab, boot a VM, probe it from a client, live-migrate it around, let the
    center balance, evacuate and refill hosts, check every move, report."""
    opts = DemoOptions(
        memory=parse_size(memory),
        dirty_rate=parse_dirty_rate(dirty_rate),
        link_rate=None if link.strip().lower() in ("none", "", "0") else parse_rate(link),
        migrations=migrations,
        encrypted=not plain,
        report=report.absolute(),
        act2=not no_act2,
        host_cpu=_host_cpu(host_cpu),
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
