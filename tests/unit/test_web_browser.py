"""The web client in a real headless Chromium (Debian's, driven by Playwright), against the center
served over TLS in process, its dispatcher driving fake agents: sign in, the inventory, the event
feed from the newest event and the hosts' bars following their reports, a migration started and
watched from the page, maintenance enter/exit, a viewer's page and forged requests.
Each test saves screenshots in its tmp_path."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmotion.api.agent import VmState
from kvmotion.api.center import EventKind, Severity, UserAdd
from kvmotion.api.identity import Identity, Kind, Role
from kvmotion.api.migration import MigrationRecord, Phase, Progress
from kvmotion.api.operations import HealthReport
from kvmotion.api.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from kvmotion.api.serving import Security
from kvmotion.center.app import create_app
from kvmotion.center.dispatcher import Dispatcher
from kvmotion.center.heartbeat import HeartbeatController
from tests.served import ServedApp
from tests.unit.test_center_api import ADMIN, Cluster
from tests.unit.test_center_tasks import FakeAgents, Plan, add_host, load, run_vm
from tests.webpage import CHROMIUM, choose_destination, confirm_migration, follow_migration

PASSWORD = "correct horse battery"
MIB = 1 << 20
PRECOPY_ROUNDS = 6

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: pip install -e '.[test]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make setup installs it)", allow_module_level=True)


class SlowAgents(FakeAgents):
    """Fake agents whose migrations take PRECOPY_ROUNDS rounds, each poll one round further."""

    def __init__(self) -> None:
        super().__init__()
        self.next_plan = Plan([Phase.PREPARE, *[Phase.PRECOPY] * PRECOPY_ROUNDS, Phase.SWITCHOVER, Phase.COMMIT,
                               Phase.DONE])

    def advance(self, mid: str) -> MigrationRecord:
        rec = super().advance(mid)
        done = PRECOPY_ROUNDS - sum(1 for p in self.plans[mid].phases if p is Phase.PRECOPY)
        rounds = tuple({"round": i, "first_round": i, "started_at": i * 0.5, "wall_time": 0.5, "bytes_sent": 64 * MIB,
                        "link_rate": 128.0 * MIB, "dirty_rate": 20.0 * MIB, "remaining": (PRECOPY_ROUNDS - i) * 32 * MIB,
                        "throttle": 0.1 * i} for i in range(1, done + 1))
        progress = Progress(round=done, transferred=done * 64 * MIB, remaining=(PRECOPY_ROUNDS - done) * 32 * MIB,
                            total=512 * MIB, link_rate=128.0 * MIB, dirty_rate=20.0 * MIB, throttle=0.1 * done)
        rec = dataclasses.replace(rec, progress=progress, rounds=rounds)
        self.records[mid] = rec
        return rec


@dataclasses.dataclass
class Web:
    url: str
    cluster: Cluster
    agents: SlowAgents
    app: Any


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    c = Cluster(tmp_path)
    for name, free in (("host-a", 8 << 30), ("host-b", 12 << 30)):
        add_host(c.store, name, free=free)
    c.center.add_user(UserAdd(name="vera", role=Role.VIEWER, password=PASSWORD), ADMIN)
    c.center.add_user(UserAdd(name="otto", role=Role.OPERATOR, password=PASSWORD), ADMIN)
    run_vm(c.store, "web1", "host-a")
    agents = SlowAgents()
    agents.vms[("host-a", "web1")] = VmState.RUNNING
    app = create_app(c.center, HeartbeatController(c.store, clock=c.clock, interval=0.05),
                     Dispatcher(c.store, agents, interval=0.05, poll=0.25, call_timeout=5, reconcile_every=3600),
                     operations_interval=0.2)
    tls = c.ca.creds(Identity(Kind.CENTER, "center")).dir
    security = Security(tls_files=(tls / SERVER_CERT, tls / SERVER_KEY, tls / CA_CERT), audit_log=c.data / "audit.log",
                        optional_client_cert=True)
    served = ServedApp(app, security, "center", lifespan="on")
    try:
        yield Web(served.url, c, agents, app)
    finally:
        served.close()
        c.store.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def sign_in(page: Any, web: Web, user: str) -> None:
    """With the keyboard: type the user and password, Enter."""
    page.goto(web.url + "/")
    page.locator("#signin-user").fill(user)
    page.locator("#signin-password").fill(PASSWORD)
    page.locator("#signin-password").press("Enter")
    page.locator("#main").wait_for(state="visible")
    page.locator("#hosts tr[data-host=host-a]").wait_for()


def test_sign_in_and_inventory(web: Web, page: Any, tmp_path: Path) -> None:
    sign_in(page, web, "otto")
    assert page.locator("#user").inner_text() == "otto" and page.locator("#role").inner_text() == "operator"
    host_a = page.locator("#hosts tr[data-host=host-a]")
    assert "connected" in host_a.inner_text() and "ok" in host_a.inner_text()
    assert host_a.locator(".bar").count() == 2  # CPU and memory load
    assert "50% of 16384 MiB" in host_a.inner_text()  # 8 GiB free of 16
    vm = page.locator("#vms tr[data-vm=web1]")
    assert "running" in vm.inner_text() and "host-a" in vm.locator(".host").inner_text()
    assert "1024 MiB" in vm.inner_text() and "ds1/web1.img" in vm.inner_text()
    page.locator("#live.pass").wait_for()  # the event stream is open
    page.screenshot(path=tmp_path / "inventory.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the page itself does not scroll sideways
    wide = page.evaluate("""[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 391
        && !e.closest('.scroll')).map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 8)""")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, wide
    page.screenshot(path=tmp_path / "inventory-phone.png", full_page=True)

    # a one-time sign-in link, as `kvmotion center web-token` prints it
    made = web.app.state.sessions.signin_token(Identity(Kind.USER, "vera", Role.VIEWER))
    other = page.context.browser.new_context(ignore_https_errors=True)
    try:
        tab = other.new_page()
        tab.goto(web.url + made.path)
        tab.locator("#main").wait_for(state="visible")
        assert tab.locator("#user").inner_text() == "vera" and "signin" not in tab.url
    finally:
        other.close()


def shown_events(page: Any) -> list[int]:
    return [int(i) for i in page.locator("#events li").evaluate_all("items => items.map(li => li.dataset.event)")]


def test_event_feed_from_the_newest_and_loads_as_hosts_report(web: Web, page: Any, tmp_path: Path) -> None:
    store = web.cluster.store
    for i in range(60):  # more history than the feed shows
        store.add_event(web.cluster.clock(), EventKind.DRIFT, "vm:web1", f"drift {i}", "center")
    sign_in(page, web, "otto")
    page.locator("#live.pass").wait_for()
    newest = store.events(0, 1000)[-1].id
    shown = shown_events(page)  # the newest first, not a replay of every event since id 0
    assert shown == list(range(newest, newest - len(shown), -1)) and 0 < len(shown) < 60, shown

    # an event after the page opened: shown once, at the top; the lists refresh
    store.add_event(web.cluster.clock(), EventKind.DRIFT, "vm:web1", "drift after", "center")
    page.locator("#events li", has_text="drift after").wait_for()
    assert shown_events(page) == [newest + 1, *shown]

    # a host's report moves its memory bar, with no event to say so
    memory = page.locator("#hosts tr[data-host=host-b] td.memory")
    assert "25% of 16384 MiB" in memory.inner_text()
    store.record_heartbeat("host-b", web.cluster.clock(), (), load(4 << 30), ())
    page.locator("#hosts tr[data-host=host-b] td.memory", has_text="75% of 16384 MiB").wait_for(timeout=5_000)
    assert page.locator("#hosts tr[data-host=host-b] td.memory .bar").get_attribute("aria-label") == "memory 75%"
    assert store.events(0, 1000)[-1].id == newest + 1 and shown_events(page)[0] == newest + 1
    page.screenshot(path=tmp_path / "loads.png", full_page=True)


def test_migration_from_the_page(web: Web, page: Any, tmp_path: Path) -> None:
    sign_in(page, web, "otto")
    button = page.locator("#vms tr[data-vm=web1] button", has_text="Migrate")
    button.focus()
    page.keyboard.press("Enter")
    choice = choose_destination(page, "host-b", tmp_path / "destinations.png")
    assert choice.get_attribute("data-verdict") in ("pass", "warning") and "predicted" in choice.inner_text()
    confirm_migration(page)

    def midway(seen: list[float]) -> None:
        if len(seen) == 4:
            page.screenshot(path=tmp_path / "migration-progress.png")

    seen, state = follow_migration(page, 30, midway)
    assert state == "done", seen
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == 1.0, seen  # the bar moved, forward only
    body = page.locator("#dialog-body").inner_text()
    assert "Downtime" in body and "40 ms" in body and "Rounds" in body
    assert page.locator("#dialog svg.chart rect.sent").count() == PRECOPY_ROUNDS
    assert page.locator("#dialog dd[data-figure=Throttle]").inner_text() == "60%"
    page.screenshot(path=tmp_path / "migration-done.png")
    page.locator("#dialog-close").click()
    page.locator("#vms tr[data-vm=web1] .host", has_text="host-b").wait_for()
    page.locator("#tasks tr", has_text="migrate web1").locator(".badge.done").wait_for()
    assert web.agents.calls[-1].startswith("start web1 host-a->host-b")


def test_maintenance_enter_and_exit(web: Web, page: Any, tmp_path: Path) -> None:
    sign_in(page, web, "otto")
    page.locator("#hosts tr[data-host=host-a] button", has_text="Enter maintenance").click()
    plan = page.locator("#dialog .plan")
    plan.wait_for()
    assert "web1: host-a → host-b" in plan.inner_text()
    page.screenshot(path=tmp_path / "maintenance-plan.png")
    page.locator("#dialog-confirm").click()
    page.locator("#hosts tr[data-host=host-a] .badge.maintenance").wait_for(timeout=30_000)
    page.locator("#vms tr[data-vm=web1] .host", has_text="host-b").wait_for()
    page.screenshot(path=tmp_path / "maintenance-in.png", full_page=True)

    page.locator("#hosts tr[data-host=host-a] button", has_text="Exit maintenance").click()
    page.locator("#dialog .plan").wait_for()
    page.locator("#move-back").check()
    page.locator("#dialog .plan", has_text="web1: host-b → host-a").wait_for()
    page.locator("#dialog-confirm").click()
    page.locator("#hosts tr[data-host=host-a] button", has_text="Enter maintenance").wait_for()
    page.locator("#vms tr[data-vm=web1] .host", has_text="host-a").wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "maintenance-out.png", full_page=True)


def test_viewer_sees_no_controls_and_forged_requests_are_refused(web: Web, page: Any, tmp_path: Path) -> None:
    sign_in(page, web, "vera")
    page.locator("#vms tr[data-vm=web1]").wait_for()
    assert page.locator("button.mutating").count() == 0 and page.locator("#drs-apply-all").count() == 0
    assert page.locator("button", has_text="Migrate").count() == 0
    page.screenshot(path=tmp_path / "viewer.png", full_page=True)
    post = """async ([path, csrf]) => {
        const headers = {"content-type": "application/json"};
        if (csrf !== null) headers["X-KVMotion-CSRF"] = csrf;
        const r = await fetch(path, {method: "POST", headers, body: JSON.stringify({vm: "web1", destination: "host-b"})});
        return [r.status, (await r.json()).error.message];
    }"""
    csrf = page.evaluate("sessionStorage.getItem('kvmotion-csrf')")
    assert page.evaluate(post, ["/v1/migrations", csrf])[0] == 403  # the API refuses a viewer, with its token
    assert "may not change VMs" in page.evaluate(post, ["/v1/migrations", csrf])[1]

    page.locator("#signout").click()
    page.locator("#signin").wait_for(state="visible")
    sign_in(page, web, "otto")
    for token in (None, "forged-token-" + "x" * 30):  # an operator's session, its CSRF token missing or wrong
        status, message = page.evaluate(post, ["/v1/migrations", token])
        assert status == 403 and "X-KVMotion-CSRF" in message, message
    assert web.cluster.store.open_task("web1") is None  # nothing was queued


def test_drs_recommendation_applied_from_the_page(web: Web, page: Any, tmp_path: Path) -> None:
    # host-a quarantined (a moderate fan fault): DRS recommends moving web1 off, with its reason
    web.cluster.store.report_health("host-a", HealthReport(component="fan", severity=Severity.MODERATE, reason="fan 3"),
                                    "test", web.cluster.clock())
    sign_in(page, web, "otto")
    card = page.locator("#drs-list li", has_text="web1: host-a → host-b")
    card.wait_for()
    assert "mandatory" in card.inner_text() and "quarantine" in card.inner_text().lower(), card.inner_text()
    assert page.locator("#drs-apply-all").count() == 1
    page.screenshot(path=tmp_path / "drs.png", full_page=True)
    card.locator("button", has_text="Apply").click()
    page.locator("#status", has_text="DRS: 1 migration(s) queued").wait_for()
    page.locator("#vms tr[data-vm=web1] .host", has_text="host-b").wait_for(timeout=30_000)
    page.locator("#drs-summary", has_text="nothing to recommend").wait_for()
