"""The web client's files (kvmotion/center/web/, package data), served at / and /ui/NAME.

Public: they hold no data (the page asks the API for everything, as its signed-in user). Each
answer forbids inline scripts and other origins (Content-Security-Policy), framing and sniffing;
the files are revalidated on every load (ETag), so an upgraded center serves its own page at once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Path, Request
from fastapi.responses import Response

from kvmotion.core.errors import NotFound

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml"}
FILE_PATTERN = r"^[a-z][a-z0-9_-]{0,40}\.(js|css|svg)$"


@dataclass(frozen=True)
class WebFile:
    body: bytes
    media_type: str
    etag: str


def load_files() -> dict[str, WebFile]:
    """Every file of the web folder, read once."""
    out = {}
    for entry in resources.files("kvmotion.center").joinpath("web").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            body = entry.read_bytes()
            out[entry.name] = WebFile(body, TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


def headers(file: WebFile) -> dict[str, str]:
    return {"content-security-policy": CSP, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "no-referrer", "cache-control": "no-cache", "etag": file.etag}


def answer(file: WebFile, request: Request) -> Response:
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers(file))
    return Response(file.body, media_type=file.media_type, headers=headers(file))


def install(app: FastAPI) -> None:
    files = load_files()

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        return answer(files["index.html"], request)

    @app.get("/ui/{name}", include_in_schema=False)
    def asset(request: Request, name: str = Path(pattern=FILE_PATTERN)) -> Response:
        file = files.get(name)
        if file is None or not re.fullmatch(FILE_PATTERN, name):
            raise NotFound(f"no web client file {name!r}")
        return answer(file, request)
