"""End to end: a real Prometheus scrapes real agents on a lab node with live traffic,
and every PromQL expression of every shipped dashboard panel and alert rule returns
data on it (or is listed below with the reason the lab cannot give it data).

    agent "lab-node"    the chart's capabilities only (setpriv), the chart's RBAC on the
                        API emulator, HTTPS and a token checked with TokenReview and
                        SubjectAccessReview: Prometheus scrapes it as it would in a cluster
    agent "lab-node-b"  standalone, drops only, a drop map of one key: lost events, a full map
    agent "lab-node-c"  standalone, forward and tcp, pointed at a missing BTF: a plugin down
    "lab-node-gone"     a target nobody listens on: an agent that is down

Pods: web (shop, Deployment web), db (shop, StatefulSet db) and api (shop, Deployment api).
Traffic: web sends TCP to db through 10% random loss and connects to a closed port (resets);
db asks a DNS responder in the world (NOERROR, SERVFAIL, no answer in turn), floods UDP at a
port web's iptables drops, and sends to the world through the uplink; api calls an HTTP
server on db (answers 2xx, 4xx, 5xx or none, on keep-alive and fresh connections), connects
to db's closed port (refused) and to a port whose SYNs db drops (timeout), and tallies what
it saw: the service map's queries must match it.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import math
import re
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, LabHTTPConnection, RunningAgent, free_port, node_lab, require, self_signed_cert
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
API = {"namespace": "shop", "pod": "api-5c8d-fghij", "workload_kind": "Deployment", "workload_name": "api"}
HTTP_PORT, CLOSED_PORT, SILENT_PORT = 8000, 8081, 8082  # db's HTTP server; nobody listens; db drops the SYNs
SERVER_DELAY = 0.02  # db's HTTP server waits this long before each answer
CONNECT_TIMEOUT = 2.0  # flows.connectTimeout of the agent that counts the pods


def expressions(variables: dict[str, str] = VARIABLES) -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and alert rule, template variables substituted."""
    out = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel["targets"]:
                expr = t["expr"]
                for var, value in variables.items():
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


class Answer(BaseHTTPRequestHandler):
    """db's HTTP/1.1 server: /ok 200, /missing 404, /fail 500, each after SERVER_DELAY;
    /drop closes the connection without an answer."""

    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close
    disable_nagle_algorithm = True  # the body goes out at once, not after the client's delayed ACK

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/drop":
            self.close_connection = True
            return
        time.sleep(SERVER_DELAY)
        self.send_response({"/ok": 200, "/missing": 404, "/fail": 500}[self.path])
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"fovea")

    do_GET = do_POST = do_PUT = do_DELETE = answer

    def log_message(self, *args):
        pass


# One cycle of api's calls: a keep-alive connection that ends when db drops it unanswered,
# then a fresh connection for one request. (method, path, status class api expects)
KEEP_ALIVE = [("GET", "/ok", "2xx"), ("GET", "/ok", "2xx"), ("POST", "/ok", "2xx"), ("GET", "/missing", "4xx"),
              ("DELETE", "/fail", "5xx"), ("GET", "/ok", "2xx"), ("GET", "/drop", "none")]
FRESH = [("PUT", "/ok", "2xx")]


class ServiceCalls:
    """api -> db: HTTP requests, refused and timed-out connects, each tallied as api saw it
    with the wall-clock time it was decided (for rates over Prometheus' windows)."""

    def __init__(self, lab, api, db):
        self.lab, self.api, self.db = lab, api, db
        self.events: list[tuple[float, str, tuple]] = []  # (time, "http"|"conn", key)
        self.durations: list[float] = []  # request sent -> response's status line read, as api measured it
        self.started = 0.0
        self.lock = threading.Lock()
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.error: BaseException | None = None  # what stopped the calls, if anything did

    def note(self, kind: str, key: tuple) -> None:
        with self.lock:
            self.events.append((time.time(), kind, key))

    def run(self, stop: threading.Event) -> None:
        self.started = time.time()
        try:
            while not stop.wait(0.1):
                if self.paused.is_set():
                    self.idle.set()
                    continue
                self.idle.clear()
                self.call(KEEP_ALIVE, {})
                self.call(FRESH, {"Connection": "close"})
                self.connect(CLOSED_PORT)
                self.connect(SILENT_PORT)
        except BaseException as e:
            if not stop.is_set():  # db's server stops first at teardown; before that it is a failure
                self.error = e
            self.idle.set()

    def call(self, plan, headers) -> None:
        """One connection, these requests on it in turn."""
        conn = LabHTTPConnection(self.lab, self.api, self.db.ipv4, HTTP_PORT)
        conn.connect()
        self.note("conn", ("established",))
        try:
            for method, path, expected in plan:
                body = b"order" if method in ("POST", "PUT") else None
                sent = time.monotonic()
                conn.request(method, path, body=body, headers=headers)
                try:
                    response = conn.getresponse()
                except http.client.RemoteDisconnected:
                    status = "none"
                else:
                    self.durations.append(time.monotonic() - sent)
                    response.read()
                    status = f"{response.status // 100}xx"
                assert status == expected, (method, path, status)
                self.note("http", (method, status))
        finally:
            conn.close()

    def connect(self, port: int) -> None:
        s = self.lab.socket(self.api.netns, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.2)  # well before the first SYN retransmission (1 s): one SYN per attempt
        try:
            s.connect((self.db.ipv4, port))
        except ConnectionRefusedError:
            self.note("conn", ("refused",))
        except socket.timeout:
            self.note("conn", ("timeout",))
        else:
            raise AssertionError(f"{self.db.ipv4}:{port} accepted a connection")
        finally:
            s.close()

    def tally(self, kind: str, since: float = 0.0, until: float = math.inf) -> Counter:
        with self.lock:
            return Counter(key for t, k, key in self.events if k == kind and since < t <= until)

    def pause(self) -> None:
        """Stop after the current cycle; every connection it opened is closed then."""
        self.paused.set()
        assert self.idle.wait(30), "api's calls did not stop"
        assert self.error is None, f"api's calls failed: {self.error!r}"


class Traffic:
    def __init__(self, lab):
        self.lab = lab
        self.web, self.db, self.api = lab.pods
        self.calls = ServiceCalls(lab, self.api, self.db)
        self.web_refused: list[float] = []  # when web's connects to db's closed port were refused
        self.http: socketserver.ThreadingTCPServer | None = None  # db's HTTP server
        self.serving: threading.Thread | None = None
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
        lab.run(db.netns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(SILENT_PORT), "--syn", "-j", "DROP")
        self.http = socketserver.ThreadingTCPServer((db.ipv4, HTTP_PORT), Answer, bind_and_activate=False)
        self.http.daemon_threads = True
        self.http.socket.close()
        self.http.socket = self.sock(db, socket.SOCK_STREAM)
        self.http.server_bind()
        self.http.server_activate()
        self.serving = threading.Thread(target=self.http.serve_forever, args=(0.2,), daemon=True)
        self.serving.start()
        server = self.sock(db, socket.SOCK_STREAM)
        server.bind((db.ipv4, 8080))
        server.listen(4)
        dns = self.sock(lab.world, socket.SOCK_DGRAM)
        dns.bind((lab.world.ipv4, 53))
        world = self.sock(lab.world, socket.SOCK_DGRAM)
        world.bind((lab.world.ipv4, 7))
        for target, args in ((self.sink, (server,)), (dns_responder, (dns, self.stop)), (self.drain, (world,)),
                             (self.tcp_sender, ()), (self.chatter, ()), (self.calls.run, (self.stop,))):
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
                    closed.connect((self.db.ipv4, CLOSED_PORT))
                except ConnectionRefusedError:
                    self.web_refused.append(time.time())
                except OSError:
                    pass
                closed.close()
                self.sockets.remove(closed)

    def close(self):
        self.stop.set()
        if self.serving:
            self.http.shutdown()
        if self.http:
            self.http.server_close()
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
    with node_lab(pods=3) as lab:
        web, db, api_pod = lab.pods
        api = K8sEmulator().start()
        api.create(make_namespace("shop", annotations={"fovea.dev/observe": "true"}))
        api.create(make_node("lab-node", "192.0.2.10"))
        api.create(make_pod(WEB["pod"], "shop", "lab-node", (web.ipv4, web.ipv6), labels={"pod-template-hash": "7d9c"},
                            owner=("ReplicaSet", "web-7d9c")))
        api.create(make_pod(DB["pod"], "shop", "lab-node", (db.ipv4, db.ipv6), owner=("StatefulSet", "db")))
        api.create(make_pod(API["pod"], "shop", "lab-node", (api_pod.ipv4, api_pod.ipv6),
                            labels={"pod-template-hash": "5c8d"}, owner=("ReplicaSet", "api-5c8d")))
        role = next(d for d in manifests.render({"metrics": {"auth": {"enabled": True}}})
                    if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "fovea")
        api.set_rbac(role["rules"])  # the agent gets exactly what the chart grants it
        api.add_user(PROM_TOKEN, PROM_USER, ("system:serviceaccounts",))
        api.allow_url(PROM_USER, "get", "/metrics")
        config = tmp / "fovea.yaml"
        config.write_text(yaml.safe_dump({
            "pods": {"interfaces": [f"{lab.prefix}p*"]}, "flows": {"connectTimeout": CONNECT_TIMEOUT},
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
            yield prom, agents, api, traffic
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
    prom, agents, _, _ = scraped
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


# --- the service map, against what api did -----------------------------------------------

SERVICE_MAP = json.loads((REPO / "dashboards" / "fovea-service-map.json").read_text())
SERVICE_MAP_ALERTS = {r["alert"] for g in yaml.safe_load((REPO / "deploy" / "alerts" / "fovea-rules.yaml").read_text())[
    "groups"] if g["name"] == "fovea-service-map" for r in g["rules"]}
API_DB = {"source_namespace": "shop", "source_workload": "api", "destination_namespace": "shop",
          "destination_workload": "db"}
WEB_DB = {**API_DB, "source_workload": "web"}
API_DB_SELECTOR = ", ".join(f'{k}="{v}"' for k, v in API_DB.items())
WINDOW = 30  # seconds: the dashboard's $__rate_interval here; a longer window than Grafana's keeps rates steady


def node_graph(panel: dict, results: dict[str, list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    """The edges and nodes frames Grafana's Node Graph makes of a panel's query results: each
    query a table frame (a row per series: its labels and `Value #<refId>`), the panel's
    transformations applied (joinByField outer-joins the queries its filter names), then a
    frame with a `source` field holds edges and any other frame nodes."""
    frames = {ref: [dict(r["metric"], **{f"Value #{ref}": float(r["value"][1])}) for r in rows]
              for ref, rows in results.items()}
    for t in panel.get("transformations", []):
        if t["id"] == "joinByField":
            refs, key, joined = t["filter"]["options"].split("|"), t["options"]["byField"], {}
            assert t["filter"]["id"] == "byRefId" and t["options"]["mode"] == "outer", t
            for ref in refs:
                for row in frames.pop(ref):
                    joined.setdefault(row[key], {}).update(row)
            frames["|".join(refs)] = list(joined.values())
        elif t["id"] == "organize":
            rename, exclude = t["options"]["renameByName"], t["options"]["excludeByName"]
            frames = {ref: [{rename.get(k, k): v for k, v in row.items() if not exclude.get(k)} for row in rows]
                      for ref, rows in frames.items()}
        else:
            raise AssertionError(f"no model of Grafana's {t['id']} transformation here")
    edges = [rows for rows in frames.values() if any("source" in row for row in rows)]
    return edges, [rows for rows in frames.values() if rows not in edges]


def differences(got: dict, want: dict) -> str:
    """Only the keys where two tallies differ, as `key: got against want`."""
    return ", ".join(f"{k}: {got.get(k, 0.0)} against {want.get(k, 0.0)}"
                     for k in sorted(got.keys() | want.keys(), key=str) if got.get(k, 0.0) != want.get(k, 0.0))


def test_service_map_matches_the_calls(scraped):
    """Every query of the service map dashboard and of its alerts, on the calls api made to db:
    rates within 15% of api's own tally over the same window (the window's ends move by a
    snapshot and a scrape, 1 s each, out of 30 s), ratios within 0.03, p95 within the buckets
    that hold every duration api measured; then, calls paused, the counters exactly."""
    prom, _, _, traffic = scraped
    calls = traffic.calls
    time.sleep(max(0.0, calls.started + WINDOW + 15 - time.time()))  # a whole window of calls, and the alerts' too
    assert calls.error is None, f"api's calls failed: {calls.error!r}"
    variables = {**VARIABLES, "$__rate_interval": f"{WINDOW}s"}
    wanted = {w: e for w, e in expressions(variables) if w.startswith(SERVICE_MAP["title"] + ":")
              or w in SERVICE_MAP_ALERTS}
    now = time.time()
    results = {w: prom.query(e) for w, e in wanted.items()}
    checked = set()

    def tally(kind: str, seconds: float, lag: float = 1.0) -> Counter:
        """api's outcomes of the `seconds` before a sample could hold them (a snapshot and a scrape late)."""
        return calls.tally(kind, now - seconds - lag, now - lag)

    def value(where: str, **labels) -> float:
        checked.add(where)
        found = [float(r["value"][1]) for r in results[where] if labels.items() <= r["metric"].items()]
        assert len(found) == 1, (where, labels, results[where])
        return found[0]

    def near(got: float, want: float, what: str) -> None:
        assert want > 0 and abs(got - want) <= 0.15 * want, f"{what}: {got} against api's {want}"

    http = tally("http", WINDOW)
    requests_per_s = sum(http.values()) / WINDOW
    classes = Counter()
    for (_, status), n in http.items():
        classes[status] += n
    error_ratio = (classes["5xx"] + classes["none"]) / sum(classes.values())
    conns = tally("conn", WINDOW)
    timeouts = tally("conn", WINDOW, lag=1.0 + CONNECT_TIMEOUT)[("timeout",)]  # decided connectTimeout later
    web_refused = sum(1 for t in traffic.web_refused if now - WINDOW - 1 < t <= now - 1)
    buckets = sorted({float(r["metric"]["le"]) for r in prom.query(
        f"fovea_workload_http_request_duration_seconds_bucket{{{API_DB_SELECTOR}}}")})
    assert buckets, "no fovea_workload_http_request_duration_seconds_bucket series for api -> db"

    def bounds() -> tuple[float, float]:
        """The buckets between which every duration lies: none came faster than the server's
        wait, none slower than api measured it (request sent to status line read)."""
        return (max([le for le in buckets if le < SERVER_DELAY], default=0.0),
                min(le for le in buckets if le >= max(calls.durations)))

    lowest, highest = bounds()

    # The Node Graph: one edges frame whose ends are all nodes, the api -> db edge's numbers.
    graph = next(p for p in SERVICE_MAP["panels"] if p["type"] == "nodeGraph")
    where = {t["refId"]: f"{SERVICE_MAP['title']}: {graph['title']} [{t['refId']}]" for t in graph["targets"]}
    checked |= set(where.values())
    (edges,), (nodes,) = node_graph(graph, {ref: results[w] for ref, w in where.items()})
    ids = {n["id"] for n in nodes}
    assert {"shop/api", "shop/db", "shop/web"} <= ids, nodes
    assert all(e["source"] in ids and e["target"] in ids and e["id"] == f"{e['source']} -> {e['target']}"
               for e in edges), (edges, nodes)
    (edge,) = [e for e in edges if e["id"] == "shop/api -> shop/db"]
    near(edge["mainstat"], requests_per_s, "edge requests/s")
    assert abs(edge["secondarystat"] - error_ratio) <= 0.03, (edge, error_ratio)
    assert lowest <= edge["detail__p95 latency"] <= highest, (edge, lowest, highest)
    near(edge["detail__connection failures/s"], (conns[("refused",)] + timeouts) / WINDOW, "edge failures/s")
    (web_edge,) = [e for e in edges if e["id"] == "shop/web -> shop/db"]  # connections only, no HTTP
    near(web_edge["detail__connection failures/s"], web_refused / WINDOW, "web -> db failures/s")
    (db_node,) = [n for n in nodes if n["id"] == "shop/db"]
    (api_node,) = [n for n in nodes if n["id"] == "shop/api"]
    near(db_node["mainstat"], requests_per_s, "requests/s db receives")
    assert api_node["mainstat"] == 0, api_node

    title = SERVICE_MAP["title"]
    assert abs(value(f"{title}: HTTP error ratio by pair (5xx and no response) [A]", **API_DB) - error_ratio) <= 0.03
    assert lowest <= value(f"{title}: HTTP p95 latency by pair [A]", **API_DB) <= highest
    for status, n in classes.items():
        near(value(f"{title}: HTTP requests/s by pair and status class [A]", **API_DB, status_class=status),
             n / WINDOW, f"{status} requests/s")
    assert {r["metric"]["status_class"] for r in results[f"{title}: HTTP requests/s by pair and status class [A]"]
            if API_DB.items() <= r["metric"].items()} == set(classes)
    failures = f"{title}: Connection failures/s by pair (refused, timeout) [A]"
    near(value(failures, **API_DB, result="refused"), conns[("refused",)] / WINDOW, "refused/s")
    near(value(failures, **API_DB, result="timeout"), timeouts / WINDOW, "timeouts/s")
    near(value(failures, **WEB_DB, result="refused"), web_refused / WINDOW, "web's refused/s")
    attempts = f"{title}: TCP connection attempts/s by pair and result [A]"
    near(value(attempts, **API_DB, result="established"), conns[("established",)] / WINDOW, "established/s")
    near(value(attempts, **API_DB, result="refused"), conns[("refused",)] / WINDOW, "refused/s")
    near(value(attempts, **API_DB, result="timeout"), timeouts / WINDOW, "timeouts/s")

    # The alerts look at 5 minutes: everything since the calls began, if they began since.
    span = 300
    http_5m = Counter()
    for (_, status), n in tally("http", span).items():
        http_5m[status] += n
    assert abs(value("FoveaServiceHTTPErrorRatio", **API_DB)
               - (http_5m["5xx"] + http_5m["none"]) / sum(http_5m.values())) <= 0.03
    near(value("FoveaServiceConnectionsRefused", **API_DB), tally("conn", span)[("refused",)] / span, "refused/s, 5m")
    near(value("FoveaServiceConnectionsRefused", **WEB_DB),
         sum(1 for t in traffic.web_refused if now - span - 1 < t <= now - 1) / span, "web's refused/s, 5m")
    near(value("FoveaServiceConnectTimeouts", **API_DB),
         tally("conn", span, lag=1.0 + CONNECT_TIMEOUT)[("timeout",)] / span, "timeouts/s, 5m")
    assert checked == set(wanted), f"not checked against the calls: {set(wanted) - checked}"

    # Calls paused, every counter of the pair equals api's tally exactly.
    calls.pause()
    try:
        http_total = {(m, st): float(n) for (m, st), n in calls.tally("http").items()}
        conn_total = {r: float(n) for (r,), n in calls.tally("conn").items()}
        answered = float(sum(n for (_, st), n in http_total.items() if st != "none"))
        lowest, highest = bounds()
        deadline = time.monotonic() + CONNECT_TIMEOUT + 30
        while True:
            got_http = {(r["metric"]["method"], r["metric"]["status_class"]): float(r["value"][1]) for r in prom.query(
                f"sum by (method, status_class) (fovea_workload_http_requests_total{{{API_DB_SELECTOR}}})")}
            got_conn = {r["metric"]["result"]: float(r["value"][1]) for r in prom.query(
                f"sum by (result) (fovea_workload_connections_total{{{API_DB_SELECTOR}}})")}
            got_buckets = {float(r["metric"]["le"]): float(r["value"][1]) for r in prom.query(
                f"sum by (le) (fovea_workload_http_request_duration_seconds_bucket{{{API_DB_SELECTOR}}})")}
            if (got_http, got_conn) == (http_total, conn_total) and got_buckets.get(math.inf) == answered:
                break
            assert time.monotonic() < deadline, "Fovea against api: " + differences(
                {**got_http, **got_conn, "answered": got_buckets.get(math.inf)},
                {**http_total, **conn_total, "answered": answered})
            time.sleep(1)
        assert got_buckets.get(lowest, 0.0) == 0 and got_buckets[highest] == answered, (got_buckets, lowest, highest)
    finally:
        calls.paused.clear()


def test_dashboard_variables_list_the_lab(scraped):
    """The node, namespace and workload_name pickers offer the lab's values. (`cluster` comes
    from external labels, which a single Prometheus does not show; the dashboards then use All.)"""
    prom, _, _, _ = scraped
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
    prom, _, _, _ = scraped
    series = prom.query('sum by (node, namespace, pod, workload_name) (fovea_pod_packets_total{direction="egress"})')
    labels = {(s["metric"]["node"], s["metric"]["namespace"], s["metric"]["pod"]) for s in series}
    assert ("lab-node", "shop", WEB["pod"]) in labels and ("lab-node", "shop", DB["pod"]) in labels
    assert not prom.query('fovea_pod_packets_total{exported_namespace!=""}')  # honor_labels kept them
    (gone,) = prom.query('up{node="lab-node-gone"} == 0')
    assert [s["metric"]["node"] for s in prom.query("up == 1")].count("lab-node") == 1  # HTTPS + token scrape works


def test_rules_load_and_evaluate_without_errors(scraped):
    prom, _, _, _ = scraped
    groups = requests.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(
        (REPO / "deploy" / "alerts" / "fovea-rules.yaml").read_text())["groups"])
    assert all(r["health"] in ("ok", "unknown") for r in rules), [r for r in rules if r["health"] == "err"]


def test_agent_api_requests_are_all_granted_by_the_chart(scraped):
    _, _, api, _ = scraped
    denied = [r for r in api.requests if r.code == 403]
    assert not denied, denied
    used = api.permissions_used()
    assert ("create", "authentication.k8s.io", "tokenreviews") in used
    assert ("create", "authorization.k8s.io", "subjectaccessreviews") in used
