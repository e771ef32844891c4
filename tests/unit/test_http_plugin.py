"""The http plugin's user-space side on hand-built increments (no kernel): flags, naming, exposition."""

from __future__ import annotations

import ctypes as ct
import socket

import pytest

from prometheus_client.core import Metric

from agent.attribution import Attribution
from agent.config import Config, HttpConfig
from agent.events import EventHub, HttpRequest
from agent.k8s.records import PodRecord
from agent.k8s.static import StaticPods
from agent.events import wall_clock
from agent.plugins.http import (DURATION, DURATION_BUCKETS, HttpEvent, HttpPathEvent, HttpPlugin, bucket_bounds,
                                http_cflags, sampled, url_path)

WEB, API, OUTSIDE = "10.1.1.2", "10.1.2.2", "192.0.2.7"


def pod(name: str, ip: str, workload: str) -> PodRecord:
    return PodRecord("shop", name, name, "node-a", (ip,), False, True, "Deployment", workload, "Running")


class Context:
    config = Config()
    events = EventHub()
    attribution = Attribution(StaticPods([pod("web-1", WEB, "web"), pod("api-1", API, "api")]), "node-a",
                              pending_window=0.0)


def started() -> HttpPlugin:
    p = HttpPlugin()
    p.start(Context())
    return p


def test_flags_name_the_ports_or_every_port():
    assert "-DHTTP_PORT(p)=((p)==80||(p)==8080)" in http_cflags(HttpConfig(ports=(80, 8080)))
    assert "-DHTTP_PORT_MASK=0x10000ULL" in http_cflags(HttpConfig(ports=(80, 8080)))  # both: low 6 bits 16
    (mask,) = [int(f.split("=")[1].removesuffix("ULL"), 16) for f in http_cflags(HttpConfig())
               if f.startswith("-DHTTP_PORT_MASK=")]
    assert all(mask >> (p & 63) & 1 for p in HttpConfig().ports)  # the prefilter lets every HTTP port by
    assert sum(not mask >> (p & 63) & 1 for p in range(1024, 65536)) / (65536 - 1024) > 0.9  # most others not
    flags = http_cflags(HttpConfig(ports=()))
    assert "-DHTTP_ALL_PORTS" in flags and not [f for f in flags if f.startswith("-DHTTP_PORT(")]


def test_sampled_share_is_a_threshold_of_the_kernels_random_u32():
    assert "-DHTTP_SAMPLE_THRESHOLD=42949672ULL" in http_cflags(HttpConfig())  # 0.01 of 2^32
    assert "-DHTTP_SAMPLE_THRESHOLD=4294967296ULL" in http_cflags(HttpConfig(sampleRatio=1.0))  # every one
    assert "-DHTTP_SAMPLE_THRESHOLD=0ULL" in http_cflags(HttpConfig(sampleRatio=0.0))


def event(status: int, duration: int, method: int, to_pod: int, ts: int = 10**9, cls=HttpEvent, **more) -> bytes:
    ev = cls(ts=ts, **more) if cls is HttpPathEvent else cls(ts=ts, duration=duration, ifindex=7, status=status,
                                                              method=method, to_pod=to_pod)
    ev.conn.family, ev.conn.client_port, ev.conn.server_port = 4, 40001, 8080
    ct.memmove(ev.conn.client, socket.inet_aton(WEB), 4)
    ct.memmove(ev.conn.server, socket.inet_aton(API), 4)
    return bytes(ev)


def line_event(line: bytes, ts: int = 10**9) -> bytes:
    raw = bytearray(event(0, 0, 0, 0, ts, HttpPathEvent, length=len(line)))
    offset = HttpPathEvent.line.offset
    raw[offset:offset + len(line)] = line
    return bytes(raw)


def feed(p: HttpPlugin, raw: bytes) -> None:
    buf = ct.create_string_buffer(raw)
    p._on_event(None, buf, len(raw))


@pytest.mark.parametrize("line, path", [
    (b"GET /cart/items?id=7 HTTP/1.1\r\nHost: a", "/cart/items"),
    (b"POST /a#frag HTTP/1.1", "/a"),
    (b"GET http://shop.example/x/y?z HTTP/1.1", "/x/y"),  # absolute-form, to a proxy
    (b"OPTIONS * HTTP/1.1", None),
    (b"CONNECT shop.example:443 HTTP/1.1", None),
    (b"GET /" + b"p" * 300, "/" + "p" * 19),  # cut at the configured length
    (b"GET /caf\xc3\xa9/\xff HTTP/1.1", "/caf\u00e9/\ufffd"),  # not UTF-8: replaced, never raised
    (b"GET", None),
])
def test_url_path_is_the_targets_path_without_query_cut_at_its_length(line, path):
    assert url_path(line, 20) == path


def test_a_request_line_waits_for_its_requests_record_and_is_off_by_default():
    p = started()
    sub = p._ctx.events.subscribe("lines")
    p._path_length = 64  # http.urlPath
    feed(p, line_event(b"GET /a/b?c HTTP/1.1\r\n", ts=5))
    feed(p, line_event(b"GET /other HTTP/1.1\r\n", ts=6))  # another request: not this one's
    feed(p, event(200, 1000, 1, 0, ts=5))
    assert sub.get(timeout=1).path == "/a/b" and len(p._lines) == 1
    p._path_length = 0
    feed(p, line_event(b"GET /a/b HTTP/1.1\r\n", ts=7))
    feed(p, event(200, 1000, 1, 0, ts=7))
    assert sub.get(timeout=1).path is None


def test_the_agent_samples_the_requests_it_takes_as_the_kernel_does():
    threshold = 1 << 31  # a half
    picked = [ts for ts in range(10**9, 10**9 + 4000) if sampled(ts, threshold)]
    assert 1800 <= len(picked) <= 2200  # binomial(4000, 0.5): sd 32; ~6 sd
    assert not any(sampled(ts, 0) for ts in range(1000)) and all(sampled(ts, 1 << 32) for ts in range(1000))


def test_a_sampled_request_from_the_kernel_becomes_one_record():
    p = started()
    sub = p._ctx.events.subscribe("t")
    for raw in (event(404, 2_500_000, 4, 0), event(0, 0, 0, 1)):
        buf = ct.create_string_buffer(raw)
        p._on_event(None, buf, len(raw))
    p._on_event(None, ct.create_string_buffer(8), 8)  # short: not an event
    first, second = sub.get(timeout=1), sub.get(timeout=1)
    assert sub.get(timeout=0) is None and p.published == 2
    start = wall_clock(10**9)
    assert first == HttpRequest(start=first.start, duration=0.0025, client=WEB, client_port=40001, server=API,
                                server_port=8080, method="DELETE", status_code=404, observer="source", ifindex=7)
    assert abs(first.start - start) < 0.01
    assert (second.method, second.status_code, second.duration, second.observer) == ("OTHER", None, None,
                                                                                      "destination")


def test_buckets_suit_a_millisecond_to_ten_seconds():
    bounds = bucket_bounds()
    assert len(bounds) == DURATION_BUCKETS + 1 and bounds[-1] == "+Inf"
    assert float(bounds[0]) < 0.001 and 10 < float(bounds[-2]) < 20


def samples(p: HttpPlugin) -> dict:
    out = {}
    for family in p.metrics():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pair(src, dst, **more) -> tuple:
    """The sorted labels of a pair's sample."""
    return tuple(sorted({"source_namespace": src[0], "source_workload": src[1], "destination_namespace": dst[0],
                         "destination_workload": dst[1], **more}.items()))


def test_requests_are_named_as_workload_pairs_once_per_cluster():
    p = started()
    p._pending.add({
        (WEB, API, False, 1, 2): (5, 0),  # GET 2xx at the client's interface: counted
        (WEB, API, True, 1, 2): (5, 0),  # the same requests at the server's interface: left out
        (OUTSIDE, API, True, 2, 5): (2, 0),  # POST 5xx from outside, at the server's: counted
        (WEB, API, False, 0, 0): (1, 0),  # OTHER, no response
        (WEB, API, False, DURATION, 0): (4, 400_000),  # 0.1 ms each
        (WEB, API, False, DURATION, 3): (1, 1_500_000),  # 1.5 ms
        (WEB, API, True, DURATION, 3): (9, 9),  # the server's view: left out
    })
    p._pending.drain(p._attribute)
    s = samples(p)
    web, api, outside = ("shop", "web"), ("shop", "api"), ("", "external")
    requests = "fovea_workload_http_requests_total"
    assert s[(requests, pair(web, api, method="GET", status_class="2xx"))] == 5
    assert s[(requests, pair(web, api, method="OTHER", status_class="none"))] == 1
    assert s[(requests, pair(outside, api, method="POST", status_class="5xx"))] == 2
    assert sum(v for (name, _), v in s.items() if name == requests) == 8
    h = "fovea_workload_http_request_duration_seconds"
    assert s[(h + "_count", pair(web, api))] == 5
    assert s[(h + "_sum", pair(web, api))] == 0.0019
    assert s[(h + "_bucket", pair(web, api, le="0.00025"))] == 4
    assert s[(h + "_bucket", pair(web, api, le="0.001"))] == 4
    assert s[(h + "_bucket", pair(web, api, le="0.002"))] == 5
    assert s[(h + "_bucket", pair(web, api, le="+Inf"))] == 5


def test_without_its_datapath_the_plugin_says_why():
    p = started()
    assert p.problem() == "no tc program counts HTTP: the pods plugin is down"
    p.failed("pods", "the verifier said no")
    assert p.problem() == "HTTP is not counted in the pods programs: the verifier said no"
    assert isinstance(next(iter(p.metrics())), Metric)
