"""Pod-level metrics and the workload traffic map against ground truth (standalone).

Pods are named by a static file (IP -> namespace/pod/workload), so this runs
without a Kubernetes API; tests/kernel/test_kubernetes.py does the same with the API emulator.
"""

from __future__ import annotations

import socket

import pytest
import yaml

from tests.conftest import TC_MODES, RunningAgent

pytestmark = pytest.mark.kernel

WEB = ("shop", "web-7d9c-abcde", "Deployment", "web")
DB = ("shop", "db-0", "StatefulSet", "db")
ECHO_V4 = 20 + 8 + 56  # ping's default payload


@pytest.fixture(scope="module", params=TC_MODES)
def pod_agent(lab, tmp_path_factory, request):
    web, db = lab.pods
    pods = [
        {"ip": ip, "namespace": WEB[0], "pod": WEB[1], "workloadKind": WEB[2], "workloadName": WEB[3], "observe": True}
        for ip in (web.ipv4, web.ipv6)
    ] + [
        {"ip": ip, "namespace": DB[0], "pod": DB[1], "workloadKind": DB[2], "workloadName": DB[3], "observe": False}
        for ip in (db.ipv4, db.ipv6)
    ]
    d = tmp_path_factory.mktemp("pods")
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    (d / "fovea.yaml").write_text(yaml.safe_dump({
        "staticPods": str(d / "pods.yaml"),
        "pods": {"interfaces": [lab.prefix + "p*"]},
        "tc": {"mode": request.param},  # tcx, then the clsact fallback: the same exact counts
    }))
    agent = RunningAgent("--uplink", lab.uplink, "--config", str(d / "fovea.yaml"))
    yield agent
    assert agent.stop() == 0, agent.output()


def pod(agent, labels, direction) -> tuple[float, float]:
    keys = dict(zip(("namespace", "pod", "workload_kind", "workload_name"), labels), direction=direction)
    return agent.settled("fovea_pod_packets_total", **keys), agent.settled("fovea_pod_bytes_total", **keys)


def flow(agent, src, dst, protocol) -> float:
    return agent.settled(
        "fovea_workload_flow_packets_total", source_namespace=src[0], source_workload=src[1],
        destination_namespace=dst[0], destination_workload=dst[1], protocol=protocol,
    )


def test_pings_between_pods_are_exact_per_pod_and_once_in_the_map(lab, pod_agent):
    web, db = lab.pods
    n = 30
    before = {d: pod(pod_agent, WEB, d) for d in ("egress", "ingress")}
    f0 = flow(pod_agent, ("shop", "web"), ("shop", "db"), "icmp"), flow(pod_agent, ("shop", "db"), ("shop", "web"), "icmp")
    out = lab.run(web.netns, "ping", "-4", "-c", str(n), "-i", "0.002", "-q", db.ipv4).stdout
    assert f"{n} received" in out
    after = {d: pod(pod_agent, WEB, d) for d in ("egress", "ingress")}
    for d in ("egress", "ingress"):  # requests out, replies in
        assert after[d][0] - before[d][0] == n
        assert after[d][1] - before[d][1] == n * ECHO_V4
    f1 = flow(pod_agent, ("shop", "web"), ("shop", "db"), "icmp"), flow(pod_agent, ("shop", "db"), ("shop", "web"), "icmp")
    assert f1[0] - f0[0] == n  # seen at both pods' interfaces, counted once
    assert f1[1] - f0[1] == n


def test_pod_without_annotation_has_no_pod_series(lab, pod_agent):
    web, db = lab.pods
    lab.run(db.netns, "ping", "-4", "-c", "3", "-i", "0.01", "-q", web.ipv4)
    m = pod_agent.scrape()
    assert not [k for k in m.samples if k[0] == "fovea_pod_packets_total" and ("pod", "db-0") in k[1]]


def test_traffic_to_and_from_outside_counts_once(lab, pod_agent):
    web, world = lab.pods[0], lab.world
    n = 12
    out0 = flow(pod_agent, ("shop", "web"), ("", "external"), "udp")
    in0 = flow(pod_agent, ("", "external"), ("shop", "web"), "udp")
    server = lab.socket(world.netns, socket.AF_INET6, socket.SOCK_DGRAM)
    server.bind((world.ipv6, 0))
    server.settimeout(5)
    client = lab.socket(web.netns, socket.AF_INET6, socket.SOCK_DGRAM)
    client.settimeout(5)
    for _ in range(n):
        client.sendto(b"q" * 10, server.getsockname()[:2])
        _, peer = server.recvfrom(100)
        server.sendto(b"a" * 20, peer)
        client.recv(100)
    server.close()
    client.close()
    assert flow(pod_agent, ("shop", "web"), ("", "external"), "udp") - out0 == n
    assert flow(pod_agent, ("", "external"), ("shop", "web"), "udp") - in0 == n


def test_pod_drops_belong_to_the_sender(lab, pod_agent):
    web, world = lab.pods[0], lab.world
    k = 8
    keys = dict(zip(("namespace", "pod", "workload_kind", "workload_name"), WEB),
                reason="NO_SOCKET", direction="egress")
    before = pod_agent.settled("fovea_pod_drop_packets_total", **keys)
    s = lab.socket(web.netns, socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(k):
        s.sendto(b"x", (world.ipv4, 47300))
    s.close()
    assert pod_agent.settled("fovea_pod_drop_packets_total", **keys) - before == k
