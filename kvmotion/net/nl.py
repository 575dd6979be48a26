"""Netlink plumbing shared by links.py and netns.py.

pyroute2's synchronous IPRoute drives its own asyncio loop with run_until_complete, which fails
("This event loop is already running") when called from a thread that runs a loop — e.g. inside
an `async def` handler of the host agent. `off_event_loop` moves such calls to a short-lived
thread; elsewhere it calls straight through.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def off_event_loop(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _loop_running():
            return fn(*args, **kwargs)
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(exc)

        t = threading.Thread(target=run, name=f"netlink-{fn.__name__}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    return wrapper  # type: ignore[return-value]
