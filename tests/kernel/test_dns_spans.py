"""DNS transactions as spans: real queries to a DNS server in a lab pod, decoded
by a gRPC OTLP receiver in the test (the DNS plugin publishes the transactions)."""

from __future__ import annotations

import socket
import time

import dns.message
import dns.query
import pytest
import yaml

from tests.conftest import RunningAgent
from tests.dns_server import DnsServer

pytestmark = pytest.mark.kernel

WEB = ("shop", "web-7d9c-abcde", "Deployment", "web")
DNS = ("kube-system", "coredns-5d78-xk2lp", "Deployment", "coredns")
TIMEOUT = 1.0
# name -> (qtype, expected rcode, None: no answer)
PLAN = {
    **{f"www{i}.shop.example": ("A", "NOERROR") for i in range(5)},
    **{f"v6-{i}.shop.example": ("AAAA", "NOERROR") for i in range(2)},
    **{f"nx{i}.shop.example": ("A", "NXDOMAIN") for i in range(3)},
    **{f"fail{i}.shop.example": ("A", "SERVFAIL") for i in range(2)},
    **{f"silent{i}.shop.example": ("A", None) for i in range(2)},
}


@pytest.fixture(scope="module")
def dns_span_agent(lab, receiver, tmp_path_factory):
    web, server = lab.pods
    pods = [{"ip": ip, "namespace": p[0], "pod": p[1], "workloadKind": p[2], "workloadName": p[3], "observe": True}
            for ep, p in ((web, WEB), (server, DNS)) for ip in (ep.ipv4, ep.ipv6)]
    d = tmp_path_factory.mktemp("dnsspans")
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    (d / "fovea.yaml").write_text(yaml.safe_dump({
        "staticPods": str(d / "pods.yaml"), "pods": {"interfaces": [lab.prefix + "p*"]},
        "dns": {"timeout": TIMEOUT, "sampleRatio": 1.0},
        "otlp": {"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint},
    }))
    agent = RunningAgent("--uplink", lab.uplink, "--config", str(d / "fovea.yaml"))
    yield agent
    assert agent.stop() == 0, agent.output()


def ask(lab, ns, server, name, rdtype) -> tuple[int, float | None]:
    """One UDP query; (client port, the client's latency or None when no answer is expected)."""
    sock = lab.socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", 0))
        port = sock.getsockname()[1]
        query = dns.message.make_query(name, rdtype)
        if name.startswith("silent"):
            sock.sendto(query.to_wire(), (server, 53))
            return port, None
        started = time.perf_counter()
        dns.query.udp(query, server, timeout=5, sock=sock)
        return port, time.perf_counter() - started
    finally:
        sock.close()


def test_dns_queries_are_one_span_each_with_rcode_and_status(lab, dns_span_agent, receiver):
    web, server_pod = lab.pods
    server = DnsServer(lab, server_pod.netns, server_pod.ipv4)
    try:
        asked = {name: ask(lab, web.netns, server_pod.ipv4, name, qtype) for name, (qtype, _) in PLAN.items()}
    finally:
        server.close()
    # Unanswered queries end only after the timeout and the next read: wait for all of
    # them (or the deadline), then for a moment more to see that no extra span comes.
    ours = lambda s: s.name.startswith("dns ") and s.attributes.get("source.address") == web.ipv4  # noqa: E731
    deadline = time.monotonic() + TIMEOUT * 5 + 20
    while len([s for s in receiver.where() if ours(s)]) < len(PLAN) and time.monotonic() < deadline:
        time.sleep(0.2)
    spans = receiver.wait(ours, timeout=5)
    by_name = {s.attributes["dns.question.name"].rstrip("."): s for s in spans}
    assert len(spans) == len(PLAN) and set(by_name) == set(PLAN)
    for name, (qtype, rcode) in PLAN.items():
        s, (port, latency) = by_name[name], asked[name]
        a = s.attributes
        assert s.name == f"dns {qtype}" and a["fovea.dns.qtype"] == qtype
        assert (a["source.port"], a["destination.address"], a["destination.port"]) == (port, server_pod.ipv4, 53)
        assert a["network.transport"] == "udp" and a["fovea.observer"] == "source"
        assert (a["k8s.pod.name"], a["k8s.deployment.name"]) == (WEB[1], "web")
        assert (a["fovea.peer.namespace"], a["fovea.peer.workload"]) == ("kube-system", "coredns")
        if rcode is None:
            assert s.error and s.status_message == "unanswered" and "fovea.dns.rcode" not in a
        else:
            assert a["fovea.dns.rcode"] == rcode
            assert s.error == (rcode == "SERVFAIL")  # NXDOMAIN is an answer, not an error
            assert 0 < s.duration <= latency + 0.001  # query -> answer on the wire, inside what the client saw
