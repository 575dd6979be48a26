"""A throwaway network namespace for tests that need the real kernel."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

from kvmotion.net import netns


@contextlib.contextmanager
def throwaway_namespace(prefix: str) -> Iterator[str]:
    """A namespace of a unique name, deleted (with its links and processes) whatever happens."""
    name = f"{prefix}{secrets.token_hex(4)}"
    netns.create_ns(name)
    try:
        yield name
    finally:
        netns.kill_ns_processes(name)
        netns.delete_ns(name)
    assert not netns.ns_exists(name)
