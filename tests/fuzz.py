"""Property-based fuzzing of a kvmotion HTTP API from its own OpenAPI document, in-process.

`fuzz(app, roots=..., examples=N)` loads the app's /openapi.json through schemathesis' ASGI client
(no sockets), lets hypothesis generate N requests per operation and generation mode (requests the
document allows, and requests it does not), sends each to the app (already wrapped by
kvmotion.api.serving.secure) and checks every answer:
- no 5xx (but for the error kinds a test's stand-ins raise on purpose, `allowed_5xx`);
- every 4xx (and allowed 5xx) is the shared error shape {"error": {"kind", "message"}}: a kvmotion
  error class and one line of text, no traceback, no Python exception path;
- no traceback in any body.
Meanwhile an audit hook records every file-system change (opens for writing, mkdir, rename,
unlink, rmdir, symlink, truncate, chmod, chown, ...) and every process start of the whole
process (but the thread driving the run: hypothesis and schemathesis, not the app); each change
must resolve inside `roots`, and no process may start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.internal.conjecture import providers as hypothesis_providers
from hypothesis.internal.floats import float_to_int
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET
from schemathesis.python import asgi as schemathesis_asgi

from kvmotion.api.serving import MUTATING
from kvmotion.core import errors


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def error_kinds() -> frozenset[str]:
    """The kinds an error answer may name: kvmotion's error classes (those imported by now)."""
    return frozenset({errors.KvmotionError.__name__, *(c.__name__ for c in _subclasses(errors.KvmotionError))})


# ---- what the process changes on disk or starts, while a fuzz run records ----------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> the (path argument, dir_fd argument) pairs it changes, and whether it acts
# through a symlink at the path (then the symlink's target must be inside the roots as well).
_CHANGES: dict[str, tuple[tuple[tuple[int, int | None], ...], bool]] = {
    "os.mkdir": (((0, 2),), False),
    "os.rmdir": (((0, 1),), False),
    "os.remove": (((0, 1),), False),  # os.unlink too
    "os.rename": (((0, 2), (1, 3)), False),  # os.replace too
    "os.link": (((1, 3),), False),
    "os.symlink": (((1, 2),), False),
    "os.mkfifo": (((0, 2),), False),
    "os.mknod": (((0, 3),), False),
    "os.truncate": (((0, None),), True),  # os.ftruncate too (an fd)
    "os.chmod": (((0, 2),), True),  # os.fchmod too
    "os.chown": (((0, 3),), True),  # os.fchown too
    "os.utime": (((0, 3),), True),
    "os.chflags": (((0, None),), True),
    "os.setxattr": (((0, None),), True),
    "os.removexattr": (((0, None),), True),
    "shutil.rmtree": (((0, 1),), False),
    "shutil.copyfile": (((1, None),), True),
    "shutil.copytree": (((1, None),), False),
    "shutil.move": (((0, None), (1, None)), False),
}
_SPAWNS = frozenset({"subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                     "os.system", "pty.spawn"})


@dataclass(frozen=True)
class Change:
    event: str
    path: str  # absolute, symlinks of its folders resolved


class _Recording:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.spawns: list[str] = []
        # The thread driving the run: hypothesis and schemathesis work there (hypothesis caches what it
        # learns under .hypothesis/); the app runs on the ASGI client's event-loop thread and its workers.
        self.driver = threading.get_ident()


_recording: _Recording | None = None  # the audit hook is a no-op unless a fuzz run is recording
_in_hook = threading.local()


def _fd_target(fd: int) -> str | None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"
    return target if target.startswith("/") else None  # a pipe, socket or anonymous inode: no file


def _where(path: Any, dir_fd: Any, follow: bool) -> list[str]:
    """Where an operation on `path` (relative to `dir_fd`) lands: the entry (its folder resolved),
    and for an operation that follows symlinks also the final target."""
    if isinstance(path, int):
        target = _fd_target(path)
        return [target] if target is not None else []
    text = os.fsdecode(os.fspath(path))
    if not os.path.isabs(text):
        base = _fd_target(dir_fd) if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
        text = os.path.join(base or "<unknown folder>", text)
    folder, name = os.path.split(os.path.normpath(text))
    out = [os.path.join(os.path.realpath(folder), name)]
    if follow:
        out.append(os.path.realpath(text))
    return out


def _hook(event: str, args: tuple) -> None:
    recording = _recording
    if recording is None or getattr(_in_hook, "busy", False) or threading.get_ident() == recording.driver:
        return
    _in_hook.busy = True
    try:
        if event in _SPAWNS:
            recording.spawns.append(f"{event} {args[:2]!r}"[:300])
        elif event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS:
                for where in _where(path, None, not flags & os.O_NOFOLLOW):
                    recording.changes.append(Change("open for writing", where))
        elif event == "socket.bind":
            address = args[1]
            if isinstance(address, (str, bytes)) and address and address[:1] not in ("\0", b"\0"):
                for where in _where(address, None, False):  # a unix socket's file
                    recording.changes.append(Change(event, where))
        elif event in _CHANGES:
            pairs, follow = _CHANGES[event]
            for path_at, dir_fd_at in pairs:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
                for where in _where(args[path_at], dir_fd, follow):
                    recording.changes.append(Change(event, where))
    except Exception as exc:  # noqa: BLE001 - an audit hook must never fail the operation it watches
        recording.changes.append(Change(event, f"<unresolved: {exc!r}>"))
    finally:
        _in_hook.busy = False


sys.addaudithook(_hook)  # for the life of the process (hooks cannot be removed); idle unless recording


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


# ---- who calls -------------------------------------------------------------------------------------
class Presenting:
    """`app` as reached by a client presenting the certificate `pem` (set before each request), the
    way the TLS listener hands it over (tests/certs.as_caller, switchable between requests)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pem: str | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.pem is not None and scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [self.pem]}
        await self.app(scope, receive, send)


# ---- what every answer must be ---------------------------------------------------------------------
_EXCEPTION_PATH = re.compile(r"\b(?:[a-z_][a-z0-9_]*\.)+_?[A-Z]\w*(?:Error|Exception|Warning)\b")
_PYTHON_LEAKS = ("Traceback", "<class '", 'File "', "Exception Group")


def leak_signs(text: str) -> set[str]:
    """The signs of Python internals in `text`: a traceback, a class repr, an exception's module path."""
    return {leak for leak in _PYTHON_LEAKS if leak in text} | set(_EXCEPTION_PATH.findall(text))


def python_leak(text: str, echoable: Iterable[str] = ()) -> str | None:
    """A sign of Python internals in `text` that no request brought itself (`echoable`: the signs
    requests of the run carried; an answer may echo what any caller sent, now or stored before)."""
    return next(iter(sorted(leak_signs(text) - set(echoable))), None)


def error_problem(content: bytes, echoable: Iterable[str] = ()) -> str | None:
    """What is wrong with an error answer's body (None: the shared shape, one clean line)."""
    try:
        body = json.loads(content)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict) \
            or set(body["error"]) != {"kind", "message"}:
        return 'the body is not {"error": {"kind", "message"}}'
    kind, message = body["error"]["kind"], body["error"]["message"]
    if kind not in error_kinds():
        return f"error kind {kind!r} is no kvmotion error"
    if not isinstance(message, str) or not message.strip():
        return "the message is empty"
    if "\n" in message or "\r" in message:
        return "the message is more than one line"
    leak = python_leak(message, echoable)
    if leak is not None:
        return f"the message shows Python internals ({leak!r})"
    return None


def error_kind(content: bytes) -> str | None:
    try:
        return json.loads(content)["error"]["kind"]
    except (ValueError, KeyError, TypeError):
        return None


# Reproducible (derandomize: the same requests every run, no example database); requests take
# milliseconds, so no deadline; generating from the schema may filter much (negative mode) and
# make large bodies, which is the point here.
SETTINGS = settings(derandomize=True, database=None, deadline=None, print_blob=False, verbosity=Verbosity.quiet,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink),
                    suppress_health_check=(HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example))


@contextlib.contextmanager
def _same_requests_in_any_process() -> Iterable[None]:
    """Hypothesis mixes into its data constants it finds in the local modules loaded so far, so the
    requests would depend on which tests ran before in the process: leave those out (the run then
    generates the same requests alone or in the whole suite). Its own constants stay. Private
    hypothesis names: pinned version, checked by its use here."""
    empty = hypothesis_providers.Constants(
        integers=hypothesis_providers.SortedSet(), floats=hypothesis_providers.SortedSet(key=float_to_int),
        bytes=hypothesis_providers.SortedSet(), strings=hypothesis_providers.SortedSet())
    mined = hypothesis_providers._get_local_constants
    hypothesis_providers._get_local_constants = lambda: empty
    hypothesis_providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        hypothesis_providers._get_local_constants = mined
        hypothesis_providers.CONSTANTS_CACHE.cache.clear()


# ---- the run --------------------------------------------------------------------------------------
@dataclass
class FuzzReport:
    requests: int = 0
    per_operation: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    by_operation_status: Counter = field(default_factory=Counter)  # (operation, status) -> requests
    allowed_5xx: Counter = field(default_factory=Counter)  # error kinds answered with 5xx on purpose
    failures: list[str] = field(default_factory=list)  # one per operation and mode: hypothesis' smallest example
    outside: list[Change] = field(default_factory=list)
    spawns: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.1f} s over {len(self.per_operation)} operations; "
                f"statuses {dict(sorted(self.statuses.items()))}"
                + (f"; on purpose {dict(self.allowed_5xx)}" if self.allowed_5xx else ""))

    def table(self) -> str:
        """Requests per operation and status, one line per operation."""
        lines = []
        for label in self.per_operation:
            counts = sorted((status, n) for (op, status), n in self.by_operation_status.items() if op == label)
            lines.append(f"{label:40} " + " ".join(f"{status}:{n}" for status, n in counts))
        return "\n".join(lines)

    def assert_clean(self, min_requests: int) -> None:
        problems = list(self.failures)
        problems += [f"{c.event} outside the allowed folders: {c.path}" for c in dict.fromkeys(self.outside)]
        problems += [f"a process was started: {s}" for s in dict.fromkeys(self.spawns)]
        if self.requests < min_requests:
            problems.append(f"only {self.requests} requests were generated, fewer than {min_requests}")
        assert not problems, "\n\n".join([self.summary(), *problems])


def _describe(case: Any, status: int, content: bytes) -> str:
    body = "" if case.body is NOT_SET else f" body={json.dumps(case.body, default=repr)[:400]}"
    query = f" query={case.query}" if case.query else ""
    return (f"{case.method} {case.formatted_path}{query}{body} -> {status} "
            f"{content[:400].decode(errors='replace')}")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _sent(response: Any) -> str:
    """What the request brought, decoded (path, query, body and the strings in a JSON body): what
    an answer may echo."""
    request = response.request
    body = request.body or b""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        text += "\0".join(_strings(json.loads(text)))
    except ValueError:
        pass
    return unquote(str(request.url)) + "\0" + text


def _merged(body: dict, fields: Mapping[str, object]) -> dict:
    """`body` with `fields` set; a mapping of fields goes into the body's object of that name."""
    out = dict(body)
    for name, value in fields.items():
        inner = out.get(name)
        out[name] = _merged(inner, value) if isinstance(value, Mapping) and isinstance(inner, dict) else value
    return out


def label_of(operation: Any) -> str:
    """An operation as `caller`, `bodies` and the report name it: "POST /v1/vms/{name}/start"."""
    return f"{operation.method.upper()} {operation.path}"


def routed(response: Any) -> bool:
    """Whether a request reached a route (a path no route matches, or a body over the limit, is
    answered before any caller check)."""
    if response.status_code == 413:
        return False
    return not (response.status_code in (404, 405) and "see /openapi.json" in response.content.decode(errors="replace"))


def changes_refused(allowed: frozenset[str] = frozenset()) -> Callable[[Any, Any], str | None]:
    """An `expect` for a caller who may read but not change: every call that changes something is
    refused (403), but on the `allowed` operations (answered as they decide); no read is refused."""

    def expect(case: Any, response: Any) -> str | None:
        if not routed(response) or label_of(case.operation) in allowed:
            return None
        if case.method.upper() in MUTATING:
            return None if response.status_code == 403 else "a change not refused"
        return "a read refused" if response.status_code in (401, 403) else None

    return expect


def fuzz(
    app: Any,
    *,
    roots: Sequence[Path],
    examples: int,
    caller: Callable[[str], str | None] = lambda label: None,
    known: Mapping[str, Sequence[str]] | None = None,
    bodies: Mapping[str, Mapping[str, object]] | None = None,
    expect: Callable[[Any, Any], str | None] | None = None,
    allowed_5xx: frozenset[str] = frozenset(),
    modes: Sequence[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    timeout: float = 30.0,
) -> FuzzReport:
    """Fuzz every operation of `app`'s OpenAPI document `examples` times per mode.

    caller: operation label ("POST /v1/vms/{name}/start") -> the PEM certificate its requests present.
    known: path parameter -> values naming objects that exist (half of the requests use one of them).
    bodies: operation label -> JSON body fields set on half of its generated object bodies (a
        mapping of fields is merged into the generated object of that name).
    expect: an extra check of (case, response): None, or what is wrong.
    allowed_5xx: error kinds a test's stand-ins raise on purpose, answered with a 5xx.
    Operations that delete run last, so that what `known` names exists for the others."""
    global _recording
    known = known or {}
    bodies = bodies or {}
    report = FuzzReport()
    presenting = Presenting(app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", presenting)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    allowed_roots = [os.path.realpath(root) for root in roots]
    echoable: set[str] = set()  # signs of Python internals that requests carried (answers may echo them)

    def strategy_for(operation: Any, mode: GenerationMode) -> st.SearchStrategy:
        options = [operation.as_strategy(generation_mode=mode)]
        for param in operation.path_parameters:
            for value in known.get(param.name, ()):
                options.append(operation.as_strategy(generation_mode=mode, path_parameters={param.name: value}))
        cases = st.one_of(options[0], st.one_of(options[1:])) if len(options) > 1 else options[0]
        fields = bodies.get(label_of(operation))
        if not fields:
            return cases

        def with_fields(pair: tuple[Any, bool]) -> Any:
            case, overlay = pair
            if overlay and isinstance(case.body, dict):
                case.body = _merged(case.body, fields)
            return case

        return st.tuples(cases, st.booleans()).map(with_fields)

    def check(case: Any, client: Any) -> None:
        label = label_of(case.operation)
        presenting.pem = caller(label)
        report.requests += 1
        report.per_operation[label] += 1
        try:
            response = case.call(session=client, timeout=timeout)
        except Exception as exc:  # an ASGI test client re-raises what the app did not handle (answered 500)
            report.statuses[500] += 1
            report.by_operation_status[label, 500] += 1
            raise AssertionError(f"server error: {_describe(case, 500, b'')}the app raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        status, content = response.status_code, response.content
        report.statuses[status] += 1
        report.by_operation_status[label, status] += 1
        what = _describe(case, status, content)
        echoable.update(leak_signs(_sent(response)))
        if status >= 500:
            kind = error_kind(content)
            assert kind in allowed_5xx, f"server error: {what}"
            report.allowed_5xx[kind] += 1
        if status >= 400:
            problem = error_problem(content, echoable)
            assert problem is None, f"{problem}: {what}"
        else:
            leak = python_leak(content.decode(errors="replace"), echoable)
            assert leak is None, f"Python internals in the body ({leak!r}): {what}"
        if expect is not None:
            problem = expect(case, response)
            assert problem is None, f"{problem}: {what}"

    started = time.monotonic()
    recording = _Recording()
    bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # imports made while recording must not write __pycache__ files
    _recording = recording
    try:
        with _same_requests_in_any_process(), schemathesis_asgi.get_client(presenting) as client:  # starts the lifespan
            try:
                for operation in operations:
                    for mode in modes:
                        @settings(SETTINGS, max_examples=examples)
                        @given(case=strategy_for(operation, mode))
                        def run(case: Any) -> None:
                            check(case, client)

                        try:
                            run()
                        except Unsatisfiable:
                            pass  # nothing to break: an operation without parameters or body has no wrong request
                        except Exception as exc:  # noqa: BLE001 - hypothesis' smallest failing example(s) for this operation
                            notes = "\n".join(getattr(exc, "__notes__", ()))
                            report.failures.append(f"{label_of(operation)} [{mode.value}]: {exc}\n{notes}".strip())
            finally:
                schemathesis_asgi.shutdown_lifespans()  # the app's shutdown is part of what is recorded
    finally:
        _recording = None
        sys.dont_write_bytecode = bytecode
    report.seconds = time.monotonic() - started
    report.outside = [c for c in recording.changes if not _inside(c.path, allowed_roots)]
    report.spawns = recording.spawns
    return report
