"""off_event_loop lets synchronous netlink helpers run from inside an asyncio handler."""

import asyncio

import pytest

from kvmotion.net.nl import off_event_loop


async def _answer():
    return 42


@off_event_loop
def drives_its_own_loop():
    loop = asyncio.new_event_loop()  # as pyroute2's IPRoute does
    try:
        return loop.run_until_complete(_answer())
    finally:
        loop.close()


@off_event_loop
def fails():
    raise ValueError("boom")


def test_plain_call():
    assert drives_its_own_loop() == 42


def test_call_from_a_running_loop():
    async def handler():
        return drives_its_own_loop()

    assert asyncio.run(handler()) == 42


def test_errors_propagate_from_the_helper_thread():
    async def handler():
        return fails()

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(handler())
