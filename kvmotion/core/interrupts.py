"""SIGTERM handled like Ctrl-C, so the `with` blocks that own labs and processes tear them down;
and teardowns that no second Ctrl-C cuts short."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in this process."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        # Forked helpers (pyroute2's namespace children, run_in_ns) inherit this handler and run on
        # our copied stack: raising there would run the caller's code twice. They just die instead.
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are ignored: a teardown cut short leaves namespaces behind."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
