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
