"""`kvmotion events [--follow]`: the center's events (needs `kvmotion login`)."""

from __future__ import annotations

import typer

from kvmotion.cli import centerops


def app(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing events as they come (Ctrl-C ends)."),
    since: int = typer.Option(0, "--since", min=0, help="Only events after this id."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The cluster's events: joins, heartbeats lost, tasks queued, started and ended, drift."""
    centerops.events(follow, since, json_out)
