"""pydantic validation errors -> kvmotion's one-line InvalidInput (CLI, agent API, stored files).

One message names the first wrong field by its path ("nics.0.mac") and what is wrong with it;
further errors are counted, not listed, so the message stays one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from kvmotion.core.errors import InvalidInput

_SHOWN_INPUT = 60  # characters of a refused value quoted in a message

# pydantic's wording for a few error kinds, made to read as an answer to the user.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
}


_PLAIN_PART = re.compile(r"[A-Za-z0-9_-]+")


def _path(loc: Sequence[Any]) -> str:
    """'nics.0.mac'; a part the caller named (an unknown key may be any text) is quoted as repr quotes it."""
    return ".".join(text if _PLAIN_PART.fullmatch(text := str(part)) else repr(text) for part in loc)


def _shown(value: object) -> str:
    text = repr(value)  # repr escapes newlines and control characters: the line stays one line
    return text if len(text) <= _SHOWN_INPUT else text[: _SHOWN_INPUT - 3] + "..."


def describe_error(error: Mapping[str, Any]) -> str:
    """'nics.0.mac: invalid MAC ...' for one pydantic (or FastAPI) error entry."""
    kind = error.get("type", "")
    msg = str(error.get("msg", "is invalid"))
    if kind in _MESSAGES:
        msg = _MESSAGES[kind]
    elif kind in ("value_error", "assertion_error"):
        # Our own validators' messages quote the value already.
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif "input" in error and not isinstance(error["input"], (dict, list, tuple)):
        msg = f"{msg} (got {_shown(error['input'])})"
    msg = " ".join(msg.split())
    path = _path(error.get("loc", ()))
    return f"{path}: {msg}" if path else msg


def describe_errors(errors: Sequence[Mapping[str, Any]], what: str) -> str:
    """'invalid WHAT: FIELD: PROBLEM' (+ how many more problems there are)."""
    if not errors:
        return f"invalid {what}"
    line = f"invalid {what}: {describe_error(errors[0])}"
    if len(errors) > 1:
        more = len(errors) - 1
        line += f" (and {more} more problem{'s' if more > 1 else ''})"
    return line


def invalid_input(exc: ValidationError, what: str) -> InvalidInput:
    """The InvalidInput to raise for a refused `what` ('VM spec', 'migration options', ...)."""
    return InvalidInput(describe_errors(exc.errors(include_url=False), what))


_REQUEST_PARTS = {"body": None, "query": "query parameter", "path": "path parameter", "header": "header"}


def describe_request_errors(errors: Sequence[Mapping[str, Any]], body: str = "request body") -> str:
    """One line for a refused HTTP request (FastAPI's RequestValidationError.errors()).

    Paths are given inside their part: 'invalid VM spec: nics.0.mac: ...' for the body (named
    `body`), 'invalid query parameter: timeout: ...' for the query string."""
    if not errors:
        return "invalid request"
    first = dict(errors[0])
    loc = tuple(first.get("loc", ()))
    what = "request"
    if loc and loc[0] in _REQUEST_PARTS:
        what = _REQUEST_PARTS[loc[0]] or body
        first["loc"] = loc[1:]
    if first.get("type") == "json_invalid":  # loc holds the character position, not a field
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        where = f" at character {first['loc'][0]}" if first["loc"] else ""
        first.update(loc=(), type="value_error", msg=f"not valid JSON ({reason}{where})")
    return describe_errors([first, *errors[1:]], what)
