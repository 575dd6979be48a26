import pytest

from tests.integration.harness import AgentHarness


@pytest.fixture
def host():
    h = AgentHarness()
    try:
        h.start_agent()
        yield h
    finally:
        h.close()
