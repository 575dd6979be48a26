"""What every kvmotion `/metrics` endpoint shares (Prometheus text format, prometheus_client).

Each listener has its own registry (never the library's global one: tests build several apps in
one process). Its collectors read the process's state when Prometheus scrapes (the center's store,
an agent's VMs and migrations, a datastore's disks), so a figure is never kept twice; what no state
keeps (a datastore's lease calls and refused writes) is counted as it happens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import HistogramMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket bounds (upper, inclusive) shared by every histogram of the same quantity, so that
# dashboards can add them up across agents and compare the center's figures with the agents'.
DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # seconds
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)  # seconds
ROUND_BUCKETS = (1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0, 100.0)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def new_registry() -> CollectorRegistry:
    """A registry of one listener, with the process's own CPU, memory and file descriptors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (calls every collector)."""
    return generate_latest(registry)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def histogram_buckets(values: Iterable[float], bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets (Prometheus' `le` labels, +Inf last) and the sum of `values`."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for value in values:
        total += value
        for i, bound in enumerate(bounds):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append((_bound(bound), float(running)))
    return out, total


def histogram(name: str, doc: str, labels: Sequence[str], series: Iterable[tuple[Sequence[str], Iterable[float]]],
              bounds: Sequence[float]) -> HistogramMetricFamily:
    """A histogram family built from the values themselves, one series per label values."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, values in series:
        buckets, total = histogram_buckets(values, bounds)
        family.add_metric(list(label_values), buckets, total)
    return family
