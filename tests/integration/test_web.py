"""The web client on the lab: a real center, agents and QEMU guests, in Debian's headless Chromium.
Signed in with the link `kvmotion center web-token` prints, the page shows the lab's hosts (with
the load their agents report) and VMs; it starts a migration of a busy guest over a slow link,
watches its progress bar move to "completed" (done) and shows the VM on its new host; it puts a
host into maintenance from the dry-run plan and takes it out (the mode checked with the CLI too);
a viewer made with `kvmotion center user add` sees no control that changes anything and the API
refuses the viewer's POSTs; a request from the admin's page without its CSRF token, or with a
forged one, is refused and queues nothing.

One two-host lab and one browser are shared by the tests of this module, which run in file order:
w1 (busy) and w2 (idle) start on host-a, w1 migrates to host-b, host-a's maintenance moves w2 to
host-b too. Guests are 256 MiB, booted two at once. Each test saves screenshots in its tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmotion.api.migration import Phase
from kvmotion.center.dispatcher import _PHASE_FRACTION
from tests.integration.lab_fixture import MigrationLab, lab_factory
from tests.webpage import CHROMIUM, choose_destination, confirm_migration, follow_migration

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

SLOW_LINK = 20_000_000  # bytes/s: pre-copy of a busy guest lasts seconds, long enough to watch
MIB = 1 << 20
# a migration task's progress while pre-copy runs lies between these (dispatcher.progress_of)
PRECOPY = (_PHASE_FRACTION[Phase.PRECOPY], _PHASE_FRACTION[Phase.SWITCHOVER])
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: pip install -e '.[test]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make setup installs it)", allow_module_level=True)

# a POST from the page's session, its CSRF token as given (null: none)
POST = """async ([path, csrf, body]) => {
    const headers = {"content-type": "application/json"};
    if (csrf !== null) headers["X-KVMotion-CSRF"] = csrf;
    const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
    return [r.status, (await r.json()).error.message];
}"""
MIGRATE_W1 = {"vm": "w1", "destination": "host-a"}


@pytest.fixture(scope="module")
def wlab() -> Iterator[MigrationLab]:
    factory = lab_factory()
    make = next(factory)
    try:
        lab = make(hosts=2, link_rate=SLOW_LINK)
        lab.create_vm("w1", "host-a", k=1, workload="echo,mem", mem_wss="96M", mem_rate="20M", start=False)
        lab.create_vm("w2", "host-a", k=2, start=False)
        for vm in ("w1", "w2"):  # both boot at once
            lab.cli_ok("vm", "start", vm, timeout=90)
        for vm in ("w1", "w2"):
            lab.wait_ready("host-a", vm)
        yield lab
    finally:
        factory.close()  # tears the lab down, its agents and QEMUs with it, whatever happened


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser: Any) -> Any:
    page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(30_000)
    return page


@pytest.fixture(scope="module")
def admin(wlab: MigrationLab, browser: Any) -> Iterator[Any]:
    """The lab admin's page, signed in with the one-time link of `kvmotion center web-token`."""
    link = wlab.cli_ok("center", "web-token").stdout.strip()
    assert link.startswith(wlab.cluster.center_url + "/#signin="), link
    page = new_page(browser)
    try:
        page.goto(link)
        page.locator("#main").wait_for(state="visible")
        page.locator("#live.pass").wait_for()  # the event stream is open
        yield page
    finally:
        page.context.close()


def hosts(lab: MigrationLab) -> dict[str, dict]:
    return {h["name"]: h for h in lab.cli_json("host", "ls")}  # type: ignore[union-attr]


def tasks(lab: MigrationLab) -> list[dict]:
    return lab.cli_json("task", "ls")  # type: ignore[return-value]


def test_sign_in_and_inventory(wlab: MigrationLab, admin: Any, tmp_path: Path) -> None:
    page = admin
    assert page.locator("#user").inner_text() == "admin" and page.locator("#role").inner_text() == "admin"
    assert "signin" not in page.url  # the spent token is off the address bar
    reported = hosts(wlab)
    assert sorted(reported) == ["host-a", "host-b"]
    for name, host in reported.items():
        row = page.locator(f"#hosts tr[data-host={name}]")
        assert "connected" in row.inner_text()
        total = host["load"]["memory_total"]
        row.locator("td.memory", has_text=f"of {total / MIB:.0f} MiB").wait_for()  # the agent's report
        assert f"/{host['load']['cpus']}" in row.locator("td.cpu").inner_text()
    assert page.locator("#hosts tr[data-host=host-a] .vmcount").inner_text() == "2"
    for vm in ("w1", "w2"):
        row = page.locator(f"#vms tr[data-vm={vm}]")
        assert "running" in row.inner_text() and row.locator(".host").inner_text() == "host-a"
        assert "256 MiB" in row.inner_text() and "52:54:00:" in row.inner_text()
        assert row.locator("button", has_text="Migrate").count() == 1
    page.screenshot(path=tmp_path / "lab-inventory.png", full_page=True)


def test_migration_from_the_page(wlab: MigrationLab, admin: Any, tmp_path: Path) -> None:
    page = admin
    vm = page.locator("#vms tr[data-vm=w1]")
    vm.locator("button", has_text="Migrate").click()
    choice = choose_destination(page, "host-b", tmp_path / "lab-destinations.png")
    assert choice.get_attribute("data-verdict") in ("pass", "warning"), choice.inner_text()
    confirm_migration(page)

    def midway(seen: list[float]) -> None:
        if PRECOPY[0] < seen[-1] < 1 and not (tmp_path / "lab-progress.png").exists():
            page.screenshot(path=tmp_path / "lab-progress.png")

    seen, state = follow_migration(page, 180, midway)
    body = page.locator("#dialog-body").inner_text()
    page.screenshot(path=tmp_path / "lab-migration-done.png", full_page=True)
    assert state == "done", body
    # forward only, to the end, and on its way with the pre-copy's bytes (one of its updates at least)
    assert seen == sorted(seen) and seen[-1] == 1.0 and any(PRECOPY[0] < v < PRECOPY[1] for v in seen), seen
    assert (tmp_path / "lab-progress.png").exists()
    assert "Downtime" in body and page.locator("#dialog svg.chart rect.sent").count() >= 1, body
    page.locator("#dialog-close").click()
    page.locator("#vms tr[data-vm=w1] .host", has_text="host-b").wait_for()
    page.screenshot(path=tmp_path / "lab-after.png", full_page=True)
    assert wlab.running_hosts("w1") == ["host-b"]


def test_maintenance_enter_and_exit(wlab: MigrationLab, admin: Any, tmp_path: Path) -> None:
    page = admin
    page.locator("#hosts tr[data-host=host-a] button", has_text="Enter maintenance").click()
    plan = page.locator("#dialog .plan")
    plan.wait_for()  # the dry run's plan, read before anything moves
    assert "1 migration(s)" in plan.inner_text() and "w2: host-a → host-b" in plan.inner_text(), plan.inner_text()
    assert hosts(wlab)["host-a"]["mode"] == "normal" and wlab.running_hosts("w2") == ["host-a"]
    page.screenshot(path=tmp_path / "lab-maintenance-plan.png")
    page.locator("#dialog-confirm").click()
    page.locator("#hosts tr[data-host=host-a] .badge.maintenance").wait_for(timeout=120_000)
    page.locator("#vms tr[data-vm=w2] .host", has_text="host-b").wait_for()
    page.screenshot(path=tmp_path / "lab-maintenance-in.png", full_page=True)
    assert hosts(wlab)["host-a"]["mode"] == "maintenance" and wlab.running_hosts("w2") == ["host-b"]
    evacuation = [t for t in tasks(wlab) if t["kind"] == "migrate" and t["target"] == "w2"]
    assert [(t["state"], t["source"], t["destination"]) for t in evacuation] == [("done", "host-a", "host-b")], evacuation

    page.locator("#hosts tr[data-host=host-a] button", has_text="Exit maintenance").click()
    page.locator("#dialog .plan", has_text="No VM to move").wait_for()  # move-back left unticked
    page.locator("#dialog-confirm").click()
    page.locator("#hosts tr[data-host=host-a] button", has_text="Enter maintenance").wait_for()
    assert page.locator("#hosts tr[data-host=host-a] .badge.maintenance").count() == 0
    page.screenshot(path=tmp_path / "lab-maintenance-out.png", full_page=True)
    assert hosts(wlab)["host-a"]["mode"] == "normal" and wlab.running_hosts("w2") == ["host-b"]


def test_viewer_sees_no_controls_and_is_refused(wlab: MigrationLab, browser: Any, tmp_path: Path) -> None:
    password = wlab.cli_ok("center", "user", "add", "vic", "--role", "viewer").stdout.strip()
    page = new_page(browser)
    try:
        page.goto(wlab.cluster.center_url + "/")
        page.locator("#signin-user").fill("vic")
        page.locator("#signin-password").fill(password)
        page.locator("#signin-password").press("Enter")
        page.locator("#main").wait_for(state="visible")
        page.locator("#vms tr[data-vm=w1]").wait_for()
        assert page.locator("#role").inner_text() == "viewer"
        assert page.locator("#hosts tr[data-host=host-a]").count() == 1
        # no control that changes anything: the only buttons are the task list's links to a migration's detail
        others = page.locator("main button:not(.link)")
        assert page.locator("button.mutating").count() == 0 and others.count() == 0, others.all_inner_texts()
        assert page.locator("#tasks button.link", has_text="migrate w1").count() == 1
        page.screenshot(path=tmp_path / "lab-viewer.png", full_page=True)
        csrf = page.evaluate("sessionStorage.getItem('kvmotion-csrf')")
        before = len(tasks(wlab))
        for path, body in (("/v1/migrations", MIGRATE_W1), ("/v1/hosts/host-b/maintenance", {"dry_run": False})):
            status, message = page.evaluate(POST, [path, csrf, body])  # its own session and token
            assert status == 403 and "user:vic (viewer) may not" in message, (path, status, message)
    finally:
        page.context.close()
    assert len(tasks(wlab)) == before and hosts(wlab)["host-b"]["mode"] == "normal"


def test_forged_requests_from_the_page_are_refused(wlab: MigrationLab, admin: Any, tmp_path: Path) -> None:
    page = admin
    before = len(tasks(wlab))
    for token in (None, "forged-token-" + "x" * 30):  # the admin's session, its CSRF token missing or wrong
        status, message = page.evaluate(POST, ["/v1/migrations", token, MIGRATE_W1])
        assert status == 403 and "X-KVMotion-CSRF" in message, message
    page.screenshot(path=tmp_path / "lab-forged.png", full_page=True)
    assert len(tasks(wlab)) == before and wlab.running_hosts("w1") == ["host-b"]  # nothing queued, nothing moved
