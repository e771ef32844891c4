"""The attribution rules on real NAT and a pod the API learns of late (DESIGN.md counting rules).

One lab node (node-a) with the Kubernetes API emulator:

    pod0  shop/web-7d9c-abcde  Deployment web     client
    pod1  shop/db-0            StatefulSet db     backend of the Service shop/db-svc
    world                      behind the lab uplink, the outside

- a Service: the host DNATs a ClusterIP to db the way kube-proxy does (nat
  PREROUTING/OUTPUT chains of the test's own); each request and each reply is
  counted once in the traffic map (web -> db-svc, db -> web), equal to the
  iptables packet counters of the sender's namespace, and each connection is
  one span;
- MASQUERADE: the host masquerades web's traffic to the world; each
  connection is one span and one flow-stream record with web's address, and
  node forward still counts every segment;
- a new pod: traffic before its IP reaches the API is credited to it when the
  API names it within podLevel.pendingWindow, and counted in
  fovea_agent_unattributed_total past it.
"""

from __future__ import annotations

import json
import subprocess
import time

import dns.rdatatype
import pytest
import yaml

from tests.conftest import FOVEA, RunningAgent, node_lab
from tests.dns_server import DnsServer
from tests.k8s_emulator import K8sEmulator, make_namespace, make_pod, make_service
from tests.kernel.conftest import HostNat, rule_counters
from tests.kernel.test_dns import ask
from tests.kernel.test_flows import Server, exchange

pytestmark = pytest.mark.kernel

NODE = "node-a"
WINDOW = 8.0  # podLevel.pendingWindow
IDLE = 2.0  # flows.idleTimeout
WEB = {"namespace": "shop", "pod": "web-7d9c-abcde", "workload_kind": "Deployment", "workload_name": "web"}
DB = {"namespace": "shop", "pod": "db-0", "workload_kind": "StatefulSet", "workload_name": "db"}


@pytest.fixture(scope="module")
def lab(root):
    with node_lab(pods=2, ipv6=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def cluster(lab, receiver, tmp_path_factory):
    web, db = lab.pods[:2]
    api = K8sEmulator().start()
    api.create(make_namespace("shop", annotations={"fovea.dev/observe": "true"}))
    api.create(make_pod(WEB["pod"], "shop", NODE, web.ipv4, labels={"pod-template-hash": "7d9c"},
                        owner=("ReplicaSet", "web-7d9c")))
    api.create(make_pod(DB["pod"], "shop", NODE, db.ipv4, owner=("StatefulSet", "db")))
    api.create(make_service("db-svc", "shop", cluster_ip(lab)))
    d = tmp_path_factory.mktemp("attribution")
    kubeconfig = api.write_kubeconfig(d / "kubeconfig")
    cfg = d / "fovea.yaml"
    cfg.write_text(yaml.safe_dump({
        "pods": {"interfaces": [lab.prefix + "p*"]},
        "podLevel": {"pendingWindow": WINDOW},
        "flows": {"idleTimeout": IDLE, "reportInterval": 60.0},
        "otlp": {"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint},
    }))
    agent = RunningAgent("--uplink", lab.uplink, "--kubeconfig", str(kubeconfig), "--node-name", NODE,
                         "--config", str(cfg))
    try:
        agent.wait_cached("services")
        yield api, agent
    finally:
        assert agent.stop() == 0, agent.output()
        api.stop()


def cluster_ip(lab) -> str:
    return f"10.{lab.octet}.99.10"


def sent(lab, ep, *match: str) -> tuple[int, int]:
    """(packets, bytes) an OUTPUT counting rule in `ep`'s namespace matched (added on first use)."""
    counted = rule_counters(lab, ep.netns, "OUTPUT", "fovea-test")
    if counted is None:
        lab.run(ep.netns, "iptables", "-w", "-A", "OUTPUT", *match, "-m", "comment", "--comment", "fovea-test")
        return 0, 0
    return counted


def traffic(agent, source: str, destination: str) -> tuple[float, float]:
    """The traffic map's TCP series source -> destination ("namespace/workload" each)."""
    (sns, swl), (dns_, dwl) = source.split("/"), destination.split("/")
    labels = dict(source_namespace=sns, source_workload=swl, destination_namespace=dns_,
                  destination_workload=dwl, protocol="tcp")
    return (agent.settled("fovea_workload_flow_packets_total", **labels),
            agent.settled("fovea_workload_flow_bytes_total", **labels))


def test_a_service_exchange_is_counted_once_and_is_one_span_per_connection(lab, cluster, receiver):
    api, agent = cluster
    web, db = lab.pods[:2]
    vip, n = cluster_ip(lab), 6
    dnat = HostNat(lab, "svc", ("PREROUTING", "OUTPUT"), [
        ["-d", f"{vip}/32", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", f"{db.ipv4}:8080"]])
    # Ground truth: what each sender's namespace sent (small messages: one segment each, no GSO).
    sent(lab, web, "-d", vip, "-p", "tcp", "--dport", "80")
    sent(lab, db, "-s", db.ipv4, "-p", "tcp", "--sport", "8080")
    pairs = ("shop/web>shop/db-svc", "shop/db>shop/web", "shop/db-svc>shop/web", "shop/web>shop/db")
    before = {k: traffic(agent, *k.split(">")) for k in pairs}
    assert before["shop/db-svc>shop/web"] == (0, 0)
    server = Server(lab, db, 8080, 500)
    try:
        with dnat:
            made = [exchange(lab, web, vip, 80, 300) for _ in range(n)]
    finally:
        server.close()
    assert server.received == [300] * n and all(r == 500 for _, _, r in made)
    requests, replies = sent(lab, web), sent(lab, db)
    assert requests[0] >= 4 * n and replies[0] >= 4 * n  # handshake, data, close

    def delta(key):
        now = traffic(agent, *key.split(">"))
        return (now[0] - before[key][0], now[1] - before[key][1])

    assert delta("shop/web>shop/db-svc") == requests  # the request, named by the ClusterIP before DNAT
    assert delta("shop/db>shop/web") == replies  # the reply, where the backend sent it
    assert delta("shop/db-svc>shop/web") == (0, 0)  # never again under the Service's name
    assert delta("shop/web>shop/db") == (0, 0)  # the request after DNAT is not counted twice

    spans = receiver.wait(lambda s: s.attributes.get("source.address") == web.ipv4
                          and s.attributes.get("source.port") in {m[0] for m in made}, timeout=IDLE * 5 + 20)
    assert sorted(s.attributes["source.port"] for s in spans) == sorted(m[0] for m in made)
    assert not [s for s in receiver.spans if 8080 in (s.attributes.get("source.port"),
                                                        s.attributes.get("destination.port"))]
    for s in spans:
        a = s.attributes
        assert (a["destination.address"], a["destination.port"], a["fovea.flow.end_reason"]) == (vip, 80, "fin")
        assert (a["k8s.pod.name"], a["fovea.peer.workload"], a["fovea.observer"]) == (WEB["pod"], "db-svc", "source")
    assert sum(s.attributes["fovea.flow.packets"] for s in spans) == requests[0]
    assert sum(s.attributes["fovea.flow.bytes"] for s in spans) == requests[1]
    assert sum(s.attributes["fovea.flow.reply_packets"] for s in spans) == replies[0]
    assert sum(s.attributes["fovea.flow.reply_bytes"] for s in spans) == replies[1]


def observe(agent, *args) -> list[dict]:
    out = subprocess.run([FOVEA, "observe", "--server", f"127.0.0.1:{agent.observe_port}", "-o", "json", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_a_masqueraded_connection_is_one_flow_kept_with_the_pods_address(lab, cluster, receiver):
    api, agent = cluster
    web, world = lab.pods[0], lab.world
    port, n = 7300, 4
    node_address = world.gateway4  # what MASQUERADE writes: the host's address on the uplink
    masquerade = HostNat(lab, "masq", ("POSTROUTING",), [
        ["-s", f"{web.ipv4}/32", "-o", lab.uplink, "-j", "MASQUERADE"]])
    out0 = [agent.settled("fovea_forward_packets_total", direction=d) for d in ("egress", "ingress")]
    segs0 = [lab.snmp(web.netns, "Tcp", "OutSegs"), lab.snmp(world.netns, "Tcp", "OutSegs")]
    server = Server(lab, world, port, 700)
    try:
        with masquerade:
            made = [exchange(lab, web, world.ipv4, port, 400) for _ in range(n)]
    finally:
        server.close()
    assert server.received == [400] * n
    segs1 = [lab.snmp(web.netns, "Tcp", "OutSegs"), lab.snmp(world.netns, "Tcp", "OutSegs")]
    out1 = [agent.settled("fovea_forward_packets_total", direction=d) for d in ("egress", "ingress")]
    assert [b - a for a, b in zip(out0, out1)] == [b - a for a, b in zip(segs0, segs1)]

    ours = {m[0] for m in made}
    spans = receiver.wait(lambda s: s.attributes.get("destination.port") == port
                          and s.attributes.get("source.port") in ours, timeout=IDLE * 5 + 20)
    time.sleep(IDLE + 2)  # a second record of any of them would have ended by now
    every = [s for s in receiver.spans if port in (s.attributes.get("source.port"),
                                                   s.attributes.get("destination.port"))]
    assert len(every) == n == len(spans)
    assert {s.attributes["source.address"] for s in every} == {web.ipv4}
    assert not [s for s in receiver.spans if node_address in (s.attributes.get("source.address"),
                                                              s.attributes.get("destination.address"))]
    for s in spans:
        a = s.attributes
        assert a["k8s.pod.name"] == WEB["pod"] and a["fovea.peer.workload"] == "external"
        assert a["fovea.flow.reply_packets"] >= 4 and a["fovea.flow.end_reason"] == "fin"
    records = [r for r in observe(agent, "--port", str(port), "--last", "1000") if r["type"] == "flow"]
    assert sorted(r["source"]["port"] for r in records) == sorted(ours)
    assert all(r["source"]["address"] == web.ipv4 and r["source"]["pod"] == WEB["pod"] for r in records)


def eventually(read, expected, timeout: float = 15.0):
    """What `read()` returns once it equals `expected` (credits land on the next read), or at the timeout."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.3)
    return value


def pod_series(agent, metric: str, pod: str, **labels) -> float:
    return agent.scrape().get(metric, namespace="shop", pod=pod, workload_kind="Pod", workload_name=pod, **labels)


def unattributed(agent) -> dict[str, float]:
    m = agent.scrape()
    return {s: m.get("fovea_agent_unattributed_total", signal=s)
            for s in ("pod_packets", "workload_flow", "dns", "flow")}


def new_pod(lab, agent, name: str, subnet: int):
    """A pod interface the agent counts on, whose pod the API does not know yet."""
    ep = lab.add_pod(name, subnet)
    deadline = time.monotonic() + 20
    while f"counting pod interface {ep.host_if} " not in agent.output():
        assert time.monotonic() < deadline, agent.output()
        time.sleep(0.2)
    time.sleep(2.5)  # and a scan that saw its address (scans run every interval: 1 s)
    return ep


def talk(lab, ep, world, pings: int, queries: int) -> None:
    out = lab.run(ep.netns, "ping", "-4", "-c", str(pings), "-i", "0.002", "-q", world.ipv4).stdout
    assert f"{pings} received" in out, out
    for i in range(queries):
        response, _ = ask(lab, ep.netns, world.ipv4, f"n{i}.example.", dns.rdatatype.A)
        assert response is not None


def test_a_new_pods_first_packets_wait_for_it_and_past_the_window_are_unattributed(lab, cluster):
    api, agent = cluster
    world = lab.world
    resolver = DnsServer(lab, world.netns, world.ipv4)
    try:
        # Within the window: the API names the pod seconds after its first packets.
        early = new_pod(lab, agent, "p8", 8)
        talk(lab, early, world, pings=7, queries=3)
        time.sleep(3)
        api.create(make_pod("early-1", "shop", NODE, early.ipv4))
        for direction in ("egress", "ingress"):  # pings and DNS queries, their replies
            assert eventually(lambda: pod_series(agent, "fovea_pod_packets_total", "early-1",
                                                 direction=direction), 7 + 3) == 7 + 3
        assert eventually(lambda: pod_series(agent, "fovea_pod_dns_requests_total", "early-1", qtype="A"), 3) == 3
        assert eventually(lambda: pod_series(agent, "fovea_pod_dns_responses_total", "early-1", qtype="A",
                                             rcode="NOERROR"), 3) == 3

        # Past the window: counted as unattributed, in each signal's unit.
        before = unattributed(agent)
        late = new_pod(lab, agent, "p9", 9)
        talk(lab, late, world, pings=5, queries=2)
        time.sleep(WINDOW + IDLE + 6)  # the window, and the flows' idle end before theirs
        after = unattributed(agent)
        assert {s: after[s] - before[s] for s in after} == {
            "pod_packets": 2 * (5 + 2),  # echo requests and replies, queries and responses
            "workload_flow": 2 * (5 + 2),
            "dns": 2 * 2,  # queries and responses, each keyed by the pod's address
            "flow": 1 + 2,  # one ICMP flow, one UDP flow per query (a new source port each)
        }
        api.create(make_pod("late-1", "shop", NODE, late.ipv4))
        agent.wait_cached("pods", 4, timeout=10)
        talk(lab, late, world, pings=4, queries=0)
        for direction in ("egress", "ingress"):  # only what came after the pod did
            assert eventually(lambda: pod_series(agent, "fovea_pod_packets_total", "late-1",
                                                 direction=direction), 4) == 4
        time.sleep(2)  # nothing more lands
        assert pod_series(agent, "fovea_pod_packets_total", "late-1", direction="egress") == 4
        assert unattributed(agent) == after
    finally:
        resolver.close()
