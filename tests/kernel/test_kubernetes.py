"""Pod metrics and the traffic map with the Kubernetes API (the emulator) and two
simulated nodes over one lab: each agent owns the pods the API puts on its node.

    pod0  shop/web-7d9c-abcde  Deployment web   node-a   (namespace shop observed)
    pod1  shop/db-0            StatefulSet db   node-b
    pod2  other/cli-1          Pod cli-1        node-a   (namespace other not observed)
"""

from __future__ import annotations

import subprocess
import time

import pytest
import requests

from tests.conftest import RunningAgent, node_lab
from tests.k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod

pytestmark = pytest.mark.kernel

ECHO_V4 = 20 + 8 + 56
WEB = {"namespace": "shop", "pod": "web-7d9c-abcde", "workload_kind": "Deployment", "workload_name": "web"}
DB = {"namespace": "shop", "pod": "db-0", "workload_kind": "StatefulSet", "workload_name": "db"}
CLI = {"namespace": "other", "pod": "cli-1", "workload_kind": "Pod", "workload_name": "cli-1"}


@pytest.fixture(scope="module")
def cluster(lab3, tmp_path_factory):
    api = K8sEmulator().start()
    web, db, cli = lab3.pods
    api.create(make_namespace("shop", annotations={"fovea.dev/observe": "true"}))
    api.create(make_namespace("other"))
    api.create(make_node("node-a", "192.0.2.201"))
    api.create(make_node("node-b", "192.0.2.202"))
    api.create(make_pod(WEB["pod"], "shop", "node-a", (web.ipv4, web.ipv6), labels={"pod-template-hash": "7d9c"},
                        owner=("ReplicaSet", "web-7d9c")))
    api.create(make_pod(DB["pod"], "shop", "node-b", (db.ipv4, db.ipv6), owner=("StatefulSet", "db")))
    api.create(make_pod(CLI["pod"], "other", "node-a", (cli.ipv4, cli.ipv6)))
    d = tmp_path_factory.mktemp("k8s")
    kubeconfig = api.write_kubeconfig(d / "kubeconfig")
    cfg = d / "fovea.yaml"
    cfg.write_text(f"pods: {{interfaces: ['{lab3.prefix}p*']}}\npodLevel: {{seriesTTL: 2}}\n")
    agents = {
        node: RunningAgent("--uplink", lab3.uplink, "--kubeconfig", str(kubeconfig), "--node-name", node,
                           "--config", str(cfg))
        for node in ("node-a", "node-b")
    }
    yield api, agents
    for a in agents.values():
        assert a.stop() == 0, a.output()
    api.stop()


@pytest.fixture(scope="module")
def lab3(root):
    with node_lab(pods=3) as lab:
        yield lab


def pod_packets(agent, labels, direction) -> tuple[float, float]:
    return (agent.settled("fovea_pod_packets_total", **labels, direction=direction),
            agent.settled("fovea_pod_bytes_total", **labels, direction=direction))


def flows(agents, src, dst, protocol="icmp") -> list[float]:
    """The same flow as each agent reports it."""
    return [a.settled("fovea_workload_flow_packets_total", source_namespace=src["namespace"],
                      source_workload=src["workload_name"], destination_namespace=dst["namespace"],
                      destination_workload=dst["workload_name"], protocol=protocol) for a in agents.values()]


def ping(lab, src, dst_ip, n) -> None:
    out = lab.run(src.netns, "ping", "-4", "-c", str(n), "-i", "0.002", "-q", dst_ip).stdout
    assert f"{n} received" in out, out


def test_cross_node_flow_counts_once_and_each_node_has_its_pods(lab3, cluster):
    api, agents = cluster
    a, b = agents["node-a"], agents["node-b"]
    web, db = lab3.pods[:2]
    n = 20
    w0 = {d: pod_packets(a, WEB, d) for d in ("egress", "ingress")}
    d0 = {d: pod_packets(b, DB, d) for d in ("egress", "ingress")}
    f0 = flows(agents, WEB, DB), flows(agents, DB, WEB)
    ping(lab3, web, db.ipv4, n)
    w1 = {d: pod_packets(a, WEB, d) for d in ("egress", "ingress")}
    d1 = {d: pod_packets(b, DB, d) for d in ("egress", "ingress")}
    f1 = flows(agents, WEB, DB), flows(agents, DB, WEB)
    for d in ("egress", "ingress"):
        assert (w1[d][0] - w0[d][0], w1[d][1] - w0[d][1]) == (n, n * ECHO_V4)
        assert (d1[d][0] - d0[d][0], d1[d][1] - d0[d][1]) == (n, n * ECHO_V4)
    # web -> db counted by node-a (the sender's), db -> web by node-b: once per cluster.
    assert [x - y for x, y in zip(f1[0], f0[0])] == [n, 0]
    assert [x - y for x, y in zip(f1[1], f0[1])] == [0, n]
    # Each node has series for its own pods only.
    assert b.scrape().get("fovea_pod_packets_total", **WEB, direction="egress") == 0
    assert a.scrape().get("fovea_pod_packets_total", **DB, direction="egress") == 0


def test_unannotated_pod_has_no_series_until_its_namespace_is_annotated(lab3, cluster):
    api, agents = cluster
    a = agents["node-a"]
    web, _, cli = lab3.pods[:3]
    ping(lab3, cli, web.ipv4, 5)
    assert not [k for k in a.scrape().samples if k[0].startswith("fovea_pod_") and ("pod", "cli-1") in k[1]]
    f0 = flows(agents, CLI, WEB)
    api.patch("namespaces", "other", {"metadata": {"annotations": {"fovea.dev/observe": "true"}}})
    time.sleep(1.5)  # the watch delivers it; traffic from now on is counted
    a.settled("fovea_pod_packets_total", **WEB, direction="egress")
    n = 9
    ping(lab3, cli, web.ipv4, n)
    assert pod_packets(a, CLI, "egress") == (n, n * ECHO_V4)
    # The traffic map counted all of it, annotated or not, at cli's node only.
    assert [x - y for x, y in zip(flows(agents, CLI, WEB), f0)] == [n, 0]


def test_api_outage_keeps_node_metrics_and_health_then_catches_up(lab3, cluster):
    api, agents = cluster
    a = agents["node-a"]
    web = lab3.pods[0]
    api.stop()
    try:
        for _ in range(3):  # 30 s without the API server
            e0 = a.settled("fovea_forward_packets_total", direction="egress")
            ping(lab3, web, lab3.world.ipv4, 10)
            assert a.settled("fovea_forward_packets_total", direction="egress") - e0 == 10
            assert requests.get(a.url + "/healthz", timeout=5).status_code == 200
            time.sleep(10)
    finally:
        api.start()
    new = lab3.add_pod("p9", 9)
    api.create(make_pod("web-7d9c-fghij", "shop", "node-a", (new.ipv4, new.ipv6), labels={"pod-template-hash": "7d9c"},
                        owner=("ReplicaSet", "web-7d9c")))
    labels = {**WEB, "pod": "web-7d9c-fghij"}
    deadline = time.monotonic() + 30  # the cache reconnects with backoff, then relists or resumes
    while time.monotonic() < deadline:
        ping(lab3, new, lab3.world.ipv4, 1)
        if a.scrape().get("fovea_pod_packets_total", **labels, direction="egress") > 0:
            break
        time.sleep(1)
    before = pod_packets(a, labels, "egress")[0]
    assert before > 0, "the new pod was never named after the API came back"
    ping(lab3, new, lab3.world.ipv4, 7)
    assert pod_packets(a, labels, "egress")[0] - before == 7
    assert a.proc.poll() is None


def test_cluster_ip_seen_before_dnat_names_the_service(lab3, cluster):
    """The pod's interface sees the ClusterIP (kube-proxy's DNAT happens later, in
    the host): the flow goes to the Service. The DNAT rule is the test's own,
    matched on the lab's interface, and removed afterwards."""
    from tests.k8s_emulator import make_service

    api, agents = cluster
    web, db = lab3.pods[:2]
    cluster_ip = f"10.{lab3.octet}.200.10"
    api.create(make_service("db-svc", "shop", cluster_ip, selector={"app": "db"}))
    rule = ["PREROUTING", "-i", web.host_if, "-d", cluster_ip, "-j", "DNAT", "--to-destination", db.ipv4]
    subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True)
    try:
        for a in agents.values():  # the watch delivers the Service (after any reconnect backoff)
            a.wait_cached("services")
        svc = {"namespace": "shop", "workload_name": "db-svc"}
        f0 = flows(agents, WEB, svc)
        n = 6
        ping(lab3, web, cluster_ip, n)
        assert [x - y for x, y in zip(flows(agents, WEB, svc), f0)] == [n, 0]
    finally:
        subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=False)


def test_every_api_request_is_allowed_by_the_manifests_cluster_role(cluster):
    """What the agents asked the API for (the emulator logged it) is exactly what
    deploy/daemonset.yaml's ClusterRole allows, no more: least privilege holds."""
    import yaml

    from tests.conftest import REPO

    api, _ = cluster
    docs = list(yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    allowed = {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    used = api.permissions_used()
    assert used <= allowed, used - allowed
    # the cache's kinds here; the captures' access is exercised in test_captures.py
    assert {resource for _, _, resource in used} == {"pods", "namespaces", "services", "nodes"}
