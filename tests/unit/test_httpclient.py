"""HTTP clients share one TLS context: building one loads a CA bundle (tens of ms of CPU), and a
datastore client is made inside a VM's switchover pause."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from kvmotion.api.agent import AgentClient, AsyncAgentClient
from kvmotion.api.datastore import DatastoreClient
from kvmotion.core.httpclient import default_ssl_context


@pytest.fixture
def bundle_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    default_ssl_context.cache_clear()
    loads: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    yield loads
    default_ssl_context.cache_clear()


def test_clients_load_the_ca_bundle_once(bundle_loads: list[object]) -> None:
    for port in (1, 2, 3):
        DatastoreClient(f"http://127.0.0.1:{port}").close()
        AgentClient(f"http://127.0.0.1:{port}").close()
        asyncio.run(AsyncAgentClient(f"https://127.0.0.1:{port}").aclose())
    assert len(bundle_loads) == 1, bundle_loads
    assert isinstance(default_ssl_context(), ssl.SSLContext)


def test_a_given_context_is_used_as_it_is(bundle_loads: list[object]) -> None:
    own = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system store, not via httpx
    before = len(bundle_loads)
    asyncio.run(AsyncAgentClient("https://127.0.0.1:4", ssl_context=own).aclose())
    AgentClient("https://127.0.0.1:4", ssl_context=own).close()
    assert len(bundle_loads) == before  # no default context was built for them
