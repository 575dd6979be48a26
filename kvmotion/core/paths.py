"""Where kvmotion keeps state, caches and runtime sockets on a host (overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built artefacts (guest kernel, initramfs), shared by every agent on the machine."""
    return Path(os.environ.get("KVMOTION_CACHE", "/var/cache/kvmotion"))


def state_dir() -> Path:
    """Default persistent state of a host agent (VM definitions), one subfolder per host name."""
    return Path(os.environ.get("KVMOTION_STATE", "/var/lib/kvmotion"))


def run_dir() -> Path:
    """Runtime files: QMP and serial sockets, pid files, lab descriptions."""
    return Path(os.environ.get("KVMOTION_RUN", "/run/kvmotion"))
