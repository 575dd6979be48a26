"""A host agent's Prometheus metrics of its migrations, read from the migration service at each scrape.

    kvmotion_agent_migrations_total{host,role,result}    source: done, failed, cancelled; destination: committed, destroyed
    kvmotion_agent_migrations_active{host,role}
    kvmotion_agent_migration_duration_seconds{host}      histograms of the migrations done from this host:
    kvmotion_agent_migration_downtime_seconds{host}        QEMU's downtime,
    kvmotion_agent_migration_pause_seconds{host}           the source's STOP to the destination's RESUME,
    kvmotion_agent_migration_precopy_rounds{host}          pre-copy rounds,
    kvmotion_agent_migration_throttle_max_ratio{host}      the largest vCPU throttle applied (0-1)
    kvmotion_agent_migration_sent_bytes_total{host}      memory sent by every migration from this host (running too)
    kvmotion_agent_migration_rounds_total{host}          their pre-copy rounds
    kvmotion_agent_migration_{phase,round,remaining_bytes,link_rate_bytes_per_second,
        dirty_rate_bytes_per_second,throttle_ratio}{host,vm,destination}   each running outgoing migration

Counted since the agent started: the source's records of this process (MigrationService.records.live
keeps every migration it drove or recovered), the destination's ends (DestinationSide.ended).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmotion.api.center import MigrationRole
from kvmotion.api.metrics import DOWNTIME_BUCKETS, DURATION_BUCKETS, RATIO_BUCKETS, ROUND_BUCKETS, histogram
from kvmotion.api.migration import MigrationRecord, Phase
from kvmotion.migration.engine import MigrationService

SOURCE_RESULTS = (Phase.DONE, Phase.FAILED, Phase.CANCELLED)
DESTINATION_RESULTS = ("committed", "destroyed")


def _sent(rec: MigrationRecord) -> int:
    """Bytes sent so far: QEMU's running total, or its final figure once done (never less: a counter)."""
    return max(rec.progress.transferred, rec.summary.bytes if rec.summary else 0)


def _rounds(rec: MigrationRecord) -> int:
    return max(rec.progress.round, rec.summary.rounds if rec.summary else 0)


def migration_families(host: str, records: Sequence[MigrationRecord], incoming_active: int,
                       incoming_ended: Mapping[str, int]) -> Iterator[Metric]:
    """`records`: the outgoing migrations; `incoming_*`: the shadows held now, and how the others ended."""
    outgoing = [r for r in records if r.source == host]
    running = [r for r in outgoing if not r.phase.terminal]
    done = [r.summary for r in outgoing if r.phase is Phase.DONE and r.summary is not None]
    total = CounterMetricFamily("kvmotion_agent_migrations", "Migrations that ended, by this host's role and result",
                                labels=["host", "role", "result"])
    for end in SOURCE_RESULTS:
        total.add_metric([host, MigrationRole.SOURCE.value, end.value], sum(1 for r in outgoing if r.phase is end))
    for result in DESTINATION_RESULTS:
        total.add_metric([host, MigrationRole.DESTINATION.value, result], incoming_ended.get(result, 0))
    yield total
    active = GaugeMetricFamily("kvmotion_agent_migrations_active", "Migrations running, by this host's role",
                               labels=["host", "role"])
    active.add_metric([host, MigrationRole.SOURCE.value], len(running))
    active.add_metric([host, MigrationRole.DESTINATION.value], incoming_active)
    yield active
    for name, doc, bounds, values in (
        ("duration_seconds", "Total time of each migration done from this host", DURATION_BUCKETS,
         [s.total_ms / 1000 for s in done]),
        ("downtime_seconds", "Downtime of each migration done from this host (QEMU's figure)", DOWNTIME_BUCKETS,
         [s.downtime_ms / 1000 for s in done if s.downtime_ms is not None]),
        ("pause_seconds", "The VM's pause in each migration done from this host: the source's stop to the "
         "destination's resume", DOWNTIME_BUCKETS, [s.pause_ms / 1000 for s in done if s.pause_ms is not None]),
        ("precopy_rounds", "Pre-copy rounds of each migration done from this host", ROUND_BUCKETS,
         [float(s.rounds) for s in done]),
        ("throttle_max_ratio", "The largest vCPU throttle applied in each migration done from this host (0-1)",
         RATIO_BUCKETS, [s.throttle_max for s in done]),
    ):
        yield histogram(f"kvmotion_agent_migration_{name}", doc, ["host"], [([host], values)], bounds)
    sent = CounterMetricFamily("kvmotion_agent_migration_sent_bytes", "Memory sent by the migrations from this host",
                               labels=["host"])
    sent.add_metric([host], sum(_sent(r) for r in outgoing))
    rounds = CounterMetricFamily("kvmotion_agent_migration_rounds", "Pre-copy rounds of the migrations from this host",
                                 labels=["host"])
    rounds.add_metric([host], sum(_rounds(r) for r in outgoing))
    yield sent
    yield rounds
    labels = ["host", "vm", "destination"]
    phase = GaugeMetricFamily("kvmotion_agent_migration_phase", "1 for each running migration's phase",
                              labels=[*labels, "phase"])
    gauges = {
        "round": GaugeMetricFamily("kvmotion_agent_migration_round", "The running migration's pre-copy round",
                                   labels=labels),
        "remaining": GaugeMetricFamily("kvmotion_agent_migration_remaining_bytes",
                                       "Memory the running migration has still to send", labels=labels),
        "link": GaugeMetricFamily("kvmotion_agent_migration_link_rate_bytes_per_second",
                                  "The running migration's measured link rate", labels=labels),
        "dirty": GaugeMetricFamily("kvmotion_agent_migration_dirty_rate_bytes_per_second",
                                   "The rate the guest dirties memory at during the running migration", labels=labels),
        "throttle": GaugeMetricFamily("kvmotion_agent_migration_throttle_ratio",
                                      "The vCPU throttle the running migration applies now (0-1)", labels=labels),
    }
    for r in running:
        which = [host, r.vm, r.destination]
        phase.add_metric([*which, r.phase.value], 1)
        p = r.progress
        for key, value in (("round", p.round), ("remaining", p.remaining), ("link", p.link_rate),
                           ("dirty", p.dirty_rate), ("throttle", p.throttle)):
            gauges[key].add_metric(which, value)
    yield phase
    yield from gauges.values()


class MigrationCollector:
    """Reads the service's state in the caller's thread: the agent scrapes on its event loop."""

    def __init__(self, svc: MigrationService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        d = self.svc.destination
        yield from migration_families(self.svc.host, list(self.svc.records.live.values()), d.running(), dict(d.ended))
