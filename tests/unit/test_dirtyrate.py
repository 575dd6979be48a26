"""kvmotion.qemu.dirtyrate: QEMU's page-sampling dirty rate, read and restarted at each full report."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvmotion.core.errors import VmFailed
from kvmotion.qemu import dirtyrate

MIB = 1 << 20


@pytest.mark.parametrize(("answer", "rate"), [
    ({"status": "measured", "dirty-rate": 42, "start-time": 7, "calc-time": 1}, 42.0 * MIB),
    ({"status": "measured", "dirty-rate": 0, "start-time": 7}, 0.0),
    ({"status": "measuring", "start-time": 7}, None),  # not done yet
    ({"status": "unstarted"}, None),
    ({"status": "measured"}, None),  # no figure
    ({"status": "measured", "dirty-rate": -1}, None),
    ({"status": "measured", "dirty-rate": True}, None),
    ({"status": "measured", "dirty-rate": "42"}, None),
    ([], None),
    (None, None),
])
def test_parse(answer: object, rate: float | None) -> None:
    assert dirtyrate.parse(answer) == rate


class FakeQemu:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[float, str, dict]] = []

    async def execute_within(self, seconds: float, command: str, /, **arguments: Any) -> Any:
        self.calls.append((seconds, command, arguments))
        answer = self.answers[command]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_sample_reads_the_last_result_and_starts_the_next() -> None:
    qemu = FakeQemu({"query-dirty-rate": {"status": "measured", "dirty-rate": 100, "start-time": 3}, "calc-dirty-rate": {}})
    assert asyncio.run(dirtyrate.sample(qemu.execute_within)) == 100.0 * MIB
    assert [c[1] for c in qemu.calls] == ["query-dirty-rate", "calc-dirty-rate"]
    assert qemu.calls[1][2] == {"calc-time": dirtyrate.CALC_SECONDS, "sample-pages": dirtyrate.SAMPLE_PAGES}
    assert all(c[0] == dirtyrate.ANSWER_TIMEOUT for c in qemu.calls)  # every question is bounded


def test_a_refusal_is_no_figure_and_the_next_measurement_is_still_asked_for() -> None:
    refused = VmFailed("QEMU refused query-dirty-rate for VM web1: no")
    qemu = FakeQemu({"query-dirty-rate": refused, "calc-dirty-rate": {}})
    assert asyncio.run(dirtyrate.sample(qemu.execute_within)) is None
    assert [c[1] for c in qemu.calls] == ["query-dirty-rate", "calc-dirty-rate"]
    # One still running (QEMU refuses a second): the figure already measured is kept.
    busy = FakeQemu({"query-dirty-rate": {"status": "measured", "dirty-rate": 5}, "calc-dirty-rate": refused})
    assert asyncio.run(dirtyrate.sample(busy.execute_within)) == 5.0 * MIB


def test_every_vm_is_asked_at_once_and_a_stuck_one_costs_only_its_own_bound() -> None:
    class Slow(FakeQemu):
        async def execute_within(self, seconds: float, command: str, /, **arguments: Any) -> Any:
            await asyncio.sleep(0.3)  # as long as each of a stuck QEMU's bounded answers
            raise VmFailed(f"QEMU of VM db1 did not answer {command} within {seconds:g} s")

    fast = FakeQemu({"query-dirty-rate": {"status": "measured", "dirty-rate": 7}, "calc-dirty-rate": {}})
    slow = [Slow({}) for _ in range(4)]

    async def run() -> tuple[dict[str, float], float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rates = await dirtyrate.sample_all({"web1": fast.execute_within, **{f"db{i}": s.execute_within
                                                                            for i, s in enumerate(slow)}})
        return rates, loop.time() - t0

    rates, took = asyncio.run(run())
    assert rates == {"web1": 7.0 * MIB}  # the stuck ones have no figure
    assert took < 1.0  # 4 stuck VMs x 2 questions x 0.3 s one after the other would be 2.4 s
