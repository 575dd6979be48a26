"""Cluster-wide settings as a host agent sees them, e.g. whether migration streams are encrypted:
the center's (kvmotion.api.center.ClusterSettings), from a joined agent's cache."""

from __future__ import annotations

from dataclasses import dataclass

from kvmotion.api import joined


@dataclass(frozen=True)
class ClusterConfig:
    encrypted: bool = True  # vSphere's encrypted vMotion, on by default; opt out for a trusted network
    cpu_baseline: str | None = None  # like EVC: the CPU model every VM gets unless it names one
    version: int = 1


def load_config() -> ClusterConfig:
    """The center's settings from the joined agent's cache (defaults in a process serving no joined
    root, e.g. a test's VM manager)."""
    root = joined.active()
    if root is None:
        return ClusterConfig()
    settings = root.cache().settings
    return ClusterConfig(encrypted=settings.encrypted, cpu_baseline=settings.cpu_baseline)
