"""End to end: a real Prometheus scrapes real agents on a lab node with live traffic,
and every PromQL expression of every shipped dashboard panel and alert rule returns
data on it (or is listed below with the reason the lab cannot give it data).

    agent "lab-node"    the chart's capabilities only (setpriv), the chart's RBAC on the
                        API emulator, HTTPS and a token checked with TokenReview and
                        SubjectAccessReview: Prometheus scrapes it as it would in a cluster
    agent "lab-node-b"  standalone, drops only, a drop map of one key: lost events, a full map
    agent "lab-node-c"  standalone, forward and tcp, pointed at a missing BTF: a plugin down
    "lab-node-gone"     a target nobody listens on: an agent that is down

Pods: web (shop, Deployment web) and db (shop, StatefulSet db). Traffic: web sends TCP to
db through 10% random loss and connects to a closed port (resets); db asks a DNS
responder in the world (NOERROR, SERVFAIL, no answer in turn), floods UDP at a port
web's iptables drops, and sends to the world through the uplink.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, RunningAgent, free_port, node_lab, require, self_signed_cert
from tests.k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod

pytestmark = pytest.mark.kernel

_spec = importlib.util.spec_from_file_location("manifests", REPO / "scripts" / "manifests.py")
manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(manifests)

# Metric families the contract (DESIGN) names whose plugins this agent does not have yet:
# an expression using one that no agent exports is expected to be empty. Once a family is
# exported, its expressions must return data like every other one; once its plugin is in the
# agent, its line goes (so that a plugin failing to start cannot hide behind it).
PENDING_FAMILIES: dict[str, str] = {}  # none at the moment: every family of the contract is exported
# Expressions that need a condition this lab cannot make (none at the moment).
CANNOT: dict[str, str] = {}
VARIABLES = {"$cluster": ".*", "$node": ".*", "$namespace": ".*", "$workload_name": ".*", "$__rate_interval": "10s"}
PROM_TOKEN, PROM_USER = "prometheus-token", "system:serviceaccount:monitoring:prometheus"
WEB = {"namespace": "shop", "pod": "web-7d9c-abcde", "workload_kind": "Deployment", "workload_name": "web"}
DB = {"namespace": "shop", "pod": "db-0", "workload_kind": "StatefulSet", "workload_name": "db"}


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and alert rule, template variables substituted."""
    out = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel["targets"]:
                expr = t["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                out.append((f"{dash['title']}: {panel['title']} [{t['refId']}]", expr))
    for group in yaml.safe_load((REPO / "deploy" / "alerts" / "fovea-rules.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("alert") or rule["record"], rule["expr"]))
    return out


# --- traffic ---------------------------------------------------------------------------

def dns_query(qid: int) -> bytes:
    # header: id, RD, 1 question; question: fovea.test. A IN
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x05fovea\x04test\x00" + struct.pack("!HH", 1, 1)


def dns_responder(sock: socket.socket, stop: threading.Event) -> None:
    """Answers NOERROR, SERVFAIL, then nothing, in turn by query id."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            query, peer = sock.recvfrom(512)
        except OSError:
            continue
        qid = struct.unpack("!H", query[:2])[0]
        if qid % 3 == 2:
            continue
        rcode = 2 if qid % 3 == 1 else 0
        sock.sendto(query[:2] + struct.pack("!H", 0x8180 | rcode) + query[4:], peer)


class Traffic:
    def __init__(self, lab):
        self.lab = lab
        self.web, self.db = lab.pods
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def sock(self, endpoint, kind) -> socket.socket:
        s = self.lab.socket(endpoint.netns, socket.AF_INET, kind)
        self.sockets.append(s)
        return s

    def start(self) -> "Traffic":
        lab, web, db = self.lab, self.web, self.db
        lab.run(web.netns, "iptables", "-A", "INPUT", "-p", "udp", "--dport", "9999", "-j", "DROP")
        lab.run(db.netns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8080", "-m", "statistic",
                "--mode", "random", "--probability", "0.1", "-j", "DROP")
        # one segment per skb: a retransmit event is one segment, as packets are counted
        lab.run(web.netns, "ip", "link", "set", "dev", "eth0", "gso_max_segs", "1")
        server = self.sock(db, socket.SOCK_STREAM)
        server.bind((db.ipv4, 8080))
        server.listen(4)
        dns = self.sock(lab.world, socket.SOCK_DGRAM)
        dns.bind((lab.world.ipv4, 53))
        world = self.sock(lab.world, socket.SOCK_DGRAM)
        world.bind((lab.world.ipv4, 7))
        for target, args in ((self.sink, (server,)), (dns_responder, (dns, self.stop)), (self.drain, (world,)),
                             (self.tcp_sender, ()), (self.chatter, ())):
            t = threading.Thread(target=target, args=args, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def sink(self, server):
        server.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    if not conn.recv(1 << 16):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
            conn.close()

    def drain(self, sock):
        sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                sock.recv(2048)
            except OSError:
                pass

    def tcp_sender(self):
        """web -> db through 10% loss: about 1 MB/s, retransmits."""
        client = self.sock(self.web, socket.SOCK_STREAM)
        client.connect((self.db.ipv4, 8080))
        chunk = b"x" * 65536
        try:
            while not self.stop.wait(0.02):
                client.sendall(chunk)
        except OSError:
            if not self.stop.is_set():  # the sink closes first at teardown; before that it is a failure
                raise
        client.close()

    def chatter(self):
        """A burst of 5000 drops (drop-rate alert), then DNS, resets, drops and uplink traffic at a steady pace."""
        flood = self.sock(self.db, socket.SOCK_DGRAM)
        for _ in range(5000):
            flood.sendto(b"d" * 32, (self.web.ipv4, 9999))
        resolver = self.sock(self.db, socket.SOCK_DGRAM)
        uplink = self.sock(self.db, socket.SOCK_DGRAM)
        qid = 0
        while not self.stop.wait(0.02):
            for _ in range(2):
                resolver.sendto(dns_query(qid), (self.lab.world.ipv4, 53))
                qid = (qid + 1) & 0xFFFF
            flood.sendto(b"d" * 32, (self.web.ipv4, 9999))
            uplink.sendto(b"u" * 64, (self.lab.world.ipv4, 7))
            if qid % 10 == 0:
                closed = self.sock(self.web, socket.SOCK_STREAM)
                closed.settimeout(1)
                try:
                    closed.connect((self.db.ipv4, 8081))
                except OSError:
                    pass
                closed.close()
                self.sockets.remove(closed)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        for s in self.sockets:
            s.close()


# --- Prometheus ------------------------------------------------------------------------

class Prometheus:
    def __init__(self, tmp: Path, scrape: list[dict]):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
                  "rule_files": [str(REPO / "deploy" / "alerts" / "fovea-rules.yaml")], "scrape_configs": scrape}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, expr: str) -> list[dict]:
        r = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, f"{expr}: {r.text}"
        return r.json()["data"]["result"]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def chart_capabilities() -> list[str]:
    ds = next(d for d in manifests.render() if d["kind"] == "DaemonSet")
    return ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


@pytest.fixture(scope="module")
def scraped(root, tmp_path_factory):
    require(subprocess.run(["which", "prometheus"], capture_output=True).returncode == 0,
            "prometheus (Debian package prometheus) is not installed")
    tmp = tmp_path_factory.mktemp("e2e")
    cert, key = self_signed_cert(tmp)
    with node_lab(pods=2) as lab:
        web, db = lab.pods
        api = K8sEmulator().start()
        api.create(make_namespace("shop", annotations={"fovea.dev/observe": "true"}))
        api.create(make_node("lab-node", "192.0.2.10"))
        api.create(make_pod(WEB["pod"], "shop", "lab-node", (web.ipv4, web.ipv6), labels={"pod-template-hash": "7d9c"},
                            owner=("ReplicaSet", "web-7d9c")))
        api.create(make_pod(DB["pod"], "shop", "lab-node", (db.ipv4, db.ipv6), owner=("StatefulSet", "db")))
        role = next(d for d in manifests.render({"metrics": {"auth": {"enabled": True}}})
                    if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "fovea")
        api.set_rbac(role["rules"])  # the agent gets exactly what the chart grants it
        api.add_user(PROM_TOKEN, PROM_USER, ("system:serviceaccounts",))
        api.allow_url(PROM_USER, "get", "/metrics")
        config = tmp / "fovea.yaml"
        config.write_text(yaml.safe_dump({
            "pods": {"interfaces": [f"{lab.prefix}p*"]},
            "tls": {"certFile": str(cert), "keyFile": str(key)}, "metricsAuth": {"enabled": True}}))
        standalone = tmp / "fovea-b.yaml"
        standalone.write_text(yaml.safe_dump({"plugins": ["drops"], "drops": {"mapSize": 1}}))
        no_btf = tmp / "fovea-c.yaml"
        no_btf.write_text(yaml.safe_dump({"plugins": ["forward", "tcp"], "kernel": {"btf": str(tmp / "no-btf")}}))
        caps = ",".join(["-all"] + ["+" + c.lower() for c in chart_capabilities()])
        agents, traffic, prom = [], None, None
        gone = socket.socket()  # bound, never listening: a port that refuses scrapes and that nobody else takes
        gone.bind(("127.0.0.1", 0))
        try:
            agents.append(RunningAgent("--uplink", lab.uplink, "--kubeconfig",
                                       str(api.write_kubeconfig(tmp / "kubeconfig")), "--node-name", "lab-node",
                                       "--config", str(config), wrapper=("setpriv", "--inh-caps=-all",
                                                                         f"--bounding-set={caps}"),
                                       ca=str(cert), token=PROM_TOKEN))
            agents.append(RunningAgent("--uplink", lab.uplink, "--config", str(standalone),
                                       "--node-name", "lab-node-b"))
            agents.append(RunningAgent("--uplink", lab.uplink, "--config", str(no_btf), "--node-name", "lab-node-c"))
            a, b, c = agents
            prom = Prometheus(tmp, [
                {"job_name": "fovea", "honor_labels": True, "scheme": "https",
                 "tls_config": {"ca_file": str(cert)}, "authorization": {"credentials": PROM_TOKEN},
                 "static_configs": [{"targets": [f"127.0.0.1:{a.port}"], "labels": {"node": "lab-node"}}]},
                {"job_name": "fovea-standalone", "honor_labels": True, "static_configs": [
                    {"targets": [f"127.0.0.1:{b.port}"], "labels": {"node": "lab-node-b"}},
                    {"targets": [f"127.0.0.1:{c.port}"], "labels": {"node": "lab-node-c"}},
                    {"targets": [f"127.0.0.1:{gone.getsockname()[1]}"], "labels": {"node": "lab-node-gone"}}]},
            ])
            traffic = Traffic(lab).start()
            yield prom, agents, api
        finally:
            if traffic:
                traffic.close()
            if prom:
                prom.stop()
            for agent in agents:
                assert agent.stop() == 0, agent.output()
            api.stop()
            gone.close()


def test_every_dashboard_and_alert_expression_has_data(scraped):
    prom, agents, api = scraped
    exported = set()

    def pending_reason(where: str, expr: str) -> str:
        missing = {m for m in re.findall(r"\b(fovea_[a-z_]+)\b", expr) if m not in exported}
        reasons = {why for m in missing for prefix, why in PENDING_FAMILIES.items() if m.startswith(prefix)}
        return CANNOT.get(where) or "; ".join(sorted(reasons))

    # Alerts have thresholds over 5-minute windows (3000 drops, 3000 packets sent...):
    # wait until each one the lab can make fires, then look at everything.
    deadline = time.monotonic() + 90
    while True:
        for agent in agents:
            exported |= {m.group(1) for m in re.finditer(r"^([a-z_]+)(?:\{| )", agent.scrape().text, re.M)}
        waiting = [w for w, e in expressions() if w.startswith("Fovea") and ":" not in w
                   and not pending_reason(w, e) and not prom.query(e)]
        if not waiting:
            break
        assert time.monotonic() < deadline, f"alerts without data after 90 s: {waiting}\n" + prom.output()
        time.sleep(1)
    time.sleep(2)  # a few more scrapes: rates over the last 10 s of every family
    empty, pending = [], []
    for where, expr in expressions():
        why = pending_reason(where, expr)
        if why:
            pending.append(f"{where}: {why}")
            continue
        if not prom.query(expr):
            empty.append(f"{where}: {expr}")
    print("\nexpected empty here:\n  " + "\n  ".join(pending))
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_dashboard_variables_list_the_lab(scraped):
    """The node, namespace and workload_name pickers offer the lab's values. (`cluster` comes
    from external labels, which a single Prometheus does not show; the dashboards then use All.)"""
    prom, _, _ = scraped
    want = {"node": {"lab-node", "lab-node-b", "lab-node-c"}, "namespace": {"shop"}, "workload_name": {"web", "db"}}
    for path in sorted((REPO / "dashboards").glob("*.json")):
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["name"] not in want:
                continue
            selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"]).groups()
            for name, value in VARIABLES.items():
                selector = selector.replace(name, value)
            r = requests.get(f"{prom.url}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10)
            assert want[var["name"]] <= set(r.json()["data"]), (path.name, var["name"], r.json())


def test_scraped_series_keep_pod_labels_and_the_node(scraped):
    prom, _, _ = scraped
    series = prom.query('sum by (node, namespace, pod, workload_name) (fovea_pod_packets_total{direction="egress"})')
    labels = {(s["metric"]["node"], s["metric"]["namespace"], s["metric"]["pod"]) for s in series}
    assert ("lab-node", "shop", WEB["pod"]) in labels and ("lab-node", "shop", DB["pod"]) in labels
    assert not prom.query('fovea_pod_packets_total{exported_namespace!=""}')  # honor_labels kept them
    (gone,) = prom.query('up{node="lab-node-gone"} == 0')
    assert [s["metric"]["node"] for s in prom.query("up == 1")].count("lab-node") == 1  # HTTPS + token scrape works


def test_rules_load_and_evaluate_without_errors(scraped):
    prom, _, _ = scraped
    groups = requests.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(
        (REPO / "deploy" / "alerts" / "fovea-rules.yaml").read_text())["groups"])
    assert all(r["health"] in ("ok", "unknown") for r in rules), [r for r in rules if r["health"] == "err"]


def test_agent_api_requests_are_all_granted_by_the_chart(scraped):
    _, _, api = scraped
    denied = [r for r in api.requests if r.code == 403]
    assert not denied, denied
    used = api.permissions_used()
    assert ("create", "authentication.k8s.io", "tokenreviews") in used
    assert ("create", "authorization.k8s.io", "subjectaccessreviews") in used
