"""SIGTERM turned into KeyboardInterrupt for the blocks that own labs and processes."""

from __future__ import annotations

import os
import signal

import pytest

from kvmotion.core.interrupts import terminate_as_interrupt


def test_sigterm_raises_keyboard_interrupt_inside_and_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # let the handler run here, not after the block
            pytest.fail("SIGTERM did not interrupt")
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_forked_child_exits_instead_of_raising() -> None:
    with terminate_as_interrupt():
        pid = os.fork()
        if pid == 0:  # the child: the inherited handler must end it, not run the parent's code
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
