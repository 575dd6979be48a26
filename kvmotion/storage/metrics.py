"""A datastore's Prometheus metrics: its disks and leases (read at each scrape), its lease calls and
the writes its NBD server refused (counted as they happen, since the service started).

    kvmotion_datastore_disks{datastore}
    kvmotion_datastore_disk_{size_bytes,allocated_bytes,lease_generation}{datastore,disk}
    kvmotion_datastore_disk_lease{datastore,disk,host,vm}           1 while a host holds a live lease
    kvmotion_datastore_lease_operations_total{datastore,op,result}  acquire, renew, transfer, release:
                                                                      ok, refused (LeaseError), forbidden, error
    kvmotion_datastore_fencing_refusals_total{datastore,op,reason}  writes (write, zero, trim, flush) nbdkit refused,
                                                                      once per NBD connection and reason

Lease calls run in FastAPI's worker threads: the counters take a lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmotion.api.disks import DiskInfo
from kvmotion.api.metrics import new_registry
from kvmotion.core.errors import Forbidden, KvmotionError, LeaseError
from kvmotion.storage.datastore import Datastore
from kvmotion.storage.lease import WriteRefusal, parse_refusal_line

T = TypeVar("T")
LEASE_OPS = ("acquire", "renew", "transfer", "release")
LEASE_RESULTS = ("ok", "refused", "forbidden", "error")
FENCED_OPS = ("write", "zero", "trim", "flush")


def lease_result(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, LeaseError):
        return "refused"
    if isinstance(exc, Forbidden):
        return "forbidden"
    return "error"


def disk_families(name: str, disks: list[DiskInfo], now: float) -> Iterator[Metric]:
    count = GaugeMetricFamily("kvmotion_datastore_disks", "Disks on the datastore", labels=["datastore"])
    count.add_metric([name], len(disks))
    yield count
    labels = ["datastore", "disk"]
    size = GaugeMetricFamily("kvmotion_datastore_disk_size_bytes", "A disk's size", labels=labels)
    allocated = GaugeMetricFamily("kvmotion_datastore_disk_allocated_bytes", "A disk's allocated bytes", labels=labels)
    generation = GaugeMetricFamily("kvmotion_datastore_disk_lease_generation",
                                   "The last lease generation handed out for a disk (0: never leased)", labels=labels)
    lease = GaugeMetricFamily("kvmotion_datastore_disk_lease", "1 while a host holds a live write lease on the disk",
                              labels=[*labels, "host", "vm"])
    for d in disks:
        size.add_metric([name, d.name], d.size)
        allocated.add_metric([name, d.name], d.allocated)
        generation.add_metric([name, d.name], d.generation)
        if d.lease is not None and d.lease.live(now):
            lease.add_metric([name, d.name, d.lease.host, d.lease.vm], 1)
    yield from (size, allocated, generation, lease)


class DatastoreMetrics:
    """The datastore's collector and the counters its API and NBD server's log feed."""

    def __init__(self, ds: Datastore, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ds = ds
        self.clock = clock
        self.registry = registry or new_registry()
        self._lock = threading.Lock()
        self.lease_ops: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refusals: collections.Counter[tuple[str, WriteRefusal]] = collections.Counter()
        self.registry.register(self)

    def lease_call(self, op: str, call: Callable[[], T]) -> T:
        """`call()` (a lease operation), counted by its result."""
        try:
            result = call()
        except KvmotionError as exc:
            self._count_lease(op, lease_result(exc))
            raise
        except Exception:
            self._count_lease(op, "error")
            raise
        self._count_lease(op, "ok")
        return result

    def _count_lease(self, op: str, result: str) -> None:
        with self._lock:
            self.lease_ops[op, result] += 1

    def nbd_log_line(self, line: str) -> None:
        """A line of the NBD server's stderr: counted if it is a refused write."""
        refused = parse_refusal_line(line)
        if refused is not None:
            with self._lock:
                self.refusals[refused] += 1

    def collect(self) -> Iterator[Metric]:
        """In the caller's thread (the disk listing reads the folder and the lease file)."""
        yield from disk_families(self.ds.name, self.ds.list_disks(), self.clock())
        with self._lock:
            ops, refusals = dict(self.lease_ops), dict(self.refusals)
        name = self.ds.name
        lease_ops = CounterMetricFamily("kvmotion_datastore_lease_operations", "Lease calls by operation and result",
                                        labels=["datastore", "op", "result"])
        for op in LEASE_OPS:
            for result in LEASE_RESULTS:
                lease_ops.add_metric([name, op, result], ops.get((op, result), 0))
        yield lease_ops
        fenced = CounterMetricFamily("kvmotion_datastore_fencing_refusals",
                                     "Writes refused by lease fencing (once per NBD connection and reason)",
                                     labels=["datastore", "op", "reason"])
        for op in FENCED_OPS:
            for reason in WriteRefusal:
                fenced.add_metric([name, op, reason.name.lower()], refusals.get((op, reason), 0))
        yield fenced
