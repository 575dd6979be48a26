"""QemuProcess.alive for a process the agent started: waitpid decides, not the cmdline (which
reads empty while the child execs: a starting QEMU once looked dead and was left unsupervised)."""

from __future__ import annotations

import sys

from kvmotion.qemu.cmdline import VmPaths
from kvmotion.qemu.process import QemuProcess


def test_a_started_child_is_alive_whatever_its_cmdline_says_until_it_exits(tmp_path):
    # no process=<tag> in this argv: the cmdline check alone would call it dead from the start
    proc = QemuProcess.start([sys.executable, "-c", "import time; time.sleep(30)"], VmPaths(tmp_path / "vm"), "kvmotion:t1")
    try:
        assert all(proc.alive() for _ in range(50))
    finally:
        proc.kill_and_wait()
    assert not proc.alive()
    assert not QemuProcess(pid=proc.pid, paths=proc.paths, tag=proc.tag, started_at=0).alive()  # reaped: /proc decides
