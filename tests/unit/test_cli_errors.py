"""Wrong flags, values and commands are one line on stderr and exit 2, like every other error."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("args", "says"), [
    (["vm", "create", "x", "--vcpus", "abc"], "Invalid value for '--vcpus'"),
    (["vm", "create", "x", "--bogus"], "No such option: --bogus"),
    (["nosuch"], "No such command 'nosuch'"),
    (["vm", "create"], "Missing argument 'name'"),
])
def test_usage_errors_are_one_line(args, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvmotion.cli.main", *args], capture_output=True, text=True,
                       env={"KVMOTION_CONFIG": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmotion: error: ") and says in lines[0], r.stderr


def test_help_still_works(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvmotion.cli.main", "vm", "--help"], capture_output=True, text=True,
                       env={"KVMOTION_CONFIG": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0 and "Usage: " in r.stdout and "Virtual machines." in r.stdout
