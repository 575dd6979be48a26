"""What the browser tests share: Debian's chromium, and the migration dialog's steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
# the migration dialog's progress bar and state, read together (read apart, a render between the
# two reads showed a finished migration with the bar of the render before)
PROGRESS = """(() => { const m = document.querySelector('#dialog .migration');
    return [m && m.querySelector('progress') ? m.querySelector('progress').value : null, m ? m.dataset.state : ''] })()"""
ENDED = ("done", "failed", "cancelled")


def choose_destination(page: Any, host: str, shot: Path) -> Any:
    """The open migrate dialog's choice of `host` (screenshot `shot` once it shows), to be checked;
    then confirmed, once the caller has looked at it, by `confirm_migration`."""
    choice = page.locator(f"#dialog .choice[data-host={host}]")
    choice.wait_for()
    page.screenshot(path=shot)
    return choice


def confirm_migration(page: Any) -> None:
    page.locator("#dialog-confirm").click()
    page.locator("#dialog .migration").wait_for()


def follow_migration(page: Any, timeout: float, seen_value: Callable[[list[float]], None] = lambda seen: None,
                     ) -> tuple[list[float], str]:
    """The progress bar's values as they change, until the migration ends or `timeout` s; and its
    last state. `seen_value(values so far)` at each new value (a test's mid-way screenshot)."""
    seen: list[float] = []
    state = ""
    deadline = time.monotonic() + timeout
    while state not in ENDED and time.monotonic() < deadline:
        value, state = page.evaluate(PROGRESS)
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
            seen_value(seen)
        time.sleep(0.05)
    return seen, state
