"""Cluster-wide settings (a JSON file in the cluster folder), e.g. whether migration streams are encrypted."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kvmotion.cluster.inventory import cluster_dir
from kvmotion.errors import InvalidInput
from kvmotion.host.store import write_atomic


@dataclass(frozen=True)
class ClusterConfig:
    encrypted: bool = True  # vSphere's encrypted vMotion, on by default; opt out for a trusted network
    cpu_baseline: str | None = None  # like EVC: the CPU model every VM gets unless it names one
    version: int = 1


def load_config() -> ClusterConfig:
    path = cluster_dir() / "cluster.json"
    try:
        return ClusterConfig(**json.loads(path.read_text()))
    except FileNotFoundError:
        return ClusterConfig()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"cluster config {path} is damaged: {exc}") from exc


def save_config(config: ClusterConfig) -> None:
    write_atomic(cluster_dir() / "cluster.json", json.dumps(asdict(config), indent=1))
