import pytest

from tests.integration.harness import AgentHarness


@pytest.fixture
def host(request, tmp_path_factory):
    h = AgentHarness()
    try:
        h.start_agent()
        h.wait_connected()  # the test's CLI goes through the center: placement needs the host's report
        yield h
    finally:
        h.close(tmp_path_factory.mktemp("agent-log") if failed(request) else None)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (item.rep_setup, rep_call): fixtures see whether it failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def failed(request) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


@pytest.fixture
def make_lab(request, tmp_path_factory):
    """make_lab(hosts=2, link_rate=None, encrypted=True) -> MigrationLab; every lab is torn down.
    A failed test's lab logs are kept in pytest's own temporary folder (it keeps the last three runs)."""
    from tests.integration.lab_fixture import lab_factory

    yield from lab_factory(lambda: tmp_path_factory.mktemp("lab-logs") if failed(request) else None)


@pytest.fixture
def lab(make_lab):
    """A secure (mutual TLS everywhere), unshaped two-host lab cluster."""
    return make_lab()
