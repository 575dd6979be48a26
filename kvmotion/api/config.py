"""Cluster-wide settings (a JSON file in the cluster folder), e.g. whether migration streams are encrypted."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmotion.api import joined
from kvmotion.api.inventory import cluster_dir
from kvmotion.core.errors import InvalidInput
from kvmotion.core.files import write_atomic


@dataclass(frozen=True)
class ClusterConfig:
    encrypted: bool = True  # vSphere's encrypted vMotion, on by default; opt out for a trusted network
    cpu_baseline: str | None = None  # like EVC: the CPU model every VM gets unless it names one
    version: int = 1


CONFIG_FILE = "cluster.json"


def load_config(folder: Path | None = None) -> ClusterConfig:
    """The cluster's settings (defaults when `kvmotion cluster init` was never run); in an agent
    joined to the center (kvmotion.api.joined), the center's from the agent's cache."""
    root = joined.active() if folder is None else None
    if root is not None:
        settings = root.cache().settings
        return ClusterConfig(encrypted=settings.encrypted, cpu_baseline=settings.cpu_baseline)
    path = (folder or cluster_dir()) / CONFIG_FILE
    try:
        return ClusterConfig(**json.loads(path.read_text()))
    except FileNotFoundError:
        return ClusterConfig()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"cluster config {path} is damaged: {exc}") from exc


def save_config(config: ClusterConfig, folder: Path | None = None) -> Path:
    path = (folder or cluster_dir()) / CONFIG_FILE
    write_atomic(path, json.dumps(asdict(config), indent=1))
    return path
