"""`kvmotion demo` end to end: every check holds (act 1's migrations and act 2's center at work),
the report has its shape, the lab is gone after, also when the demo is interrupted."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmotion.net import lab as labmod
from kvmotion.net import netns

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

CHECKS = {"memory_ok", "tcp_ok", "disk_ok", "fdb_ok", "single_copy_ok"}
FIGURES = ("total_ms", "downtime_ms", "pause_ms", "client_gap_ms", "rounds", "bytes")
LAB_RE = re.compile(r"lab (demo[0-9a-f]{6})")


def _demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmotion.cli.main", "demo", *args]


def _assert_gone(name: str) -> None:
    left = [ns for ns in netns.list_ns() if ns.startswith(f"{labmod.NS_PREFIX}{name}-")]
    assert not left, f"namespaces left behind: {left}"
    assert not netns.link_exists_in(None, f"{labmod.NS_PREFIX}{name}")
    assert not labmod.lab_dir(name).exists()


def _cleanup(name: str | None) -> None:
    if name and (labmod.lab_dir(name).exists() or labmod._leftover_namespaces(name)):
        labmod.lab_down(name)


ACT2_STEPS = ["drs", "maintenance", "move-back", "health-severe", "health-ok"]


def _assert_act2(doc: dict) -> None:
    """The center's act: each step held, DRS moved busy VMs and they got more work done, web1's moves
    there passed act 1's checks, and the timeline shows every host."""
    act2 = doc["act2"]
    assert [s["step"] for s in act2["steps"]] == ACT2_STEPS
    assert all(s["ok"] for s in act2["steps"]), json.dumps(act2, indent=1)
    drs, enter, back, severe, _ok = act2["steps"]
    assert drs["recommendations"] and drs["moves"] and all(m["state"] == "done" for m in drs["moves"])
    rates = drs["work_rates"]
    assert {w["vm"] for w in rates} == {"busy1", "busy2"}
    moved = [w for w in rates if w["host_after"] != w["host_before"]]
    assert moved and all(w["ratio"] is not None and w["ratio"] > 1 for w in moved), rates
    assert enter["plan"] and all(m["why"] and m["predicted_s"] for m in enter["plan"])
    assert any(m["vm"] == "web1" for m in enter["moves"]) and any(m["vm"] == "web1" for m in back["moves"])
    web1 = [m for s in act2["steps"] for m in s["migrations"]]
    assert len(web1) >= 2 and all(m["phase"] == "done" and all(m["checks"].values()) for m in web1), web1
    assert severe["host"] == "host-b"
    assert set(doc["timeline"]) == {"host-a", "host-b", "host-c"}
    on = {(st["vm"], h) for h, stays in doc["timeline"].items() for st in stays}
    assert {("busy1", enter["host"]), ("busy2", enter["host"])} & on  # booted beside web1


@pytest.mark.parametrize(("link", "compression", "act2"),
                         [("none", "none", True), pytest.param("1gbit", "zstd", False, marks=pytest.mark.slow)])
def test_demo_two_migrations(tmp_path: Path, link: str, compression: str, act2: bool) -> None:
    """Over a 1 Gbit/s link act 1 only (act 2 is the same whatever the link), to keep the time down."""
    report = tmp_path / "r.json"
    extra = () if act2 else ("--no-act2",)
    started = time.monotonic()
    proc = subprocess.run(
        _demo_argv("--memory", "256M", "--migrations", "2", "--link", link, "--report", str(report), *extra),
        capture_output=True, text=True, timeout=480 if act2 else 300,
    )
    print(f"\n{link}{' + act 2' if act2 else ''}: {time.monotonic() - started:.0f} s\n{proc.stdout}")
    m = LAB_RE.search(proc.stdout)
    name = m.group(1) if m else None
    try:
        assert report.exists(), f"no report; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        doc = json.loads(report.read_text())
        assert doc["lab"] == name
        assert doc["accel"] in ("tcg", "kvm")
        assert len(doc["migrations"]) == 2
        hops = [(mig["from"], mig["to"]) for mig in doc["migrations"]]
        assert hops == [("host-a", "host-b"), ("host-b", "host-c")]
        for mig in doc["migrations"]:
            assert set(mig["checks"]) == CHECKS
            assert all(isinstance(v, bool) for v in mig["checks"].values())
            for key in FIGURES:
                assert isinstance(mig[key], (int, float)) and mig[key] >= 0, (key, mig[key])
            assert isinstance(mig["converged"], bool)
            # over a 1 Gbit/s link the pages go compressed; every check above still has to hold
            assert mig["compression"] == compression
            assert [p["phase"] for p in mig["phases"]] == ["prepare", "precopy", "switchover", "commit"]
        assert doc["all_ok"] is True, json.dumps(doc["migrations"], indent=1) + proc.stdout[-3000:]
        if act2:
            _assert_act2(doc)
        else:
            assert doc["act2"] is None
        assert proc.returncode == 0, proc.stderr[-2000:]
        picture = Path(doc["picture"])
        assert picture == report.with_suffix(".svg") and picture.read_text().lstrip().startswith("<svg")
        assert "every check held" in proc.stdout
        _assert_gone(name)
    finally:
        _cleanup(name)


def test_demo_interrupted_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _demo_argv("--memory", "256M", "--migrations", "1", "--report", str(tmp_path / "r.json")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    name = None
    try:
        deadline = time.monotonic() + 120
        seen = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline:  # interrupt once the VM runs and the client probes it
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            m = LAB_RE.search(line)
            name = name or (m.group(1) if m else None)
            if "client probe" in line:
                break
        assert name, seen
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (seen + out, err)
        assert "interrupted" in err and "Traceback" not in err
        assert not (tmp_path / "r.json").exists()
        _assert_gone(name)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(name)
