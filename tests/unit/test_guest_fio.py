"""kvm-fio compiled and run natively on a temp file (O_DIRECT needs a real file system), and its line parser."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvmotion.core.errors import InvalidInput
from kvmotion.guest.fio import FioError, FioMode, FioResult, fio_command, parse_fio_line
from kvmotion.guest.image import SOURCES


@pytest.fixture(scope="module")
def kvm_fio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("fio-bin") / "kvm-fio"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCES / "kvm-fio.c")],
                   check=True)
    return exe


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    probe = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    return path


@pytest.mark.parametrize("mode", list(FioMode))
def test_each_mode_reports_one_result(kvm_fio: Path, image: Path, mode: FioMode) -> None:
    argv = [str(kvm_fio), *fio_command(mode, str(image), 4096, 1, 4 << 20).split()[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stdout + out.stderr
    results = [r for r in map(parse_fio_line, out.stdout.splitlines()) if r is not None]
    assert len(results) == 1 and isinstance(results[0], FioResult), out.stdout
    r = results[0]
    assert (r.mode, r.bs) == (mode, 4096) and r.ops > 0 and 0.9 < r.seconds < 2.0
    assert r.iops == pytest.approx(r.ops / r.seconds, rel=0.01)
    assert r.mb_s == pytest.approx(r.iops * 4096 / 1e6, rel=0.01)


def test_writes_stay_in_the_span(kvm_fio: Path, image: Path) -> None:
    subprocess.run([str(kvm_fio), "randwrite", str(image), "4096", "1", str(1 << 20)], check=True, capture_output=True)
    data = image.read_bytes()
    assert data[: 1 << 20].count(0x5A) > 0
    assert data[1 << 20 :].count(0) == len(data) - (1 << 20)


def test_errors_are_one_line(kvm_fio: Path, tmp_path: Path) -> None:
    out = subprocess.run([str(kvm_fio), "seqread", str(tmp_path / "missing"), "4096", "1"], capture_output=True, text=True)
    assert out.returncode == 1
    err = parse_fio_line(out.stdout.strip())
    assert isinstance(err, FioError) and err.mode == "seqread" and "No such file" in err.message
    bad = subprocess.run([str(kvm_fio), "seqread", "/dev/null", "100", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 512" in bad.stderr


def test_parser_and_command() -> None:
    line = "\x1b[6nstbench# KVMOTION FIO randread bs=4096 MB/s=12.50 iops=3052 ops=15260 seconds=5.000\r"
    assert parse_fio_line(line) == FioResult(FioMode.RANDREAD, 4096, 12.5, 3052.0, 15260, 5.0)
    assert parse_fio_line("kvm-fio randread /dev/vda 4096 5") is None  # the shell's echo of the command
    assert fio_command(FioMode.SEQWRITE, "/dev/vdb", 65536, 5) == "kvm-fio seqwrite /dev/vdb 65536 5"
    with pytest.raises(InvalidInput):
        fio_command(FioMode.SEQWRITE, "/dev/vdb", 1000, 5)
