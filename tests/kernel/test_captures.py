"""Captures end to end: the API emulator (with Fovea's CRDs and their validation), real
agents under simulated node names over one node lab, real packets, and the real
`kubectl` running the plugin.

    pod0  shop/web-1     app=web       node-a
    pod1  other/cli-1    app=web       node-a   (another namespace)
    pod2  shop/db-0      app=multi     node-b
    pod3  shop/api-0     app=multi     node-a
          shop/hostnet   app=hostnet   node-a   (hostNetwork)
          shop/ghost-0   app=ghost     node-c   (no agent runs there)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, RunningAgent, node_lab, require
from tests.crd_schema import api_errors, crd
from tests.k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod
from tests.object_stores import AZURITE_ACCOUNT, AZURITE_KEY, azurite_blob, moto_s3
from tests.otlp_receiver import HttpReceiver

pytestmark = pytest.mark.kernel

P, Q = 18080, 19090
BIN = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv") / "bin"


class Cluster:
    def __init__(self, lab, api, tmp: Path, traces: HttpReceiver):
        self.lab, self.api, self.tmp = lab, api, tmp
        self.traces = traces  # the agents' OTLP spans (one per capture run and node)
        self.kubeconfig = api.write_kubeconfig(tmp / "kubeconfig", namespace="shop")
        self.agents: dict[str, RunningAgent] = {}

    def base(self, node: str) -> Path:
        return self.tmp / f"captures-{node}"

    def start_agent(self, node: str) -> RunningAgent:
        cfg = self.tmp / f"fovea-{node}.yaml"
        cfg.write_text(yaml.safe_dump({
            "plugins": ["forward"],
            "pods": {"interfaces": [f"{self.lab.prefix}p*"]},
            "captures": {"baseDir": str(self.base(node)), "gracePeriod": 3.0,
                         "uploadAllowlist": ["http://127.0.0.1"]},
            "otlp": {"enabled": True, "protocol": "http/protobuf", "endpoint": self.traces.endpoint},
        }))
        agent = RunningAgent("--uplink", self.lab.uplink, "--kubeconfig", str(self.kubeconfig), "--node-name", node,
                             "--config", str(cfg))
        self.agents[node] = agent
        pod = make_pod(f"fovea-{node}", "fovea-system", node, labels={"app.kubernetes.io/name": "fovea"})
        pod["spec"]["containers"][0]["ports"] = [{"name": "metrics", "containerPort": agent.port}]
        if self.api.get("pods", pod["metadata"]["name"], "fovea-system"):
            self.api.delete("pods", pod["metadata"]["name"], "fovea-system")
        self.api.create(pod)
        return agent

    def capture(self, name: str, kind: str = "Capture", namespace: str = "shop", **spec) -> dict:
        spec.setdefault("duration", "2s")
        meta = {"name": name} if kind == "ClusterCapture" else {"name": name, "namespace": namespace}
        return self.api.create({"apiVersion": "fovea.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec})

    def status(self, name: str, kind: str = "Capture", namespace: str = "shop") -> dict:
        obj = self.api.get(kind, name, namespace if kind == "Capture" else "")
        return (obj or {}).get("status") or {}

    def wait(self, name: str, until, kind: str = "Capture", timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status(name, kind)
            if until(s):
                return s
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{a.output()[-3000:]}" for n, a in self.agents.items())
                raise AssertionError(f"capture {name}: status still {s}\n{logs}")
            time.sleep(0.1)

    def done(self, name: str, kind: str = "Capture", timeout: float = 60) -> dict:
        return self.wait(name, lambda s: s.get("phase") in ("Succeeded", "Failed", "PartiallySucceeded"), kind,
                         timeout)


@pytest.fixture(scope="module")
def cluster(root, tmp_path_factory):
    with node_lab(pods=4, ipv6=False) as lab:
        api = K8sEmulator().start()
        traces = HttpReceiver()
        try:
            for plural in ("captures", "clustercaptures"):
                api.register_crd(crd(plural), validate=api_errors)
            for ns in ("shop", "other", "fovea-system"):
                api.create(make_namespace(ns))
            for node in ("node-a", "node-b", "node-c"):
                api.create(make_node(node))
            web, cli, db, apipod = lab.pods
            api.create(make_pod("web-1", "shop", "node-a", web.ipv4, labels={"app": "web"}))
            api.create(make_pod("cli-1", "other", "node-a", cli.ipv4, labels={"app": "web"}))
            api.create(make_pod("db-0", "shop", "node-b", db.ipv4, labels={"app": "multi"}))
            api.create(make_pod("api-0", "shop", "node-a", apipod.ipv4, labels={"app": "multi"}))
            api.create(make_pod("hostnet", "shop", "node-a", "192.0.2.10", labels={"app": "hostnet"},
                                host_network=True))
            api.create(make_pod("ghost-0", "shop", "node-c", "192.0.2.11", labels={"app": "multi-ghost"}))
            c = Cluster(lab, api, tmp_path_factory.mktemp("captures"), traces)
            c.start_agent("node-a")
            c.start_agent("node-b")
            yield c
            for a in c.agents.values():
                assert a.stop() == 0, a.output()
        finally:
            traces.stop()
            api.stop()


def echo_server(lab, port: int) -> threading.Thread:
    srv = lab.socket(lab.world.netns, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lab.world.ipv4, port))
    srv.listen(4)

    def serve():
        with srv:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def converse(lab, pod, port: int, rounds: int = 10) -> int:
    """A request/response conversation on `port`; returns the TCP segments the pod sent and
    received for it (the pod's namespace has no other traffic)."""
    server = echo_server(lab, port)
    before = lab.snmp(pod.netns, "Tcp", "InSegs") + lab.snmp(pod.netns, "Tcp", "OutSegs")
    with lab.socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((lab.world.ipv4, port))
        for i in range(rounds):
            s.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += s.recv(100 - len(got))
    server.join(5)
    time.sleep(0.5)  # the last ACKs of the close
    return lab.snmp(pod.netns, "Tcp", "InSegs") + lab.snmp(pod.netns, "Tcp", "OutSegs") - before


def unpack(artifact: Path, into: Path) -> tuple[Path, list[str]]:
    from agent.cli.capture import safe_extract

    names = safe_extract(artifact, into)
    pcap = next(into.rglob("*.pcapng"))
    return pcap, names


def test_capture_of_a_pod_holds_exactly_its_filtered_packets(cluster, tmp_path):
    """filter tcp port P while pod A talks on P and on Q: the pcap holds exactly P's packets."""
    require(shutil.which("tshark") is not None, "tshark (Debian tshark) reads the capture back")
    lab = cluster.lab
    cluster.capture("web-debug", target={"podSelector": {"matchLabels": {"app": "web"}}}, filter=f"tcp port {P}",
                    duration="8s")
    s = cluster.wait("web-debug", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running")
    assert s["expectedNodes"] == ["node-a"]  # cli-1 (app=web too) is in another namespace
    segments = converse(lab, lab.pods[0], P)
    converse(lab, lab.pods[0], Q)
    assert cluster.status("web-debug")["phase"] == "Running", "the machine is too slow for this test's duration"
    s = cluster.done("web-debug")
    assert s["phase"] == "Succeeded", s
    node = s["nodes"]["node-a"]
    assert node["packets"] == segments and s["packets"] == segments and s["nodesDone"] == "1/1"
    art = node["artifact"]
    key = art["location"].removeprefix("hostpath://node-a/")
    path = cluster.base("node-a") / key
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == art["sha256"] and path.stat().st_size == art["size"]
    pcap, names = unpack(path, tmp_path)
    top = names[0].split("/")[0]
    assert f"{top}/capture.json" in names and any(n.startswith(f"{top}/pods/shop_web-1/") for n in names)
    assert not any("/node/" in n for n in names), "a namespaced Capture bundles no node-wide state"
    from scapy.all import TCP, rdpcap

    packets = rdpcap(str(pcap))
    assert len(packets) == segments
    assert all(P in (p[TCP].sport, p[TCP].dport) for p in packets)
    count = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"tcp.port == {P}"], capture_output=True, text=True)
    assert len(count.stdout.splitlines()) == segments, count.stderr
    other = subprocess.run(["tshark", "-r", str(pcap), "-Y", f"tcp.port == {Q}"], capture_output=True, text=True)
    assert other.stdout == ""

    # One span for the run on node-a, with the counts the status has.
    spans = cluster.traces.wait(lambda sp: sp.name == "capture web-debug", timeout=15)
    assert len(spans) == 1 and not spans[0].error
    assert spans[0].resource["k8s.node.name"] == "node-a" and spans[0].attributes["k8s.namespace.name"] == "shop"
    assert spans[0].attributes["fovea.capture.packets"] == segments
    assert spans[0].attributes["fovea.capture.location"] == art["location"]
    assert spans[0].attributes["fovea.capture.filter"] == f"tcp port {P}"

    # The agent serves it only with the token, and nothing else under /captures/.
    url = cluster.agents["node-a"].url + "/captures/"
    assert requests.get(url + key, params={"token": art["downloadToken"]}).content == path.read_bytes()
    assert requests.get(url + key, params={"token": "wrong"}).status_code == 404
    assert requests.get(url + key).status_code == 404
    for escape in ("../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", key.split("/")[0] + "/../../fovea.yaml"):
        assert requests.get(url + escape, params={"token": art["downloadToken"]}).status_code == 404

    # kubectl fovea capture download: through the emulator's pod proxy, sha256 verified.
    out = run_kubectl(cluster, "fovea", "capture", "download", "web-debug", "-o", str(tmp_path / "dl"))
    assert "sha256 verified" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "dl" / path.name).read_bytes() == path.read_bytes()
    assert any(r.resource == "pods" and r.subresource == "proxy" for r in cluster.api.requests)


def test_cluster_capture_of_a_node_captures_its_uplink_and_the_node_state(cluster, tmp_path):
    lab = cluster.lab
    cluster.capture("node-a-uplink", kind="ClusterCapture", target={"nodeNames": ["node-a"]},
                    filter=f"tcp port {P + 1}", duration="6s")
    cluster.wait("node-a-uplink", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running",
                 kind="ClusterCapture")
    segments = converse(lab, lab.pods[1], P + 1)  # other/cli-1: any namespace's traffic crosses the uplink
    assert cluster.status("node-a-uplink", "ClusterCapture")["phase"] == "Running", "too slow for the duration"
    s = cluster.done("node-a-uplink", kind="ClusterCapture")
    assert s["phase"] == "Succeeded" and s["expectedNodes"] == ["node-a"], s
    assert s["nodes"]["node-a"]["packets"] == segments
    path = cluster.base("node-a") / s["nodes"]["node-a"]["artifact"]["location"].removeprefix("hostpath://node-a/")
    _, names = unpack(path, tmp_path)
    assert any("/node/" in n for n in names), "a node target bundles the node's state"


def test_a_limit_ends_the_capture_early(cluster):
    lab = cluster.lab
    cluster.capture("five", target={"podNames": ["web-1"]}, filter=f"tcp port {P + 2}", maxPackets=5,
                    duration="60s", includeMetadata=False)
    cluster.wait("five", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running")
    assert converse(lab, lab.pods[0], P + 2) > 5
    s = cluster.done("five", timeout=30)  # long before the 60 s
    assert s["phase"] == "Succeeded" and s["nodes"]["node-a"]["packets"] == 5, s
    assert s["nodes"]["node-a"]["message"] == "stopped by maxPackets"


def test_cluster_capture_of_a_host_network_pod_captures_the_node_uplinks(cluster):
    lab = cluster.lab
    cluster.capture("hostnet", kind="ClusterCapture", target={
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
        "podSelector": {"matchLabels": {"app": "hostnet"}}}, filter=f"tcp port {P + 3}", duration="6s",
        includeMetadata=False)
    cluster.wait("hostnet", lambda s: (s.get("nodes") or {}).get("node-a", {}).get("phase") == "Running",
                 kind="ClusterCapture")
    segments = converse(lab, lab.pods[1], P + 3)
    assert cluster.status("hostnet", "ClusterCapture")["phase"] == "Running", "too slow for the duration"
    s = cluster.done("hostnet", kind="ClusterCapture")
    assert s["phase"] == "Succeeded" and s["nodes"]["node-a"]["packets"] == segments, s


def test_namespaced_capture_cannot_reach_another_namespace_or_a_host_network_pod(cluster):
    before = set(cluster.base("node-a").rglob("*"))
    cluster.capture("reach-other", target={"podNames": ["cli-1"]})
    cluster.capture("reach-host", target={"podSelector": {"matchLabels": {"app": "hostnet"}}})
    s = cluster.done("reach-other")
    assert s["phase"] == "Failed" and "no pod named cli-1 in namespace shop" in s["message"], s
    s = cluster.done("reach-host")
    assert s["phase"] == "Failed" and "hostNetwork" in s["message"] and "ClusterCapture" in s["message"], s
    assert not s.get("nodes")
    assert set(cluster.base("node-a").rglob("*")) == before, "nothing captured"


def test_with_the_api_servers_validation_off_the_agent_still_refuses(cluster):
    """An API server without (or with an older) schema lets anything in: the agent's own
    validation fails each capture with the reason, and nothing is captured or written."""
    before = set(cluster.base("node-a").rglob("*"))
    cluster.api.register_crd(crd("captures"))  # the same type, no validation
    try:
        bad = {
            "escape": dict(target={"podNames": ["web-1"]}, output={"hostPath": {"path": "../../../etc"}}),
            "too-long": dict(target={"podNames": ["web-1"]}, duration="2h"),
            "two-targets": dict(target={"podNames": ["web-1"], "podSelector": {}}),
            "other-namespace": dict(target={"namespaceSelector": {}}),
        }
        for name, spec in bad.items():
            cluster.capture(name, **spec)
    finally:
        cluster.api.register_crd(crd("captures"), validate=api_errors)
    said = {name: cluster.done(name)["message"] for name in bad}
    assert said == {
        "escape": "spec.output.hostPath has unknown field(s) path: it takes no fields",
        "too-long": "spec.duration 2h is out of range: it must be more than 0 and at most 1h",
        "two-targets": "spec.target must have exactly one of podSelector and podNames: pick pods by labels or by name",
        "other-namespace": "spec.target.namespaceSelector needs a ClusterCapture: a namespaced Capture reaches only "
                           "the pods of its own namespace",
    }
    assert all(cluster.status(name)["phase"] == "Failed" for name in bad)
    assert set(cluster.base("node-a").rglob("*")) == before


def test_bad_filter_and_endpoint_off_the_allowlist_fail_with_the_reason(cluster):
    cluster.capture("bad-filter", target={"podNames": ["web-1"]}, filter="tcp prot 80")
    s = cluster.done("bad-filter")
    assert s["phase"] == "Failed" and "spec.filter 'tcp prot 80' does not compile" in s["message"], s
    # A link-local metadata address: refused before anything is captured or sent.
    cluster.api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "shop"},
                        "data": {"accessKeyId": "YQ==", "secretAccessKey": "Yg=="}})
    cluster.capture("metadata-endpoint", target={"podNames": ["web-1"]}, output={"s3": {
        "endpoint": "http://169.254.169.254", "bucket": "steal", "secretRef": {"name": "s3"}}})
    s = cluster.done("metadata-endpoint")
    assert s["phase"] == "Failed" and "169.254.169.254" in s["message"], s
    assert "artifact" not in s["nodes"]["node-a"]


def test_several_nodes_report_at_once_and_a_silent_node_makes_it_partial(cluster):
    cluster.capture("multi", target={"podSelector": {"matchLabels": {"app": "multi"}}})
    s = cluster.done("multi")
    assert s["expectedNodes"] == ["node-a", "node-b"]
    assert s["phase"] == "Succeeded" and s["nodesDone"] == "2/2", s
    assert {n: r["phase"] for n, r in s["nodes"].items()} == {"node-a": "Succeeded", "node-b": "Succeeded"}

    cluster.capture("with-ghost", kind="ClusterCapture", target={
        "namespaceSelector": {}, "podSelector": {"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["multi", "multi-ghost"]}]}})
    s = cluster.done("with-ghost", kind="ClusterCapture", timeout=60)
    assert s["expectedNodes"] == ["node-a", "node-b", "node-c"]
    assert s["phase"] == "PartiallySucceeded", s
    assert s["nodes"]["node-c"]["phase"] == "Failed" and "no report" in s["nodes"]["node-c"]["message"]
    assert s["nodes"]["node-a"]["phase"] == s["nodes"]["node-b"]["phase"] == "Succeeded"


def test_many_agents_writing_one_status_concurrently(cluster):
    """Ten writers (simulated node reports) at once on one capture: every report lands and
    the aggregate is right, through 409 conflicts and retries."""
    from capture import status as st
    from capture.controller import CaptureController, Job
    from capture.spec import parse

    nodes = [f"sim-{i}" for i in range(10)]
    obj = cluster.capture("concurrent", target={"podNames": ["web-1"]}, duration="1h")
    # Expected nodes as if the pods were there; the real agents' part is not in the list.
    time.sleep(1)
    cluster.api.patch("captures", "concurrent", {"status": {"expectedNodes": nodes, "phase": "Running",
                                                            "startTime": st.now(), "nodes": None}}, "shop")
    from kubernetes import client

    seen = len(cluster.api.requests)
    spec = parse(obj)

    def report(i):
        c = CaptureController(client.ApiClient(cluster.api.client_configuration()), nodes[i], "/nonexistent",
                              "fovea-system", 3, None, None)
        job = Job(obj["metadata"]["uid"], "captures", "shop", "concurrent", spec)
        c._report(job, {"phase": "Failed" if i == 0 else "Succeeded", "packets": i, "message": f"n{i}"})

    threads = [threading.Thread(target=report, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cluster.status("concurrent")
    assert sorted(s["nodes"]) == nodes
    assert s["phase"] == "PartiallySucceeded" and s["nodesDone"] == "10/10" and s["packets"] == sum(range(10))
    assert any(r.code == 409 for r in cluster.api.requests[seen:]), "the writers did conflict"


def test_delete_stops_a_running_capture_and_removes_its_files(cluster):
    obj = cluster.capture("long", target={"podNames": ["db-0"]}, duration="60s")
    cluster.wait("long", lambda s: (s.get("nodes") or {}).get("node-b", {}).get("phase") == "Running")
    uid = obj["metadata"]["uid"]
    assert (cluster.base("node-b") / uid).is_dir()
    cluster.api.delete("captures", "long", "shop")
    deadline = time.monotonic() + 15
    while (cluster.base("node-b") / uid).exists():
        assert time.monotonic() < deadline, cluster.agents["node-b"].output()[-2000:]
        time.sleep(0.1)


def test_agent_stopping_mid_capture_reports_it_failed(cluster):
    cluster.capture("stopping", target={"podNames": ["db-0"]}, duration="60s")
    cluster.wait("stopping", lambda s: (s.get("nodes") or {}).get("node-b", {}).get("phase") == "Running")
    assert cluster.agents["node-b"].stop() == 0
    s = cluster.status("stopping")  # reported before the agent exited
    assert s["phase"] == "Failed" and "stopped during the capture" in s["message"], s
    cluster.start_agent("node-b")


def test_agent_restart_mid_capture_fails_it_never_running_forever(cluster):
    cluster.capture("restart", target={"podNames": ["db-0"]}, duration="60s")
    cluster.wait("restart", lambda s: (s.get("nodes") or {}).get("node-b", {}).get("phase") == "Running")
    cluster.agents["node-b"].stop("KILL")
    cluster.start_agent("node-b")
    s = cluster.done("restart", timeout=30)
    assert s["phase"] == "Failed" and "restarted during the capture" in s["message"], s


def run_kubectl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), PATH=f"{BIN}:{os.environ['PATH']}")
    r = subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_kubectl_runs_the_plugin(cluster):
    """The real kubectl finds kubectl-fovea on the PATH: create --wait, download, list, get, delete."""
    require(shutil.which("kubectl") is not None, "kubectl (Debian kubernetes-client)")
    require(shutil.which("tshark") is not None, "tshark (Debian tshark) reads the capture back")
    r = run_kubectl(cluster, "fovea", "capture", "create", "from-kubectl", "--pod-selector", "app=web",
                    "--duration", "2s", "--filter", "tcp port 80", "--wait")
    assert "node-a: Succeeded" in r.stdout and "from-kubectl: Succeeded" in r.stdout, r.stdout
    r = run_kubectl(cluster, "fovea", "capture", "download", "from-kubectl", "-n", "shop", "-o",
                    str(cluster.tmp / "from-kubectl"))
    pcap = next(line.split(": ", 1)[1].split(" (open it with Wireshark)")[0] for line in r.stdout.splitlines()
                if "open it with Wireshark" in line)
    read = subprocess.run(["tshark", "-r", pcap], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    r = run_kubectl(cluster, "fovea", "capture", "list")
    assert "from-kubectl" in r.stdout and "Succeeded" in r.stdout
    r = run_kubectl(cluster, "fovea", "capture", "get", "from-kubectl")
    assert "Phase:      Succeeded" in r.stdout and "node-a: Succeeded" in r.stdout
    r = run_kubectl(cluster, "fovea", "capture", "create", "from-kubectl", "--pod", "web-1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "already exists" in r.stderr, r.stderr
    r = run_kubectl(cluster, "fovea", "capture", "create", "too-long", "--pod", "web-1", "--duration", "2h",
                    check=False)
    assert r.returncode == 1 and "at most 1h" in r.stderr, r.stderr
    run_kubectl(cluster, "fovea", "capture", "delete", "from-kubectl")
    assert cluster.api.get("captures", "from-kubectl", "shop") is None
    r = run_kubectl(cluster, "fovea", "capture", "get", "from-kubectl", check=False)
    assert r.returncode == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _secret(cluster, name: str, data: dict[str, str]) -> None:
    import base64

    cluster.api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "shop"},
                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})


def _download_verified(cluster, name: str, into: Path) -> Path:
    r = run_kubectl(cluster, "fovea", "capture", "download", name, "-o", str(into))
    assert "sha256 verified" in r.stdout, r.stdout + r.stderr
    files = [p for p in into.iterdir() if p.is_file()]
    assert len(files) == 1
    art = cluster.status(name)["nodes"]["node-a"]["artifact"]
    import hashlib

    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == art["sha256"]
    return files[0]


def test_s3_output_and_download(cluster, tmp_path):
    with moto_s3() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket="caps")
        _secret(cluster, "moto-creds", {"accessKeyId": "k", "secretAccessKey": "s"})
        cluster.capture("to-s3", target={"podNames": ["web-1"]}, includeMetadata=False, output={"s3": {
            "endpoint": endpoint, "bucket": "caps", "prefix": "shop/", "secretRef": {"name": "moto-creds"}}})
        s = cluster.done("to-s3")
        assert s["phase"] == "Succeeded", s
        assert s["nodes"]["node-a"]["artifact"]["location"].startswith(f"{endpoint}/caps/shop/to-s3-node-a-")
        _download_verified(cluster, "to-s3", tmp_path)
        assert not any(cluster.base("node-a").rglob("to-s3-*")), "uploaded: nothing stays on the node"

        # A ClusterCapture reads its Secret in the agent's namespace, never in another one.
        def cluster_s3(name):
            cluster.capture(name, kind="ClusterCapture", target={"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "shop"}}, "podSelector": {
                "matchLabels": {"app": "web"}}}, includeMetadata=False, output={"s3": {
                    "endpoint": endpoint, "bucket": "caps", "secretRef": {"name": "moto-creds"}}})
            return cluster.done(name, kind="ClusterCapture")

        s = cluster_s3("cluster-s3-no-secret")
        assert s["phase"] == "Failed" and s["message"] == "Secret moto-creds not found in namespace fovea-system", s
        cluster.api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "moto-creds", "namespace": "fovea-system"}, "data": {"accessKeyId": "aw==",
                                                                         "secretAccessKey": "cw=="}})
        assert cluster_s3("cluster-s3")["phase"] == "Succeeded"
    reads = [r for r in cluster.api.requests if r.resource == "secrets" and r.name == "moto-creds"]
    assert {(r.verb, r.namespace, r.name) for r in reads} == {
        ("get", "shop", "moto-creds"), ("get", "fovea-system", "moto-creds")}


def test_azure_blob_output_and_download(cluster, tmp_path):
    from datetime import datetime, timedelta, timezone

    with azurite_blob() as url:
        from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

        BlobServiceClient.from_connection_string(
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={url};").create_container("captures")
        sas = generate_container_sas(AZURITE_ACCOUNT, "captures", account_key=AZURITE_KEY,
                                     permission=ContainerSasPermissions(read=True, create=True, write=True),
                                     expiry=datetime.now(timezone.utc) + timedelta(hours=1))
        _secret(cluster, "blob-sas", {"sasUrl": f"{url}/captures?{sas}"})
        cluster.capture("to-blob", target={"podNames": ["web-1"]}, includeMetadata=False,
                        output={"azureBlob": {"secretRef": {"name": "blob-sas"}}})
        s = cluster.done("to-blob")
        assert s["phase"] == "Succeeded", s
        assert "sig=" not in s["nodes"]["node-a"]["artifact"]["location"]
        _download_verified(cluster, "to-blob", tmp_path)


def test_the_agents_asked_only_what_their_cluster_role_allows(cluster):
    """Run last: every request the agents made in this module (the emulator logged it, by
    User-Agent) is allowed by deploy/daemonset.yaml's ClusterRole, and the captures' part
    of the role was all used (get on a capture happens on a conflict only)."""
    docs = list(yaml.safe_load_all((REPO / "deploy" / "daemonset.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    allowed = {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    used = cluster.api.permissions_used("fovea-agent/")
    assert used <= allowed, used - allowed
    unused = {a for a in allowed - used if a[1] == "fovea.dev" or a[2] == "secrets"}
    assert unused <= {("get", "fovea.dev", "clustercaptures"), ("get", "fovea.dev", "captures")}, unused
    assert ("get", "", "secrets") in used
    assert not any(r.resource == "secrets" and r.verb != "get" for r in cluster.api.requests
                   if r.user_agent.startswith("fovea-agent/"))
