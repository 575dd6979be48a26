import pytest

from tests.integration.harness import AgentHarness


@pytest.fixture
def host():
    h = AgentHarness()
    try:
        h.start_agent()
        h.wait_connected()  # the test's CLI goes through the center: placement needs the host's report
        yield h
    finally:
        h.close()


@pytest.fixture
def make_lab():
    """make_lab(hosts=2, link_rate=None, encrypted=True) -> MigrationLab; every lab is torn down."""
    from tests.integration.lab_fixture import lab_factory

    yield from lab_factory()


@pytest.fixture
def lab(make_lab):
    """A secure (mutual TLS everywhere), unshaped two-host lab cluster."""
    return make_lab()
