"""tests/fuzz.py itself: each kind of bad answer, a write outside the allowed folders and a process
start are reported; a clean app passes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from kvmotion.api.serving import Security, secure
from kvmotion.core.errors import InvalidInput, NotFound
from tests.fuzz import error_problem, fuzz


class Body(BaseModel):
    size: int


def _app(inside: Path, outside: Path) -> FastAPI:
    app = FastAPI()

    @app.get("/ok/{name}")
    def ok(name: str, count: int = 0) -> dict:
        return {"name": name, "count": count}

    @app.post("/write")
    def write(body: Body) -> dict:
        (inside / f"{body.size}.txt").write_text("allowed")
        return {}

    @app.post("/crash")
    def crash(body: Body) -> dict:
        return {}[body.size]  # KeyError: 500

    @app.get("/lines")
    def lines() -> dict:
        raise InvalidInput("first line\nsecond line")

    @app.get("/internals")
    def internals() -> dict:
        raise NotFound("no such thing: kvmotion.core.errors.NotFoundError")

    @app.post("/outside")
    def escape(body: Body) -> dict:
        (outside / "stray.txt").write_text("not allowed")
        return {}

    @app.post("/spawn")
    def spawn() -> dict:
        subprocess.run(["true"], check=True)
        return {}

    return app


def _secured(app: FastAPI):  # type: ignore[no-untyped-def]
    return secure(app, Security(tls_files=None, audit_log=None, insecure=True), "test")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    report = fuzz(_secured(_app(inside, outside)), roots=[inside], examples=5)
    failed = {failure.split(" [")[0]: failure for failure in report.failures}
    assert set(failed) == {"POST /crash", "GET /lines", "GET /internals"}, report.failures
    assert "server error" in failed["POST /crash"]
    assert "more than one line" in failed["GET /lines"]
    assert "Python internals" in failed["GET /internals"]
    assert {(c.event, c.path) for c in report.outside} == {("open for writing", str((outside / "stray.txt").resolve()))}
    assert report.spawns and all(s.startswith("subprocess.Popen") for s in report.spawns)
    assert any(inside.iterdir())  # writes inside the roots happened, unreported
    with pytest.raises(AssertionError, match="outside the allowed folders"):
        report.assert_clean(min_requests=1)


def test_a_clean_app_passes_and_is_counted(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    app = FastAPI()

    @app.get("/ok/{name}")
    def ok(name: str, count: int = 0) -> dict:
        return {"name": name, "count": count}

    report = fuzz(_secured(app), roots=[inside], examples=20)
    report.assert_clean(min_requests=30)  # two modes, up to 20 examples each
    assert report.per_operation["GET /ok/{name}"] == report.requests
    with pytest.raises(AssertionError, match="fewer than"):
        report.assert_clean(min_requests=report.requests + 1)


@pytest.mark.parametrize("body, problem", [
    (b'{"error": {"kind": "NotFound", "message": "no VM named web1 on host host-a"}}', None),
    (b'{"detail": "Not Found"}', 'the body is not {"error": {"kind", "message"}}'),
    (b'{"error": "NotFound", "message": "no VM"}', 'the body is not {"error": {"kind", "message"}}'),
    (b'{"error": {"kind": "KeyError", "message": "web1"}}', "error kind 'KeyError' is no kvmotion error"),
    (b'{"error": {"kind": "NotFound", "message": " "}}', "the message is empty"),
    (b'{"error": {"kind": "KvmotionError", "message": "Traceback (most recent call last):"}}',
     "the message shows Python internals ('Traceback')"),
    (b'<html>', "the body is not JSON"),
])
def test_error_bodies(body: bytes, problem: str | None) -> None:
    assert error_problem(body) == problem


def test_an_echoed_value_is_no_leak() -> None:
    body = b'{"error": {"kind": "NotFound", "message": "no VM named \'<class \'"}}'
    assert error_problem(body, echoable={"<class '"}) is None
    assert error_problem(body) == "the message shows Python internals (\"<class '\")"
