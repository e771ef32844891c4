"""`fovea demo` shows forward and drop metrics within 30 s and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import requests
from pyroute2 import netns

from tests.conftest import FOVEA, Metrics, free_port

pytestmark = pytest.mark.kernel


def test_demo_shows_traffic_and_drops_then_cleans_up(root):
    port = free_port()
    proc = subprocess.Popen([FOVEA, "demo", "--duration", "60", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    seen = None
    try:
        while time.monotonic() - started < 30:
            try:
                m = Metrics(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
                if (m.get("fovea_forward_packets_total", direction="egress") > 0
                        and m.get("fovea_drop_packets_total", reason="NETFILTER_DROP", protocol="udp") > 0):
                    seen = time.monotonic() - started
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen is not None, "no forward and NETFILTER_DROP metrics within 30 s"
    assert proc.returncode == 0, out
    assert not [n for n in netns.listnetns() if n.startswith("fvdemo")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "fvdemo" not in links
