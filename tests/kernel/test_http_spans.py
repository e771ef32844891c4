"""HTTP requests as spans, children of their connection's span, and in `fovea observe --http`.

The real HTTP/1.1 server and client of tests/kernel/test_http.py between two lab
pods named by a static file; spans decoded by a gRPC OTLP receiver in the test.
Every request the kernel sampled is one span and one `fovea observe` record,
exactly; at `http.sampleRatio: 1` that is every request the client made, and
there `http.urlPath` is on (off, the default, at the other ratio).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import yaml

from tests.conftest import RunningAgent
from tests.kernel.test_flows import observe
from tests.kernel.test_http import MIX, PORT, lab, run_mix, servers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel

WEB = ("shop", "web-7d9c-abcde", "Deployment", "web")
API = ("shop", "api-5f6b-qwert", "Deployment", "api")
# Runs of the mix (11 requests on one keep-alive connection, 11 on fresh ones) per sample ratio.
MIXES = {1.0: 1, 0.5: 4}


@pytest.fixture(scope="module", params=sorted(MIXES, reverse=True), ids=lambda r: f"ratio{r}")
def http_span_agent(request, lab, servers, receiver, tmp_path_factory):  # noqa: F811
    ratio = request.param
    web, api = lab.pods[:2]
    d = tmp_path_factory.mktemp("httpspans")
    pods = [{"ip": ep.ipv4, "namespace": p[0], "pod": p[1], "workloadKind": p[2], "workloadName": p[3]}
            for ep, p in ((web, WEB), (api, API))]
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    (d / "fovea.yaml").write_text(yaml.safe_dump({
        "staticPods": str(d / "pods.yaml"), "pods": {"interfaces": [lab.prefix + "p*"]}, "interval": 1.0,
        "flows": {"idleTimeout": 2.0}, "http": {"ports": [PORT], "sampleRatio": ratio, "urlPath": ratio == 1},
        "otlp": {"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint},
    }))
    node = f"{lab.prefix}-{int(ratio * 100)}"  # its spans' resource, apart from the other ratio's
    agent = RunningAgent("--uplink", lab.uplink, "--config", str(d / "fovea.yaml"), "--node-name", node)
    agent.node, agent.ratio = node, ratio
    yield agent
    assert agent.stop() == 0, agent.output()


def test_each_sampled_request_is_one_span_under_its_connection_and_one_observe_record(lab, http_span_agent,
                                                                                    receiver):
    agent = http_span_agent
    web, api = lab.pods[:2]
    truth, times = Counter(), []
    for _ in range(MIXES[agent.ratio]):
        t, ts = run_mix(lab, web, api.ipv4, PORT)
        truth += t
        times += ts
    made = len(times)
    ours = lambda s: (s.resource.get("k8s.node.name") == agent.node  # noqa: E731
                      and s.attributes.get("destination.port") == PORT)
    # Each connection's span comes once it closed (FIN both ways, then a read that finds it unchanged).
    connections = (1 + len(MIX)) * MIXES[agent.ratio]
    deadline = time.monotonic() + 30
    while len([s for s in receiver.where() if ours(s) and s.name == "tcp connection"]) < connections \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    spans = receiver.wait(ours, timeout=10)
    conns = {s.attributes["source.port"]: s for s in spans if s.name == "tcp connection"}
    requests = [s for s in spans if s.name.startswith("http ")]
    assert len(conns) == connections

    # Every span under the span of its own connection: same trace, that span its parent.
    for s in requests:
        conn = conns[s.attributes["source.port"]]
        assert (s.trace_id, s.parent_span_id) == (conn.trace_id, conn.span_id)
        a = s.attributes
        assert (a["source.address"], a["destination.address"]) == (web.ipv4, api.ipv4)
        assert a["network.transport"] == "tcp" and a["fovea.observer"] == "source"
        assert (a["k8s.pod.name"], a["k8s.deployment.name"]) == (WEB[1], "web")
        assert (a["fovea.peer.namespace"], a["fovea.peer.workload"], a["fovea.peer.pod"]) == ("shop", "api", API[1])
        assert s.name == "http " + a["http.request.method"].lstrip("_")
        assert s.error == (a["http.response.status_code"] >= 500)
        assert 0 < s.duration <= max(times)  # request's first byte -> response's, inside the client's time
        # The client asks for /<status> (tests/kernel/test_http.py Handler).
        assert a.get("url.path") == (f"/{a['http.response.status_code']}" if agent.ratio == 1 else None)
    got = Counter((s.attributes["http.request.method"].lstrip("_"), s.attributes["http.response.status_code"])
                  for s in requests)
    sent = Counter()
    for _ in range(2 * MIXES[agent.ratio]):
        sent.update((m if m != "PURGE" else "OTHER", status) for m, status in MIX)
    assert sum(sent.values()) == made == sum(truth.values())
    if agent.ratio == 1:
        assert got == sent
        assert sum(s.duration for s in requests) <= sum(times)
        # The keep-alive connection holds its 11 requests; every fresh one its single request.
        per_connection = Counter(s.attributes["source.port"] for s in requests)
        assert sorted(per_connection.values()) == [1] * len(MIX) + [len(MIX)]
    else:
        assert got <= sent  # nothing the client did not make
        # binomial(88, 0.5): mean 44, sd 4.7; 4 sd either way (a false failure 1 in ~16,000).
        assert abs(len(requests) - made * agent.ratio) <= 4 * (made * agent.ratio * (1 - agent.ratio)) ** 0.5

    # fovea observe --http: the same requests, exactly (one sample feeds both).
    records = [json.loads(x) for x in observe(agent, "-o", "json", "--http", "--last", "1000")]
    assert {r["type"] for r in records} <= {"http"}
    assert Counter((r["source"]["port"], r["method"], r["status_code"]) for r in records) == Counter(
        (s.attributes["source.port"], s.attributes["http.request.method"].lstrip("_"),
         s.attributes["http.response.status_code"]) for s in requests)
    for r in records:
        assert (r["source"]["pod"], r["destination"]["pod"], r["destination"]["port"]) == (WEB[1], API[1], PORT)
        assert 0 < r["latency"] <= max(times) and r["observer"] == "source"
        assert r["path"] == (f"/{r['status_code']}" if agent.ratio == 1 else None)
    human = observe(agent, "--http", "--last", "1000")
    assert len(human) == len(records) and all(f"HTTP  tcp  shop/{WEB[1]}:" in line for line in human)
    assert observe(agent, "-o", "json", "--http", "--namespace", "elsewhere") == []
    assert observe(agent, "-o", "json", "--http", "--protocol", "udp") == []
