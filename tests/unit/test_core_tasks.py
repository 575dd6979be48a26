"""What a failed TaskGroup raises to a caller that expects one error."""

from __future__ import annotations

import asyncio

import pytest

from kvmotion.core.errors import SetupError, Unreachable
from kvmotion.core.tasks import leaf_errors, sole_error


def test_one_error_comes_out_as_itself() -> None:
    async def main() -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(asyncio.sleep(10))
                raise SetupError("nbdkit did not start")
        except BaseExceptionGroup as group:
            raise sole_error(group) from None

    with pytest.raises(SetupError, match=r"^nbdkit did not start$"):
        asyncio.run(main())


def test_several_errors_first_with_the_others_in_notes() -> None:
    inner = ExceptionGroup("inner", [Unreachable("peer gone"), ValueError("bad")])
    group = ExceptionGroup("outer", [SetupError("first"), inner])
    assert [str(e) for e in leaf_errors(group)] == ["first", "peer gone", "bad"]
    err = sole_error(group)
    assert isinstance(err, SetupError) and str(err) == "first"
    assert err.__notes__ == ["also: Unreachable: peer gone", "also: ValueError: bad"]
