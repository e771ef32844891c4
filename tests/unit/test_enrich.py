"""Resolver: local pods, peers, services, nodes, the API server, the outside."""

from __future__ import annotations

import pytest

from agent.enrich import APISERVER, EXTERNAL, Peer, Resolver
from agent.k8s.records import NodeRecord, PodRecord, ServiceRecord


def pod(name, ip, node="n1", host_network=False, observe=False, ns="shop"):
    return PodRecord(ns, name, "uid-" + name, node, (ip,), host_network, observe, "Deployment", name.split("-")[0], "Running")


class Source:
    synced = True

    def __init__(self, pods=(), services=(), nodes=()):
        self.pods = {ip: p for p in pods for ip in p.ips}
        self.services = {ip: s for s in services for ip in s.cluster_ips}
        self.nodes = {ip: n for n in nodes for ip in n.ips}
        self.observed_namespaces = set()

    def pod_by_ip(self, ip):
        return self.pods.get(ip)

    def service_by_ip(self, ip):
        return self.services.get(ip)

    def node_by_ip(self, ip):
        return self.nodes.get(ip)

    def pod_observed(self, p):
        return p.observe or p.namespace in self.observed_namespaces

    def local_pods(self):
        return list(self.pods.values())


SOURCE = Source(
    pods=[pod("web-1", "10.0.0.2"), pod("db-0", "10.0.1.2", node="n2"),
          pod("agent-x", "192.168.0.1", host_network=True)],
    services=[ServiceRecord("shop", "web", ("10.96.0.10",)), ServiceRecord("default", "kubernetes", ("10.96.0.1",))],
    nodes=[NodeRecord("n1", ("192.168.0.1",)), NodeRecord("n2", ("192.168.0.2",))],
)


@pytest.mark.parametrize("ip, expected", [
    ("10.0.0.2", Peer("shop", "web", True)),
    ("10.0.1.2", Peer("shop", "db", True)),  # a pod of another node is still a cluster pod
    ("10.96.0.10", Peer("shop", "web", False)),  # a ClusterIP before DNAT names the Service
    ("10.96.0.1", Peer("", APISERVER, False)),
    ("192.168.0.1", Peer("", "n1", False)),  # a hostNetwork pod's traffic is the node's
    ("192.168.0.2", Peer("", "n2", False)),
    ("8.8.8.8", Peer("", EXTERNAL, False)),
])
def test_peer(ip, expected):
    assert Resolver(SOURCE, "n1").peer(ip) == expected


def test_local_pod_is_this_nodes_and_never_host_network():
    r = Resolver(SOURCE, "n1")
    assert r.local_pod("10.0.0.2").name == "web-1"
    assert r.local_pod("10.0.1.2") is None  # on n2
    assert r.local_pod("192.168.0.1") is None  # hostNetwork
    assert r.local_pod("") is None


def test_observed_by_annotation_namespace_or_all_pods():
    src = Source(pods=[pod("a-1", "10.0.0.5"), pod("b-1", "10.0.0.6", observe=True)])
    r = Resolver(src, "n1")
    assert [r.observed(p) for p in src.local_pods()] == [False, True]
    src.observed_namespaces.add("shop")
    assert [r.observed(p) for p in src.local_pods()] == [True, True]
    assert Resolver(Source(pods=[pod("a-1", "10.0.0.5")]), "n1", all_pods=True).observed(pod("a-1", "10.0.0.5"))
