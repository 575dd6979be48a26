"""`kvmotion task ls|show ID|cancel ID`: the center's tasks (needs `kvmotion login`)."""

from __future__ import annotations

from kvmotion.cli.centerops import task_app as app

__all__ = ["app"]
