"""Every benchmark script still imports: they run rarely and no type checker covers bench/, so a
renamed or removed kvmotion name would otherwise surface only on the next measurement."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py"))


def test_the_bench_folder_was_found() -> None:
    assert {"compare", "center", "harness", "storage"} <= set(BENCH)


@pytest.mark.parametrize("name", BENCH)
def test_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert module.__file__ is not None and module.__file__.endswith(f"bench/{name}.py")
