"""Spans from hub records, exported by the real OTLP exporters to real receivers."""

from __future__ import annotations

import time

import pytest

from agent.config import Config, OtlpConfig
from agent.attribution import Attribution
from agent.events import CaptureReport, DnsTransaction, DropEvent, EventHub, FlowRecord, HttpRequest
from agent.k8s.static import StaticPods
from agent.traces import RateLimit, TraceExporter, otlp_enabled
from tests.conftest import free_port
from tests.otlp_receiver import GrpcReceiver, HttpReceiver

NOW = time.time()


def dns(**kw) -> DnsTransaction:
    base = dict(start=NOW, duration=0.0042, client="10.1.0.5", client_port=40000, server="10.1.0.9",
                server_port=53, transport="udp", id=4321, qtype="A", rcode="NOERROR", observer="source",
                name="web.shop.svc.cluster.local", answers=("10.96.0.12",))
    base.update(kw)
    return DnsTransaction(**base)


def flow(**kw) -> FlowRecord:
    base = dict(flow_id=77, window=0, start=NOW, end=NOW + 0.5, transport="tcp", family=4,
                source="10.1.0.5", source_port=40001, destination="10.1.0.9", destination_port=5432,
                packets=10, bytes=5000, reply_packets=8, reply_bytes=700, tcp_flags=0x1B,
                observer="source", final=True, end_reason="fin")
    base.update(kw)
    return FlowRecord(**base)


def http(**kw) -> HttpRequest:
    base = dict(start=NOW + 0.1, duration=0.002, client="10.1.0.5", client_port=40001, server="10.1.0.9",
                server_port=5432, method="GET", status_code=200, observer="source")
    base.update(kw)
    return HttpRequest(**base)


def attribution(tmp_path) -> Attribution:
    f = tmp_path / "pods.yaml"
    f.write_text("pods:\n"
                 "- {ip: 10.1.0.5, namespace: shop, pod: web-1, workloadKind: Deployment, workloadName: web}\n"
                 "- {ip: 10.1.0.9, namespace: shop, pod: db-0, workloadKind: StatefulSet, workloadName: db}\n")
    return Attribution(StaticPods.load(str(f)), "node-a")


def exporter(hub, receiver, protocol="grpc", **otlp) -> TraceExporter:
    cfg = Config(nodeName="node-a", otlp=OtlpConfig(enabled=True, protocol=protocol, endpoint=receiver, **otlp))
    return TraceExporter(cfg, hub, attribution=None)


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request):
    r = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    r.protocol = request.param
    yield r
    r.stop()


def test_dns_spans_carry_name_rcode_duration_and_status(receiver, tmp_path):
    hub = EventHub()
    cfg = Config(nodeName="node-a", otlp=OtlpConfig(enabled=True, protocol=receiver.protocol,
                                                    endpoint=receiver.endpoint))
    exp = TraceExporter(cfg, hub, attribution=attribution(tmp_path))
    hub.publish(dns())
    hub.publish(dns(id=2, rcode="NXDOMAIN", name="nope.example.", duration=0.010))
    hub.publish(dns(id=3, rcode=None, duration=None))
    hub.publish(dns(id=4, rcode="SERVFAIL"))
    hub.publish(dns(id=5, rcode="REFUSED"))
    exp.close()
    spans = {s.attributes["fovea.dns.id"]: s for s in receiver.wait(lambda s: True, timeout=10)}
    assert set(spans) == {4321, 2, 3, 4, 5}
    ok = spans[4321]
    assert ok.name == "dns A"
    assert ok.resource["service.name"] == "fovea" and ok.resource["k8s.node.name"] == "node-a"
    assert ok.attributes["dns.question.name"] == "web.shop.svc.cluster.local"
    assert ok.attributes["fovea.dns.rcode"] == "NOERROR" and not ok.error
    assert ok.end_ns - ok.start_ns == 4_200_000  # query -> answer
    assert ok.attributes["source.address"] == "10.1.0.5" and ok.attributes["destination.port"] == 53
    assert ok.attributes["network.transport"] == "udp" and ok.attributes["network.type"] == "ipv4"
    assert ok.attributes["k8s.pod.name"] == "web-1" and ok.attributes["k8s.deployment.name"] == "web"
    assert ok.attributes["fovea.peer.workload"] == "db" and ok.attributes["fovea.peer.pod"] == "db-0"
    assert ok.attributes["fovea.observer"] == "source"
    assert ok.attributes["fovea.dns.answers"] == ["10.96.0.12"]
    nx = spans[2]
    assert nx.attributes["fovea.dns.rcode"] == "NXDOMAIN" and not nx.error  # an answer, not an error
    unanswered = spans[3]
    assert unanswered.error and unanswered.status_message == "unanswered"
    assert "fovea.dns.rcode" not in unanswered.attributes
    assert spans[4].error and spans[4].status_message == "SERVFAIL"
    assert spans[5].error and spans[5].status_message == "REFUSED"
    assert exp.counts()["exported"] == 5 and exp.counts()["failed"] == 0


def test_flow_spans_windows_link_and_drops_become_events(receiver, tmp_path):
    hub = EventHub()
    cfg = Config(nodeName="node-a", otlp=OtlpConfig(enabled=True, protocol=receiver.protocol,
                                                    endpoint=receiver.endpoint))
    exp = TraceExporter(cfg, hub, attribution=attribution(tmp_path))
    # A long connection in two windows; a drop on it between them.
    hub.publish(flow(window=0, final=False, end_reason="interval", end=NOW + 60))
    hub.publish(DropEvent(time=NOW + 61, reason="NETFILTER_DROP", transport="tcp", family=4,
                          source="10.1.0.9", source_port=5432, destination="10.1.0.5", destination_port=40001,
                          packets=1, bytes=52))
    hub.publish(flow(window=1, start=NOW + 60, end=NOW + 62, tcp_flags=0x1F, connection="established"))  # RST seen
    hub.publish(flow(flow_id=78, transport="udp", source_port=5353, destination_port=53, tcp_flags=0,
                     observer="destination", end_reason="idle"))
    hub.publish(flow(flow_id=79, source_port=40002, tcp_flags=0x16, connection="refused"))  # SYN, RST|ACK
    hub.publish(flow(flow_id=80, source_port=40003, tcp_flags=0x02, connection="timeout", end_reason="idle"))
    exp.close()
    spans = receiver.wait(lambda s: True, timeout=10)
    failed = {s.attributes["fovea.flow.id"]: s for s in spans if s.attributes["fovea.flow.id"] in (79, 80)}
    assert [(failed[i].error, failed[i].status_message) for i in (79, 80)] == [
        (True, "connection refused"), (True, "connect timeout")]
    tcp = sorted((s for s in spans if s.name == "tcp connection" and s not in failed.values()),
                 key=lambda s: s.attributes["fovea.flow.window"])
    assert len(tcp) == 2
    first, second = tcp
    assert second.links == [(first.trace_id, first.span_id)]
    assert first.attributes["fovea.flow.bytes"] == 5000 and first.attributes["fovea.flow.reply_packets"] == 8
    assert first.duration == pytest.approx(60, abs=1e-6)
    assert not first.error and second.error and second.status_message == "connection reset"
    assert second.attributes["fovea.tcp.flags"] == "FIN|SYN|RST|PSH|ACK"
    assert second.attributes["fovea.tcp.connection"] == "established"
    assert "fovea.tcp.connection" not in first.attributes  # undecided, or no SYN seen
    assert [(n, a["fovea.drop.reason"]) for n, _, a in second.events] == [("drop", "NETFILTER_DROP")]
    assert first.events == []
    udp = next(s for s in spans if s.name == "udp flow")
    # The node saw the destination end: the local pod is the destination's.
    assert udp.attributes["fovea.observer"] == "destination"
    assert udp.attributes["k8s.pod.name"] == "db-0" and udp.attributes["k8s.statefulset.name"] == "db"
    assert udp.attributes["fovea.peer.pod"] == "web-1"


def test_http_requests_are_children_of_their_connections_window(receiver, tmp_path):
    """Requests come before the window that holds them is reported (the reader publishes
    them first), or just after it; each span's parent is that window's span."""
    hub = EventHub()
    cfg = Config(nodeName="node-a", otlp=OtlpConfig(enabled=True, protocol=receiver.protocol,
                                                    endpoint=receiver.endpoint))
    exp = TraceExporter(cfg, hub, attribution=attribution(tmp_path))
    hub.publish(http(start=NOW + 1, status_code=201, method="POST", path="/orders"))
    hub.publish(http(start=NOW + 2, status_code=None, duration=None))
    hub.publish(flow(window=0, final=False, end_reason="interval", end=NOW + 60))
    hub.publish(http(start=NOW + 59, status_code=503, method="OTHER"))  # published after its window
    hub.publish(http(start=NOW + 61, status_code=404, method="DELETE", observer="destination"))
    hub.publish(flow(window=1, start=NOW + 60, end=NOW + 62))
    hub.publish(http(start=NOW, client_port=40002))  # another connection: its flow is not reported
    exp.close()
    spans = receiver.wait(lambda s: True, timeout=10)
    first, second = sorted((s for s in spans if s.name == "tcp connection"),
                           key=lambda s: s.attributes["fovea.flow.window"])
    requests = {s.attributes.get("http.response.status_code"): s for s in spans if s.name.startswith("http ")}
    assert len(requests) == 5 and len(spans) == 7
    for code, window in ((201, first), (None, first), (503, first), (404, second)):
        s = requests[code]
        assert (s.trace_id, s.parent_span_id) == (window.trace_id, window.span_id), code
    assert first.parent_span_id == b"" and second.parent_span_id == b""
    ok = requests[201]
    assert ok.name == "http POST" and ok.attributes["http.request.method"] == "POST" and not ok.error
    assert ok.end_ns - ok.start_ns == 2_000_000
    assert ok.attributes["url.path"] == "/orders" and "url.path" not in requests[404].attributes
    assert (ok.attributes["k8s.pod.name"], ok.attributes["fovea.peer.pod"]) == ("web-1", "db-0")
    assert (ok.attributes["source.port"], ok.attributes["destination.port"]) == (40001, 5432)
    assert ok.attributes["network.transport"] == "tcp" and ok.attributes["fovea.observer"] == "source"
    assert requests[None].error and requests[None].status_message == "no response"
    assert "http.response.status_code" not in requests[None].attributes
    assert requests[503].error and requests[503].attributes["http.request.method"] == "_OTHER"
    assert not requests[404].error  # an answer: only 5xx and no response are errors
    assert requests[404].attributes["k8s.pod.name"] == "db-0"  # the server's end was seen
    orphan = requests[200]  # its parent is the window to come, never reported here
    assert orphan.parent_span_id not in {first.span_id, second.span_id} and orphan.parent_span_id


def test_a_connection_and_its_requests_are_sampled_together():
    hub = EventHub()
    cfg = Config(otlp=OtlpConfig(enabled=True, endpoint="http://127.0.0.1:9", sampleRatio=0.5))
    exp = TraceExporter(cfg, hub)
    try:
        kept = []
        for port in range(40000, 40400):
            decisions = {exp._sampled(flow(source_port=port, flow_id=port)),
                         exp._sampled(flow(source_port=port, flow_id=port + 1, window=1)),
                         exp._sampled(http(client_port=port)), exp._sampled(http(client_port=port, method="PUT"))}
            assert len(decisions) == 1, port  # all or none
            kept.append(decisions.pop())
        assert 140 <= sum(kept) <= 260  # binomial(400, 0.5): mean 200, sd 10; 6 sd
    finally:
        exp.close()


def test_collector_down_drops_are_counted_and_memory_is_bounded_then_export_resumes():
    port = free_port()
    hub = EventHub()
    cfg = Config(nodeName="n", otlp=OtlpConfig(enabled=True, protocol="grpc", endpoint=f"http://127.0.0.1:{port}",
                                               queueSize=50, batchSize=10, maxSpansPerSecond=100000))
    exp = TraceExporter(cfg, hub)
    n = 2000
    for i in range(n):
        hub.publish(dns(id=i))
    deadline = time.monotonic() + 20
    while exp.sub.queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.05)
    c = exp.counts()
    assert c["queued"] <= 50  # bounded, whatever arrives
    assert c["exported"] == 0
    receiver = GrpcReceiver(port)
    try:
        deadline = time.monotonic() + 30
        while exp.counts()["queued"] and time.monotonic() < deadline:
            time.sleep(0.2)
        c = exp.counts()
        # Every record is accounted for: exported, failed while down, or dropped.
        assert c["records_lost"] == 0
        assert c["exported"] + c["failed"] + c["queue_full"] == n
        assert c["queue_full"] > 0 and c["exported"] > 0
        hub.publish(dns(id=99999))
        assert receiver.wait(lambda s: s.attributes.get("fovea.dns.id") == 99999, timeout=15)
    finally:
        exp.close()
        receiver.stop()


def test_sampling_and_rate_cap():
    hub = EventHub()
    cfg = Config(otlp=OtlpConfig(enabled=True, endpoint="http://127.0.0.1:9", sampleRatio=0.0))
    exp = TraceExporter(cfg, hub)
    try:
        for i in range(10):
            exp.handle(dns(id=i))
        assert exp.counts()["sampled_out"] == 10
    finally:
        exp.close()
    t = [0.0]
    limit = RateLimit(5, clock=lambda: t[0])
    assert sum(limit.allow() for _ in range(20)) == 5
    t[0] = 1.0
    assert sum(limit.allow() for _ in range(20)) == 5


def test_one_switch_turns_otlp_on(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not otlp_enabled(Config())
    assert otlp_enabled(Config(otlp=OtlpConfig(enabled=True)))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert otlp_enabled(Config())
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not otlp_enabled(Config())


def test_a_capture_run_is_one_span_failed_ones_are_errors(receiver):
    hub = EventHub()
    cfg = Config(nodeName="node-a", otlp=OtlpConfig(enabled=True, protocol=receiver.protocol,
                                                    endpoint=receiver.endpoint, sampleRatio=0.0))
    exp = TraceExporter(cfg, hub)
    hub.publish(CaptureReport(kind="Capture", namespace="shop", name="web-debug", uid="u-1", start=NOW,
                              end=NOW + 30, phase="Succeeded", packets=120, bytes=98_000, dropped_packets=2,
                              filter="tcp port 80", location="hostpath://node-a/u-1/web-debug-node-a.tar.gz"))
    hub.publish(CaptureReport(kind="ClusterCapture", namespace="", name="nodes", uid="u-2", start=NOW,
                              end=NOW + 1, phase="Failed", message="bad filter: syntax error"))
    exp.close()
    spans = {s.name: s for s in receiver.wait(lambda s: True, timeout=10)}
    assert set(spans) == {"capture web-debug", "capture nodes"}  # captures are never sampled out
    ok = spans["capture web-debug"]
    assert ok.duration == pytest.approx(30, abs=1e-6) and not ok.error
    assert ok.attributes["k8s.namespace.name"] == "shop"
    assert ok.attributes["fovea.capture.packets"] == 120 and ok.attributes["fovea.capture.dropped_packets"] == 2
    assert ok.attributes["fovea.capture.filter"] == "tcp port 80"
    assert ok.attributes["fovea.capture.location"].endswith("web-debug-node-a.tar.gz")
    failed = spans["capture nodes"]
    assert failed.error and failed.status_message == "bad filter: syntax error"
    assert failed.attributes["fovea.capture.kind"] == "ClusterCapture" and "k8s.namespace.name" not in failed.attributes
