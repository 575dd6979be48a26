"""`kvmotion vm create` with a bad spec: one line on stderr, a non-zero exit, nothing created and no
agent asked (the spec is checked before any host is looked up)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmotion.cli.main import main

MAC = "52:54:00:12:34:56"


def _run(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    for var, sub in (("KVMOTION_CONFIG", "config"), ("KVMOTION_STATE", "state"), ("KVMOTION_RUN", "run")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(sys, "argv", ["kvmotion", "vm", "create", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    return int(exit_.value.code or 0), err


@pytest.mark.parametrize("args, says", [
    (["--nic", f"pg=vm-net,mac={MAC},romfile=/etc/shadow"], "invalid NIC"),
    (["--cpu-model", "qemu64,+vmx"], "invalid VM spec: cpu_model: invalid CPU model 'qemu64,+vmx'"),
    (["--nic", f"pg=vm-net,mac={MAC},ip=1.2.3.4/24 init=/bin/sh"], "invalid NIC: ip: invalid NIC address"),
    (["--disk", "../../../../etc/shadow"], "invalid disk: source: invalid local disk"),
    (["--disk", "/dev/sda"], "invalid disk: source: invalid local disk '/dev/sda'"),
    (["--vcpus", "65"], "invalid VM spec: vcpus: vCPU count 65 is out of range"),
    (["--mem-stride", "3"], "invalid workload parameters: mem_stride: "),
    (["--workload", "echo,echo"], "invalid VM spec: workloads: a workload is listed twice"),
])
def test_bad_input_is_one_line_and_creates_nothing(args: list[str], says: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, err = _run(["web1", *args], tmp_path, monkeypatch, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"kvmotion: error: {says}"), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_good_spec_gets_as_far_as_asking_the_center(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, err = _run(["web1", "--disk", "web1.img:1G", "--nic", f"pg=vm-net,mac={MAC},ip=10.0.0.2/24"],
                     tmp_path, monkeypatch, capsys)
    assert code == 3 and "no login config at" in err and "kvmotion login" in err, err
