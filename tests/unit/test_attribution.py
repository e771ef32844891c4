"""The attribution stage on hand-built records: names, the traffic map's rules, NAT, the pending window."""

from __future__ import annotations

import pytest

from agent.attribution import APISERVER, EXTERNAL, WAIT, Attribution, Peer
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
        self.pod_networks = ("10.0.",)  # the nodes' pod CIDRs, as text prefixes

    def pod_by_ip(self, ip):
        return self.pods.get(ip)

    def service_by_ip(self, ip):
        return self.services.get(ip)

    def node_by_ip(self, ip):
        return self.nodes.get(ip)

    def in_pod_network(self, ip):
        return any(ip.startswith(prefix) for prefix in self.pod_networks)

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
    ("10.0.0.2", Peer("shop", "web", True, "web-1")),
    ("10.0.1.2", Peer("shop", "db", True, "db-0")),  # a pod of another node is still a cluster pod
    ("10.96.0.10", Peer("shop", "web", True)),  # a ClusterIP names the Service; what it sends, a pod sent
    ("10.96.0.1", Peer("", APISERVER, False)),
    ("192.168.0.1", Peer("", "n1", False)),  # a hostNetwork pod's traffic is the node's
    ("192.168.0.2", Peer("", "n2", False)),
    ("8.8.8.8", Peer("", EXTERNAL, False)),
])
def test_peer(ip, expected):
    assert Attribution(SOURCE, "n1").peer(ip) == expected


def test_local_pod_is_this_nodes_and_never_host_network():
    r = Attribution(SOURCE, "n1")
    assert r.local_pod("10.0.0.2").name == "web-1"
    assert r.local_pod("10.0.1.2") is None  # on n2
    assert r.local_pod("192.168.0.1") is None  # hostNetwork
    assert r.local_pod("") is None


def test_observed_by_annotation_namespace_or_all_pods():
    src = Source(pods=[pod("a-1", "10.0.0.5"), pod("b-1", "10.0.0.6", observe=True)])
    r = Attribution(src, "n1")
    assert [r.observed(p) for p in src.local_pods()] == [False, True]
    src.observed_namespaces.add("shop")
    assert [r.observed(p) for p in src.local_pods()] == [True, True]
    assert Attribution(Source(pods=[pod("a-1", "10.0.0.5")]), "n1", all_pods=True).observed(pod("a-1", "10.0.0.5"))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def stage(pods=(), services=(), window=30.0, max_pending=100):
    clock = Clock()
    a = Attribution(Source(pods=pods, services=services), "n1", all_pods=True, pending_window=window,
                    max_pending=max_pending, clock=clock)
    return a, clock


WEB, DB, SVC, API, OUT = "10.0.0.2", "10.0.0.3", "10.96.0.10", "10.96.0.1", "8.8.8.8"
CLUSTER = dict(pods=[pod("web-1", WEB), pod("db-0", DB)],
               services=[ServiceRecord("shop", "db-svc", (SVC,)), ServiceRecord("default", "kubernetes", (API,))])


def test_traffic_map_counts_a_service_exchange_once():
    """web -> db-svc (DNAT to db), db replies (reverse NAT): each packet once on the node."""
    a, _ = stage(**CLUSTER)
    a.set_pod_interfaces({5: (WEB,), 6: (DB,)})
    pairs = {
        "request at web": a.workload_pair(WEB, SVC, to_pod=False),
        "request at db (after DNAT)": a.workload_pair(WEB, DB, to_pod=True),
        "reply at db": a.workload_pair(DB, WEB, to_pod=False),
        "reply at web (after reverse NAT)": a.workload_pair(SVC, WEB, to_pod=True),
    }
    named = {k: (v[0].workload, v[1].workload) if v else None for k, v in pairs.items()}
    assert named == {"request at web": ("web", "db-svc"), "request at db (after DNAT)": None,
                     "reply at db": ("db", "web"), "reply at web (after reverse NAT)": None}


def test_traffic_map_counts_at_the_receiver_what_no_pod_sent():
    a, _ = stage(**CLUSTER)
    a.set_pod_interfaces({5: (WEB,)})
    sender, receiver = a.workload_pair(OUT, WEB, to_pod=True)
    assert (sender.workload, receiver.workload) == (EXTERNAL, "web")
    sender, _ = a.workload_pair(API, WEB, to_pod=True)  # the API server is no pod: its replies count here
    assert sender.workload == APISERVER
    assert a.workload_pair("172.16.0.9", OUT, to_pod=False) is None  # no pod, no pod network: not ours


def test_an_unknown_pod_address_waits_and_is_credited_when_the_pod_appears():
    a, clock = stage(**CLUSTER)
    new = "10.0.0.7"
    a.set_pod_interfaces({5: (WEB,), 7: (new,)})
    assert a.owner(new) is WAIT and a.interface_owner(7) is WAIT
    assert a.workload_pair(new, OUT, to_pod=False) is WAIT
    assert a.drop_owner(new, WEB) is WAIT
    pending = a.pending("pod_packets")
    credited = []

    def credit(key, p, b):
        owner = a.interface_owner(key)
        if owner is WAIT:
            return False
        credited.append((owner.name, p, b))
        return True

    pending.add({7: (3, 300)})
    clock.now += 10
    pending.add({7: (2, 200)})
    pending.drain(credit)
    assert credited == [] and len(pending) == 1
    a.source.pods[new] = pod("new-1", new)  # the API names it
    clock.now += 10
    pending.drain(credit)
    assert credited == [("new-1", 5, 500)] and a.unattributed["pod_packets"] == 0


def test_past_the_window_it_is_counted_unattributed_and_the_store_is_bounded():
    a, clock = stage(**CLUSTER, window=5.0, max_pending=2)
    a.set_pod_interfaces({7: ("10.0.0.7",), 8: ("10.0.0.8",), 9: ("10.0.0.9",)})
    pending = a.pending("dns")
    pending.add({"10.0.0.7": (4, 0), "10.0.0.8": (1, 0)})
    pending.add({"10.0.0.9": (6, 0)})  # no room: unattributed at once
    assert a.unattributed["dns"] == 6
    clock.now += 4
    pending.drain(lambda key, p, b: a.owner(key) is not WAIT)
    assert a.unattributed["dns"] == 6 and len(pending) == 2
    clock.now += 1
    pending.drain(lambda key, p, b: a.owner(key) is not WAIT)
    assert a.unattributed["dns"] == 11 and len(pending) == 0
    pending.add({"10.0.0.7": (1, 0)})
    pending.give_up(lambda key: key == "10.0.0.7")  # its interface went away
    assert a.unattributed["dns"] == 12


def test_addresses_off_the_pod_interfaces_never_wait():
    """The node's own address or a remote one: not a pod here, counted at node level only."""
    a, _ = stage(**CLUSTER)
    a.set_pod_interfaces({5: (WEB,)})
    assert a.owner("192.168.0.1") is None and a.owner(OUT) is None
    assert a.drop_owner(OUT, "192.168.0.1") is None
    assert a.drop_owner(OUT, WEB)[1] == "ingress" and a.drop_owner(WEB, OUT)[1] == "egress"


def test_records_naming_an_unknown_pod_are_held_then_named():
    from tests.unit.test_traces import flow

    a, clock = stage(**CLUSTER, window=5.0)
    new = "10.0.0.7"
    a.set_pod_interfaces({5: (WEB,), 7: (new,)})
    out = []
    held = a.holding("flow", out.append, lambda r: (r.source, r.destination))
    held.publish(flow(source=WEB, destination=DB))
    held.publish(flow(flow_id=2, source=new, destination=OUT))
    held.publish(flow(flow_id=3, source=WEB, destination=new))
    assert [r.flow_id for r in out] == [77] and len(held) == 2
    a.source.pods[new] = pod("new-1", new)
    held.release()
    assert [r.flow_id for r in out] == [77, 2, 3] and a.endpoint(new).pod == "new-1"
    del a.source.pods[new]
    held.publish(flow(flow_id=4, source=new, destination=OUT))
    clock.now += 5
    held.release()
    assert [r.flow_id for r in out][-1] == 4 and a.unattributed["flow"] == 1


def test_endpoint_names_local_pods_peers_and_services():
    a, _ = stage(pods=[pod("web-1", WEB), pod("db-0", "10.0.1.2", node="n2")], services=CLUSTER["services"])
    assert a.endpoint(WEB) == a.endpoint(WEB) and a.endpoint(WEB).local and a.endpoint(WEB).pod == "web-1"
    remote = a.endpoint("10.0.1.2")
    assert (remote.local, remote.pod, remote.workload, remote.workload_kind) == (False, "db-0", "db", "Deployment")
    svc = a.endpoint(SVC)
    assert (svc.namespace, svc.workload, svc.pod) == ("shop", "db-svc", "")
    assert a.endpoint(OUT).workload == EXTERNAL


def test_pending_counts_keep_what_is_not_taken_and_add_up():
    a, _ = stage()
    p = a.pending("pod_packets")
    p.add({"k1": (1, 10), "k2": (2, 20)})
    p.add({"k1": (1, 10)})
    taken = []
    p.drain(lambda key, packets, nbytes: key == "k1" and not taken.append((key, packets, nbytes)))
    assert taken == [("k1", 2, 20)] and len(p) == 1
    p.drain(lambda key, packets, nbytes: taken.append((key, packets, nbytes)) or True)
    assert taken[-1] == ("k2", 2, 20) and len(p) == 0 and a.unattributed["pod_packets"] == 0


def test_without_a_window_nothing_waits():
    """Standalone: a pods file never learns a pod, so records go on at once, counted."""
    from tests.unit.test_traces import flow

    a, _ = stage(**CLUSTER, window=0.0)
    a.set_pod_interfaces({7: ("10.0.0.7",)})
    out = []
    held = a.holding("flow", out.append, lambda r: (r.source, r.destination))
    held.publish(flow(source="10.0.0.7", destination=OUT))
    assert len(out) == 1 and a.unattributed["flow"] == 1
    pending = a.pending("pod_packets")
    pending.add({7: (3, 300)})
    pending.drain(lambda key, p, b: a.interface_owner(key) is not WAIT)
    assert a.unattributed["pod_packets"] == 3 and len(pending) == 0


def test_a_remote_address_in_a_pod_cidr_waits_for_its_pod_too():
    """A new pod of another node sends to web: until the API names it, the receiver
    cannot tell whether its node counts it (a pod) or it is the receiver's to count."""
    a, clock = stage(**CLUSTER, window=5.0)
    a.set_pod_interfaces({5: (WEB,)})
    remote = "10.0.9.9"
    assert a.workload_pair(remote, WEB, to_pod=True) is WAIT
    a.source.pods[remote] = pod("new-1", remote, node="n2")
    assert a.workload_pair(remote, WEB, to_pod=True) is None  # a pod sent it: its node counts it
    assert a.workload_pair("192.0.2.1", WEB, to_pod=True)[0].workload == EXTERNAL  # outside every pod CIDR
