"""The flow stream's server against bad clients: every bad request gets one error
line, followers past the cap are refused, and a well-formed follower keeps receiving."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from agent.config import Config, ObserveConfig
from agent.events import EventHub
from agent.observe import MAX_REQUEST, ObserveServer
from agent.supervise import Supervisor
from tests.unit.test_traces import dns


@pytest.fixture
def stream(tmp_path):
    hub = EventHub()
    sup = Supervisor()
    srv = ObserveServer(Config(observe=ObserveConfig(socket=str(tmp_path / "o.sock"), port=0, maxFollowers=100)),
                        hub, supervisor=sup)
    yield srv, hub, str(tmp_path / "o.sock"), sup
    srv.close()


def ask(path: str, request: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)  # blocking: waits for room in the backlog (with a timeout, AF_UNIX says EAGAIN)
    s.settimeout(10)
    s.sendall(request)
    return s


def lines_until_closed(s: socket.socket) -> list[dict]:
    with s.makefile("rb") as f:
        out = [json.loads(line) for line in f]
    s.close()
    return out


class Follower:
    """A well-formed follower that collects the DNS ids it receives."""

    def __init__(self, path: str):
        self.sock = ask(path, b'{"follow": true, "filter": {"dns": true}}\n')
        self.sock.settimeout(None)
        self.ids: list[int] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        with self.sock.makefile("rb") as f:
            for line in f:
                self.ids.append(json.loads(line).get("id"))

    def wait_for(self, n: int) -> list[int]:
        deadline = time.monotonic() + 5
        while len(self.ids) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.ids


def wait_followers(srv, n: int) -> None:
    deadline = time.monotonic() + 10
    while srv.stats()["followers"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.stats()["followers"] == n


BAD = [
    (b"this is not json\n", "request is not JSON"),
    (b"[1, 2]\n", "request is a JSON list, not an object"),
    (b'{"follow": true, "filter": {"port": "http"}}\n', 'filter.port is "http", not an integer'),
    (b'{"follow": true, "filter": {"port": true}}\n', "filter.port is true, not an integer"),
    (b'{"filter": {"port": 70000}}\n', "filter.port 70000 is not a port number"),
    (b'{"last": "20"}\n', 'last is "20", not an integer'),
    (b'{"last": -3}\n', "last -3 is negative"),
    (b'{"follow": "yes"}\n', 'follow is "yes", not a boolean'),
    (b'{"filter": ["shop"]}\n', "filter is [\"shop\"], not an object"),
    (b'{"filter": {"colour": "red"}}\n', "unknown key filter.'colour'"),
    (b'{"lats": 5}\n', "unknown key 'lats'"),
    (b'{"last": ' + b" " * (MAX_REQUEST + 10) + b"1}\n", f"request longer than {MAX_REQUEST} bytes"),
]


def test_each_bad_request_gets_one_error_line_and_the_stream_goes_on(stream):
    srv, hub, path, sup = stream
    good = Follower(path)
    wait_followers(srv, 1)
    for request, message in BAD:
        got = lines_until_closed(ask(path, request))
        assert len(got) == 1 and got[0]["type"] == "error", (request[:60], got)
        assert message in got[0]["message"], got[0]["message"]
        assert "\n" not in got[0]["message"]
    time.sleep(1.5)  # a quiet second: the server checks that the follower is still there, without blocking
    hub.publish(dns(id=7))
    assert good.wait_for(1) == [7]  # the feed survived every one of them
    assert srv.stats()["refused"] == len(BAD)
    assert sup.counts() == {}  # refused cleanly: nothing failed


def test_followers_past_the_cap_are_refused_and_the_first_ones_keep_receiving(stream):
    srv, hub, path, _ = stream
    good = Follower(path)
    others = [ask(path, b'{"follow": true}\n') for _ in range(299)]
    deadline = time.monotonic() + 20
    while srv.stats()["followers"] + srv.stats()["refused"] < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.stats()["followers"] == 100 and srv.stats()["refused"] == 200
    hub.publish(dns(id=8))
    assert good.wait_for(1) == [8]
    refused = 0
    for s in others:
        s.settimeout(0.5)
        try:
            first = json.loads(s.makefile("rb").readline())
        except (TimeoutError, socket.timeout):
            continue  # an accepted follower: it only gets DNS records it did not filter out
        finally:
            s.close()
        if first["type"] == "error":
            assert "too many followers (100, observe.maxFollowers)" in first["message"]
            refused += 1
    assert refused == 200
    deadline = time.monotonic() + 10
    while srv.stats()["followers"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.stats()["followers"] == 1  # closed followers are let go; the good one stays
