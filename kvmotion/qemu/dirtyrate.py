"""A running guest's dirty rate between migrations: QEMU's page-sampling estimate.

`calc-dirty-rate` hashes a sample of the guest's pages (SAMPLE_PAGES per GiB) at the start and
the end of CALC_SECONDS and counts those that changed; `query-dirty-rate` gives the result in MiB/s.
No dirty logging is switched on, so it costs the guest nothing measurable and works under TCG.
The agent reads the last result and starts the next measurement at each full heartbeat report, so
it never waits for one. Migration predictions use it for a VM never migrated yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kvmotion.core.errors import KvmotionError

CALC_SECONDS = 1
SAMPLE_PAGES = 512  # per GiB of guest RAM: QEMU's default
ANSWER_TIMEOUT = 2.0  # s for each QMP command: a stuck QEMU must not hold up a heartbeat
MIB = 1 << 20

# Qmp.execute_within: (seconds, command, **arguments) -> QEMU's answer; KvmotionError on refusal.
ExecuteWithin = Callable[..., Awaitable[Any]]


def parse(answer: object) -> float | None:
    """Bytes/s from `query-dirty-rate`'s answer; None while nothing is measured (or it is no answer)."""
    if not isinstance(answer, Mapping) or answer.get("status") != "measured":
        return None
    rate = answer.get("dirty-rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
        return None
    return float(rate * MIB)


async def sample(execute_within: ExecuteWithin) -> float | None:
    """The last finished measurement (None if there is none yet), and the next one started."""
    try:
        last = parse(await execute_within(ANSWER_TIMEOUT, "query-dirty-rate"))
    except KvmotionError:
        last = None
    try:
        await execute_within(ANSWER_TIMEOUT, "calc-dirty-rate",
                             **{"calc-time": CALC_SECONDS, "sample-pages": SAMPLE_PAGES})
    except KvmotionError:
        pass  # one still measuring, or the guest stopped meanwhile: the next report tries again
    return last


async def sample_all(vms: Mapping[str, ExecuteWithin]) -> dict[str, float]:
    """`sample` of every VM at once: a stuck QEMU costs its own bounded answer, not every VM's."""
    async with asyncio.TaskGroup() as group:
        tasks = {name: group.create_task(sample(execute)) for name, execute in vms.items()}
    return {name: rate for name, task in tasks.items() if (rate := task.result()) is not None}
