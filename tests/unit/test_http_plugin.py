"""The http plugin's user-space side on hand-built increments (no kernel): flags, naming, exposition."""

from __future__ import annotations

from prometheus_client.core import Metric

from agent.attribution import Attribution
from agent.config import Config, HttpConfig
from agent.k8s.records import PodRecord
from agent.k8s.static import StaticPods
from agent.plugins.http import DURATION, DURATION_BUCKETS, HttpPlugin, bucket_bounds, http_cflags

WEB, API, OUTSIDE = "10.1.1.2", "10.1.2.2", "192.0.2.7"


def pod(name: str, ip: str, workload: str) -> PodRecord:
    return PodRecord("shop", name, name, "node-a", (ip,), False, True, "Deployment", workload, "Running")


class Context:
    config = Config()
    attribution = Attribution(StaticPods([pod("web-1", WEB, "web"), pod("api-1", API, "api")]), "node-a",
                              pending_window=0.0)


def started() -> HttpPlugin:
    p = HttpPlugin()
    p.start(Context())
    return p


def test_flags_name_the_ports_or_every_port():
    assert "-DHTTP_PORT(p)=((p)==80||(p)==8080)" in http_cflags(HttpConfig(ports=(80, 8080)))
    flags = http_cflags(HttpConfig(ports=()))
    assert "-DHTTP_ALL_PORTS" in flags and not [f for f in flags if f.startswith("-DHTTP_PORT(")]


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
