"""The web client on the lab: a real center, agents and QEMU guests. Signed in with the link
`kvmotion center web-token` prints, the page shows the lab's hosts and VM, starts a migration of
a busy guest over a slow link, watches its progress bar move to "completed" (done), and shows the
VM on its new host. Screenshots in the test's tmp_path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.lab_fixture import MigrationLab

pytestmark = [pytest.mark.qemu, pytest.mark.lab]

CHROMIUM = Path("/usr/bin/chromium")
SLOW_LINK = 20_000_000  # bytes/s: pre-copy of a busy guest lasts seconds, long enough to watch
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: pip install -e '.[test]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make setup installs it)", allow_module_level=True)


def test_migration_from_the_page_on_the_lab(make_lab, tmp_path: Path) -> None:
    lab: MigrationLab = make_lab(hosts=2, link_rate=SLOW_LINK)
    lab.create_vm("w1", "host-a", k=1, workload="echo,mem", mem_wss="96M", mem_rate="20M")
    link = lab.cli_ok("center", "web-token").stdout.strip()
    assert link.startswith(lab.cluster.center_url + "/#signin="), link
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
                page.set_default_timeout(30_000)
                page.goto(link)
                page.locator("#main").wait_for(state="visible")
                assert page.locator("#user").inner_text() == "admin"
                for host in ("host-a", "host-b"):
                    assert "connected" in page.locator(f"#hosts tr[data-host={host}]").inner_text()
                vm = page.locator("#vms tr[data-vm=w1]")
                vm.wait_for()
                assert "running" in vm.inner_text() and vm.locator(".host").inner_text() == "host-a"
                page.screenshot(path=tmp_path / "lab-inventory.png", full_page=True)

                vm.locator("button", has_text="Migrate").click()
                choice = page.locator("#dialog .choice[data-host=host-b]")
                choice.wait_for()
                assert choice.get_attribute("data-verdict") in ("pass", "warning"), choice.inner_text()
                page.screenshot(path=tmp_path / "lab-destinations.png")
                page.locator("#dialog-confirm").click()
                page.locator("#dialog .migration").wait_for()
                seen: list[float] = []
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    value = page.evaluate("(document.querySelector('#dialog progress') || {}).value")
                    if value is not None and (not seen or value != seen[-1]):
                        seen.append(value)
                        if 0.2 < value < 1 and not (tmp_path / "lab-progress.png").exists():
                            page.screenshot(path=tmp_path / "lab-progress.png")
                    if page.locator("#dialog .migration[data-state=done], #dialog .migration[data-state=failed]").count():
                        break
                    time.sleep(0.05)
                body = page.locator("#dialog-body").inner_text()
                page.screenshot(path=tmp_path / "lab-migration-done.png", full_page=True)
                assert page.locator("#dialog .migration[data-state=done]").count() == 1, body
                assert seen == sorted(seen) and seen[-1] == 1.0 and any(0 < v < 1 for v in seen), seen
                assert "Downtime" in body and page.locator("#dialog svg.chart rect.sent").count() >= 1, body
                page.locator("#dialog-close").click()
                page.locator("#vms tr[data-vm=w1] .host", has_text="host-b").wait_for()
                page.screenshot(path=tmp_path / "lab-after.png", full_page=True)
            finally:
                browser.close()
        assert lab.running_hosts("w1") == ["host-b"]
    finally:
        lab.cli("vm", "stop", "w1", timeout=90)
