"""Agents of an encrypted cluster speak mutual TLS only: a plain-TCP client, a client without a
certificate and a client whose certificate comes from another CA are all refused; the cluster's
own certificate is accepted."""

from __future__ import annotations

import ssl

import httpx
import pytest

from kvmotion.api.pki import init_ca, issue_host_cert
from kvmotion.qemu import confine

pytestmark = [pytest.mark.lab]


def _get(url: str, ctx: ssl.SSLContext | bool) -> httpx.Response:
    return httpx.get(f"{url}/v1/host", verify=ctx, timeout=5)


def test_agent_refuses_plain_and_forged_clients(make_lab, tmp_path):
    lab = make_lab(encrypted=True)
    url = lab.cluster.agent_url("host-a")
    assert url.startswith("https://")
    own = lab.cluster.host_state("host-b") / "tls"  # host-b's identity from its join
    ca_file = str(own / "ca-cert.pem")

    good = ssl.create_default_context(cafile=ca_file)
    good.load_cert_chain(str(own / "client-cert.pem"), str(own / "client-key.pem"))
    assert _get(url, good).json()["name"] == "host-a"

    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS-only port
        httpx.get(url.replace("https://", "http://") + "/v1/host", timeout=5)

    no_cert = ssl.create_default_context(cafile=ca_file)
    with pytest.raises(httpx.TransportError):
        _get(url, no_cert)

    rogue_ca = tmp_path / "rogue-ca"
    init_ca(rogue_ca)
    issue_host_cert(rogue_ca, "host-b", [lab.cluster.topology.host("host-b").mgmt_ip], tmp_path / "rogue", qemu_key_gid=confine.qemu_gid())
    forged = ssl.create_default_context(cafile=ca_file)
    forged.load_cert_chain(str(tmp_path / "rogue" / "client-cert.pem"), str(tmp_path / "rogue" / "client-key.pem"))
    with pytest.raises(httpx.TransportError):
        _get(url, forged)
