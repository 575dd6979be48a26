"""The client probe across a lab: it measures an outage it is shown, and nothing else."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from kvmotion.net import lab, links, netns
from kvmotion.net.probe import ProbeReport, largest_gap_outside

pytestmark = pytest.mark.lab

if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

PORT = 7000


@pytest.fixture
def guest(tmp_path, monkeypatch):
    """A lab with an echo "guest" namespace behind host-a's port-group bridge."""
    monkeypatch.setenv("KVMOTION_RUN", str(tmp_path / "run"))
    topo = lab.lab_up(f"p{os.getpid() % 10000}{uuid.uuid4().hex[:3]}", 2)
    try:
        host = topo.hosts[0]
        ns = f"kvl-{topo.name}-g1"
        netns.create_ns(ns)
        netns.create_veth("eth0", ns, "g1", host.ns)
        netns.run_in_ns(host.ns, links.enslave, "g1", host.vm_bridge)
        netns.add_address(ns, "eth0", f"{topo.vm_ip(0)}/{topo.vm_prefix}")
        echo = lab.spawn_in_ns(
            ns, [sys.executable, "-m", "kvmotion.net.probe", "--serve-echo", f"{topo.vm_ip(0)}:{PORT}"], tmp_path / "echo.log"
        )
        deadline = time.monotonic() + 10
        while "echo: serving" not in (tmp_path / "echo.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield topo, host, tmp_path
        echo.terminate()
        echo.wait(5)
    finally:
        lab.lab_down(topo.name)


def _probe(topo, tmp_path, *extra):
    out = tmp_path / "probe.json"
    proc = netns.popen_in_ns(
        topo.client.ns,
        [sys.executable, "-m", "kvmotion.net.probe", "--target", f"{topo.vm_ip(0)}:{PORT}", "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("probe: running"), proc.stderr.read()
    return proc, out


def test_probe_measures_an_outage_and_tcp_survives(guest):
    topo, host, tmp_path = guest
    proc, out = _probe(topo, tmp_path, "--duration", "3")
    time.sleep(1.0)
    # The outage: the guest's port leaves the bridge for 300 ms. (Not link down/up: carrier changes
    # reach the bridge through linkwatch, rate-limited to one per second for noqueue devices.)
    with netns.ns_iproute(host.ns) as ipr:
        port = ipr.link_lookup(ifname="g1")[0]
        bridge = ipr.link_lookup(ifname=host.vm_bridge)[0]
        down_at = time.monotonic()
        ipr.link("set", index=port, master=0)
        time.sleep(0.3)
        ipr.link("set", index=port, master=bridge)
        up_at = time.monotonic()
    assert proc.wait(timeout=15) == 0, proc.stderr.read()
    report = ProbeReport.from_json(out.read_text())
    gap = report.udp.largest_gap
    outage = (down_at - report.started_mono, up_at - report.started_mono)
    print(report.summary_line())
    assert 0.28 < gap.duration < 0.45
    assert gap.start == pytest.approx(outage[0], abs=0.05)
    assert report.tcp is not None and report.tcp.clean, report.tcp
    rest = largest_gap_outside(report.samples, [(outage[0] - 0.01, outage[1] + 0.02)])
    assert rest.duration < 0.1, rest  # generous: the machine is shared


def test_probe_stops_on_sigterm_and_reports(guest):
    topo, _, tmp_path = guest
    proc, out = _probe(topo, tmp_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    report = ProbeReport.from_json(out.read_text())
    assert 0.8 < report.duration_s < 2.0
    assert report.udp.sent > 500 and report.udp.lost == 0
    assert report.tcp is not None and report.tcp.clean


def test_probe_without_echo_service_fails_in_one_line(guest):
    topo, _, _tmp_path = guest
    proc = netns.popen_in_ns(
        topo.client.ns,
        [sys.executable, "-m", "kvmotion.net.probe", "--target", f"{topo.vm_ip(0)}:{PORT + 1}", "--duration", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 6  # Unreachable
    assert err.count("\n") == 1 and err.startswith("probe: error:")
    json.dumps(err)


def test_loopback_baseline_is_far_below_the_bars(tmp_path):
    """The probe's own jitter floor (no network, no migration) must sit well under 50 ms."""
    out = tmp_path / "baseline.json"
    run = subprocess.run(
        [sys.executable, "-m", "kvmotion.net.probe", "--baseline", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    report = ProbeReport.from_json(out.read_text())
    print(report.summary_line())
    assert report.udp.lost == 0 and report.tcp is not None and report.tcp.clean
    assert report.udp.largest_gap.duration < 0.05
