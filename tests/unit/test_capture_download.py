"""The agent's /captures/ route: the download token only in the X-Fovea-Token header."""

from __future__ import annotations

import requests
from prometheus_client import CollectorRegistry

from agent.server import MetricsServer
from tests.conftest import free_port


def test_the_token_goes_in_a_header_never_in_the_url(tmp_path):
    pcap = tmp_path / "web-debug-node-a-20260101T120000Z.pcap"
    pcap.write_bytes(b"pcap bytes")
    key = "0f0e9a2c-1b7d-4e2a-9c1f-5d0b8e7a6c31/" + pcap.name
    server = MetricsServer("127.0.0.1", free_port(), CollectorRegistry(), lambda: (True, "ok"), lambda: (True, "ok"))
    server.captures = lambda k, token: pcap if (k, token) == (key, "s3cret") else None
    server.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/captures/{key}"
    try:
        assert requests.get(url, headers={"X-Fovea-Token": "s3cret"}, timeout=5).content == b"pcap bytes"
        assert requests.get(url, headers={"X-Fovea-Token": "wrong"}, timeout=5).status_code == 404
        assert requests.get(url, timeout=5).status_code == 404
        for params in ({"token": "s3cret"}, {"token": "wrong"}, {"token": ""}):
            r = requests.get(url, params=params, headers={"X-Fovea-Token": "s3cret"}, timeout=5)
            assert r.status_code == 400 and r.content == (
                b"the download token goes in the X-Fovea-Token header, never in the URL (audit logs and proxies "
                b"keep URLs): use kubectl fovea capture download\n")
    finally:
        server.stop()
