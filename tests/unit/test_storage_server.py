"""Pieces of `datastore serve` that need no processes: nbdkit's command line, its log filter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvmotion.api.address import Endpoint
from kvmotion.storage import nbd_plugin_path
from kvmotion.storage.server import ServeConfig, _StderrFilter, nbdkit_command

FENCED = [
    "nbdkit: python.3: error: /x/nbd_plugin.py: pwrite: error: Traceback (most recent call last):\n",
    '   File "/x/nbd_plugin.py", line 213, in pwrite\n',
    " PermissionError: [Errno 1] write refused: another host holds the write lease\n",
    "\n",
]
OTHER = [
    "nbdkit: python.3: error: /x/nbd_plugin.py: pwrite: error: Traceback (most recent call last):\n",
    " OSError: [Errno 28] No space left on device\n",
    "\n",
]


def test_filter_drops_fenced_tracebacks_only() -> None:
    filt = _StderrFilter()
    assert filt.feed("nbdkit: starting\n") == []  # held back until nbdkit is up
    out = filt.started()
    for line in ["kvmotion-datastore: refused write ...\n", *FENCED, *OTHER, "nbdkit: debug: x\n"]:
        out += filt.feed(line)
    assert out == ["nbdkit: starting\n", "kvmotion-datastore: refused write ...\n", *OTHER, "nbdkit: debug: x\n"]


def test_nbdkit_command(tmp_path: Path) -> None:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit not installed")
    cfg = ServeConfig("ds1", tmp_path, Endpoint("10.77.0.1", 10809), Endpoint("10.77.0.1", 10810), 15.0)
    argv = nbdkit_command(cfg, tmp_path / "pid")
    assert argv[argv.index("--port") + 1] == "10809"
    assert argv[argv.index("--ipaddr") + 1] == "10.77.0.1"
    assert "--exit-with-parent" in argv
    assert argv[-3:] == ["python", str(nbd_plugin_path()), f"root={tmp_path}"]
    assert nbd_plugin_path().is_file()


def test_nbdkit_behind_the_tls_front_end_listens_on_a_unix_socket_only(tmp_path: Path) -> None:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit not installed")
    cfg = ServeConfig("ds1", tmp_path, Endpoint("10.77.0.1", 10809), Endpoint("10.77.0.1", 10810), 15.0,
                      cert_dir=tmp_path / "certs")
    assert not cfg.insecure and cfg.tls_files == (tmp_path / "certs" / "server-cert.pem",
                                                  tmp_path / "certs" / "server-key.pem", tmp_path / "certs" / "ca-cert.pem")
    argv = nbdkit_command(cfg, tmp_path / "pid", tmp_path / "nbdkit.sock")
    assert argv[argv.index("--unix") + 1] == str(tmp_path / "nbdkit.sock")
    assert "--port" not in argv and "--ipaddr" not in argv
    assert ServeConfig("ds1", tmp_path, Endpoint("h", 1), Endpoint("h", 2), 15.0).insecure
