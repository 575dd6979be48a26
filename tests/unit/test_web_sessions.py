"""Browser sessions on the center's API: sign in with a password or a one-time sign-in token, the
cookie's flags, CSRF and cross-site refusals, roles applied as to certificates, sign out; the web
client's files and their headers; a VM's destinations and a migration's detail; the newest events
and the event stream's host loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kvmotion.api.center import EventKind, UserAdd
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.web import CSRF_HEADER, LOADS_EVENT, SESSION_COOKIE, SIGNIN_TTL, HostLoads
from tests.certs import as_caller
from tests.unit.test_center_api import ADMIN, Cluster
from tests.unit.test_center_tasks import add_host, load, run_vm

PASSWORD = "correct horse battery"


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    for name, free in (("host-a", 8 << 30), ("host-b", 12 << 30)):
        add_host(c.store, name, free=free)
    c.center.add_user(UserAdd(name="vera", role=Role.VIEWER, password=PASSWORD), ADMIN)
    c.center.add_user(UserAdd(name="otto", role=Role.OPERATOR, password=PASSWORD), ADMIN)
    yield c
    c.store.close()


def browser(c: Cluster) -> TestClient:
    """A client with no certificate, over https (the session cookie is Secure)."""
    return TestClient(as_caller(c.secured, None), base_url="https://testserver")


def sign_in(http: TestClient, user: str, password: str = PASSWORD) -> str:
    r = http.post("/v1/sessions", json={"user": user, "password": password})
    assert r.status_code == 200, r.text
    return r.json()["csrf"]


def one_line_error(r, status: int, pattern: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and re.search(pattern, message), message


def test_password_session_cookie_csrf_and_roles(cluster: Cluster) -> None:
    with browser(cluster) as http:
        one_line_error(http.get("/v1/hosts"), 401, "no client certificate")
        one_line_error(http.post("/v1/sessions", json={"user": "otto", "password": "wrong password!"}), 401,
                       "wrong user name or password")
        one_line_error(http.post("/v1/sessions", json={"user": "otto"}), 422, "a user and a password, or a sign-in token")
        r = http.post("/v1/sessions", json={"user": "otto", "password": PASSWORD})
        assert r.status_code == 200 and r.json()["role"] == "operator"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "Secure" in cookie
        assert "SameSite=strict" in cookie and "Path=/" in cookie
        csrf = r.json()["csrf"]
        assert [h["name"] for h in http.get("/v1/hosts").json()] == ["host-a", "host-b"]
        assert http.get("/v1/sessions/current").json()["user"] == "otto"

        body = {"vm": "nope"}
        one_line_error(http.post("/v1/migrations", json=body), 403, f"missing or wrong {CSRF_HEADER}")
        one_line_error(http.post("/v1/migrations", json=body, headers={CSRF_HEADER: "x" * 40}), 403, "CSRF token")
        one_line_error(http.post("/v1/migrations", json=body, headers={CSRF_HEADER: csrf, "sec-fetch-site": "cross-site"}),
                       403, "refused a cross-site request")
        one_line_error(http.post("/v1/migrations", json=body, headers={CSRF_HEADER: csrf, "origin": "https://evil.test"}),
                       403, "origin 'https://evil.test'")
        # with its token the call passes authorization and reaches the route (which refuses the VM)
        one_line_error(http.post("/v1/migrations", json=body, headers={CSRF_HEADER: csrf}), 422, "unknown VM nope")
        # an operator's session is no admin
        one_line_error(http.post("/v1/tokens", json={}, headers={CSRF_HEADER: csrf}), 403,
                       r"user:otto \(operator\) may not manage the cluster")

        assert http.delete("/v1/sessions/current", headers={CSRF_HEADER: csrf}).status_code == 204
        http.cookies.set(SESSION_COOKIE, cookie.split(";")[0].split("=", 1)[1], domain="testserver.local")
        one_line_error(http.get("/v1/hosts"), 401, "session expired or signed out")

    with browser(cluster) as http:
        csrf = sign_in(http, "vera")
        one_line_error(http.post("/v1/migrations", json={"vm": "nope"}, headers={CSRF_HEADER: csrf}), 403,
                       r"user:vera \(viewer\) may not change VMs")
    audit = [e for e in cluster.audit() if e["path"] == "/v1/migrations"]
    assert {e["who"] for e in audit} >= {"user:otto (operator)", "user:vera (viewer)"}


def test_signin_token_is_one_time_and_for_the_callers_own_user(cluster: Cluster) -> None:
    otto = Identity(Kind.USER, "otto", Role.OPERATOR)
    with cluster.client(otto) as cli:
        made = cli.post("/v1/sessions/signin")
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        assert made.json()["path"] == f"/#signin={token}"
        stale = cli.post("/v1/sessions/signin").json()["token"]
    with cluster.client(Identity(Kind.HOST, "host-a")) as host:
        one_line_error(host.post("/v1/sessions/signin"), 403, "host:host-a is not a user")
    with browser(cluster) as http:
        r = http.post("/v1/sessions", json={"token": token})
        assert r.status_code == 200 and (r.json()["user"], r.json()["role"]) == ("otto", "operator")
        assert http.get("/v1/vms").status_code == 200
    with browser(cluster) as http:
        one_line_error(http.post("/v1/sessions", json={"token": token}), 401, "unknown, used or expired sign-in token")
        cluster.clock.now += SIGNIN_TTL + 1
        one_line_error(http.post("/v1/sessions", json={"token": stale}), 401, "unknown, used or expired")
    assert cluster.store.session("0" * 64) is None


def test_web_client_files_and_headers(cluster: Cluster) -> None:
    with browser(cluster) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-cache"
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts and all('src="/ui/' in s for s in scripts)  # no inline script
        assert "style=" not in page.text
        js = http.get("/ui/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert http.get("/ui/app.js", headers={"if-none-match": js.headers["etag"]}).status_code == 304
        one_line_error(http.get("/ui/nothing.js"), 404, "no web client file")
        assert http.get("/ui/..%2fapp.py").status_code in (404, 422)


def test_destinations_and_migration_detail(cluster: Cluster) -> None:
    run_vm(cluster.store, "web1", "host-a")
    with browser(cluster) as http:
        csrf = sign_in(http, "otto")
        found = http.get("/v1/vms/web1/destinations").json()
        assert found["source"] == "host-a" and found["chosen"] == "host-b"
        (dest,) = found["destinations"]
        assert dest["host"] == "host-b" and dest["verdict"] in ("pass", "warning") and dest["score"] is not None
        cluster.store.set_host_mode("host-b", cluster.store.host("host-b").mode.__class__("maintenance"), "test",
                                    "test", cluster.clock())
        (dest,) = http.get("/v1/vms/web1/destinations").json()["destinations"]
        assert dest["verdict"] == "error" and "host-b is in maintenance" in dest["reasons"]
        one_line_error(http.get("/v1/vms/nope/destinations"), 404, "no VM nope")
        cluster.store.set_host_mode("host-b", cluster.store.host("host-b").mode.__class__("normal"), "test", "test",
                                    cluster.clock())
        started = http.post("/v1/migrations", json={"vm": "web1", "destination": "host-b"}, headers={CSRF_HEADER: csrf})
        assert started.status_code == 202, started.text
        task_id = started.json()["task"]["id"]
        detail = http.get(f"/v1/tasks/{task_id}/migration").json()
        assert detail["task"]["id"] == task_id and detail["phase"] == "" and detail["rounds"] == []


def test_event_stream_resumes_after_last_event_id(cluster: Cluster) -> None:
    with browser(cluster) as http:
        sign_in(http, "vera")
        newest = http.get("/v1/events", params={"limit": 1000}).json()["next"]
        with http.stream("GET", "/v1/events", params={"follow": 1}, headers={"last-event-id": str(newest - 1)}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(line for line in r.iter_lines() if line.startswith("id: "))
        assert first == f"id: {newest}"  # only what came after the id the browser had


def test_newest_events_and_the_hosts_loads_on_the_stream(cluster: Cluster) -> None:
    for i in range(40):
        cluster.store.add_event(cluster.clock(), EventKind.DRIFT, "vm:web1", f"drift {i}", "center")
    with browser(cluster) as http:
        sign_in(http, "vera")
        every = http.get("/v1/events", params={"limit": 1000}).json()
        page = http.get("/v1/events", params={"newest": 1, "limit": 5}).json()
        assert [e["id"] for e in page["events"]] == [e["id"] for e in every["events"][-5:]]
        assert page["next"] == every["next"] and page["events"][-2]["message"] == "drift 39"  # then the sign-in
        one_line_error(http.get("/v1/events", params={"follow": 1, "newest": 1}), 422, "newest is for a page of events")

        # followed from the newest with loads=1: the hosts' figures first, no event before a new one
        with http.stream("GET", "/v1/events", params={"follow": 1, "loads": 1, "since": page["next"]}) as r:
            lines = r.iter_lines()
            assert next(lines) == f"event: {LOADS_EVENT}"
            loads = HostLoads.model_validate_json(next(lines).removeprefix("data: "))
            assert [(h.host, h.memory_total, h.memory_available) for h in loads.hosts] == [
                ("host-a", 16 << 30, 8 << 30), ("host-b", 16 << 30, 12 << 30)]
            # a host's report that changes its figures (no event: its state stays) is the next message
            cluster.store.record_heartbeat("host-b", cluster.clock(), (), load(3 << 30), ())
            assert next(line for line in lines if line) == f"event: {LOADS_EVENT}"
            changed = HostLoads.model_validate_json(next(lines).removeprefix("data: "))
            assert changed.hosts[1].memory_available == 3 << 30 and changed.hosts[0] == loads.hosts[0]
            cluster.store.add_event(cluster.clock(), EventKind.DRIFT, "vm:web1", "drift 40", "center")
            assert next(line for line in lines if line) == f"id: {page['next'] + 1}"
