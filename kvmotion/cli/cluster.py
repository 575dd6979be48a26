"""`kvmotion cluster settings`: the center's cluster settings (shown, or changed by an admin)."""

from __future__ import annotations

import typer
from rich.console import Console

from kvmotion.api.center import SettingsUpdate
from kvmotion.cli import centerops
from kvmotion.core.units import parse_duration

app = typer.Typer(no_args_is_help=True, help="The cluster's settings, at the center.")
console = Console()


@app.command()
def settings(
    migration_budget_slow: int | None = typer.Option(
        None, "--migration-budget-slow", help="Migrations a host on a link under 10 Gbit/s takes at once."),
    migration_budget_fast: int | None = typer.Option(
        None, "--migration-budget-fast", help="Migrations a host on a link of 10 Gbit/s or more takes at once."),
    cluster_migrations: int | None = typer.Option(None, "--cluster-migrations", help="Migrations running at once in the whole cluster."),
    link_bps: int | None = typer.Option(None, "--link-bps", help="A host's migration link speed (bit/s) unless it reports its own."),
    heartbeat_interval: str | None = typer.Option(None, "--heartbeat-interval", help="Between an agent's heartbeats, e.g. 2s."),
    report_interval: str | None = typer.Option(
        None, "--report-interval", help="Between an agent's full reports when nothing changed, e.g. 20s."),
    not_responding_after: str | None = typer.Option(
        None, "--not-responding-after", help="Silence after which a host is not responding, e.g. 8s."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The center's cluster settings; with options, change them (as an admin logged in with
    `kvmotion login`; the dispatcher uses new budgets and limits at its next pass)."""
    def seconds(text: str | None) -> float | None:
        return None if text is None else parse_duration(text)

    update = SettingsUpdate(migration_budget_slow=migration_budget_slow, migration_budget_fast=migration_budget_fast,
                            cluster_migrations=cluster_migrations, link_bps=link_bps,
                            heartbeat_interval=seconds(heartbeat_interval), report_interval=seconds(report_interval),
                            not_responding_after=seconds(not_responding_after))
    with centerops.client() as client:
        current = client.update_settings(update) if update.changes() else client.settings()
    if json_out:
        print(current.model_dump_json(indent=2))
        return
    for key, value in current.model_dump().items():
        console.print(f"{key}: {value}", highlight=False)
