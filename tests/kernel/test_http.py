"""HTTP/1.x requests between workloads against ground truth: a real server and client in lab pods.

One lab node (node-a) with the Kubernetes API emulator:

    pod0  shop/web-7d9c-abcde  Deployment web   the client (Python's http.client)
    pod1  shop/api-5f6b-qwert  Deployment api   the server (ThreadingHTTPServer, HTTP/1.1)
    world                      behind the lab uplink: an external client

The Service shop/api-svc is a ClusterIP that the host DNATs to the api pod
(nat chains of the test's own). Requests by method and status class equal what
the clients sent and got, exactly; the duration histogram counts every answered
request, and its sum lies within the clients' measured times.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections import Counter

import pytest
import yaml

from tests.conftest import LabHTTPConnection, RunningAgent, node_lab
from tests.k8s_emulator import K8sEmulator, make_namespace, make_pod, make_service
from tests.kernel.conftest import HostNat
from tests.kernel.test_flows import Server

pytestmark = pytest.mark.kernel

NODE = "node-a"
PORT = 8080  # the HTTP server
SINK = 3000  # a server that reads and never answers (an HTTP port too)
TIMEOUT = 2.0  # http.timeout
WEB = ("shop", "web")
API = ("shop", "api")
SVC = ("shop", "api-svc")
EXTERNAL = ("", "external")


@pytest.fixture(scope="module")
def lab(root):
    with node_lab(pods=2, ipv6=False) as lab:
        yield lab


def cluster_ip(lab) -> str:
    return f"10.{lab.octet}.99.20"


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers /<status>[?delay=<seconds>] with that status; reads the request's body first."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path, _, query = self.path.strip("/").partition("?")
        if query.startswith("delay="):
            time.sleep(float(query[len("delay="):]))
        status = int(path or 200)
        body = b"" if self.command == "HEAD" else b"x" * 100
        self.send_response(status)
        self.send_header("Content-Length", "0" if status in (204, 304) else str(len(body)))
        self.end_headers()
        if status not in (204, 304):
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PURGE = _answer


@pytest.fixture(scope="module")
def servers(lab):
    api = lab.pods[1]
    from agent.nsenter import in_netns

    with in_netns(api.netns):
        server = http.server.ThreadingHTTPServer((api.ipv4, PORT), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sink = Server(lab, api, SINK, reply=0)  # reads each connection to EOF, closes without a word
    yield
    server.shutdown()
    server.server_close()
    sink.close()


@pytest.fixture(scope="module")
def cluster(lab, servers, tmp_path_factory):
    web, api = lab.pods[:2]
    emulator = K8sEmulator().start()
    emulator.create(make_namespace("shop"))
    emulator.create(make_pod("web-7d9c-abcde", "shop", NODE, web.ipv4, labels={"pod-template-hash": "7d9c"},
                             owner=("ReplicaSet", "web-7d9c")))
    emulator.create(make_pod("api-5f6b-qwert", "shop", NODE, api.ipv4, labels={"pod-template-hash": "5f6b"},
                             owner=("ReplicaSet", "api-5f6b")))
    emulator.create(make_service("api-svc", "shop", cluster_ip(lab)))
    d = tmp_path_factory.mktemp("http")
    kubeconfig = emulator.write_kubeconfig(d / "kubeconfig")
    cfg = d / "fovea.yaml"
    cfg.write_text(yaml.safe_dump({
        "pods": {"interfaces": [lab.prefix + "p*"]},
        "http": {"ports": [80, PORT, SINK], "timeout": TIMEOUT},
    }))
    agent = RunningAgent("--uplink", lab.uplink, "--kubeconfig", str(kubeconfig), "--node-name", NODE,
                         "--config", str(cfg))
    dnat = HostNat(lab, "http", ("PREROUTING", "OUTPUT"), [
        ["-d", f"{cluster_ip(lab)}/32", "-p", "tcp", "--dport", "80", "-j", "DNAT",
         "--to-destination", f"{api.ipv4}:{PORT}"]])
    try:
        agent.wait_cached("services")
        with dnat:
            yield agent
    finally:
        assert agent.stop() == 0, agent.output()
        emulator.stop()


# (method, status) of each request; sent on one keep-alive connection, then once each on fresh ones.
MIX = [("GET", 200), ("GET", 200), ("POST", 201), ("PUT", 204), ("DELETE", 404), ("PATCH", 500),
       ("HEAD", 200), ("OPTIONS", 302), ("PURGE", 503), ("GET", 404), ("GET", 200)]


def run_mix(lab, ep, host: str, port: int) -> tuple[Counter, list[float]]:
    """The mix, keep-alive then fresh connections: ({(method label, status class): n}, client times)."""
    truth, times = Counter(), []

    def one(conn, method, status):
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        t0 = time.monotonic()
        conn.request(method, f"/{status}", body=body)
        response = conn.getresponse()
        times.append(time.monotonic() - t0)
        response.read()
        assert response.status == status
        label = method if method != "PURGE" else "OTHER"
        truth[(label, f"{status // 100}xx")] += 1

    conn = LabHTTPConnection(lab, ep, host, port)
    try:
        for method, status in MIX:
            one(conn, method, status)
    finally:
        conn.close()
    for method, status in MIX:
        conn = LabHTTPConnection(lab, ep, host, port)
        try:
            one(conn, method, status)
        finally:
            conn.close()
    return truth, times


def requests_of(agent, source, destination) -> Counter:
    m = agent.scrape()
    out = Counter()
    for (name, labels), v in m.samples.items():
        d = dict(labels)
        if name == "fovea_workload_http_requests_total" and (d["source_namespace"], d["source_workload"]) == source \
                and (d["destination_namespace"], d["destination_workload"]) == destination:
            out[(d["method"], d["status_class"])] += int(v)
    return out


def durations_of(agent, source, destination) -> tuple[int, float]:
    labels = dict(source_namespace=source[0], source_workload=source[1],
                  destination_namespace=destination[0], destination_workload=destination[1])
    m = agent.scrape()
    return (int(m.get("fovea_workload_http_request_duration_seconds_count", **labels)),
            m.get("fovea_workload_http_request_duration_seconds_sum", **labels))


def settled(agent, read, *args):
    """read(agent, *args) once two fresh snapshots agree."""
    last = read(agent, *args)
    for _ in range(30):
        time.sleep(0.5)
        now = read(agent, *args)
        if now == last:
            return now
        last = now
    return last


def delta(after: Counter, before: Counter) -> Counter:
    return Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


@pytest.mark.parametrize("target", ["pod", "service", "external client"])
def test_requests_by_method_and_status_class_equal_what_the_client_sent_and_got(lab, cluster, target):
    agent = cluster
    web, api = lab.pods[:2]
    client, host, port, pair = {
        "pod": (web, api.ipv4, PORT, (WEB, API)),
        "service": (web, cluster_ip(lab), 80, (WEB, SVC)),  # named by the Service, counted once
        "external client": (lab.world, api.ipv4, PORT, (EXTERNAL, API)),  # counted at the server's node
    }[target]
    others = [(WEB, API), (WEB, SVC), (EXTERNAL, API)]
    others.remove(pair)
    before = {p: settled(agent, requests_of, *p) for p in [pair, *others]}
    count0, sum0 = settled(agent, durations_of, *pair)

    truth, times = run_mix(lab, client, host, port)

    assert delta(settled(agent, requests_of, *pair), before[pair]) == truth
    for p in others:  # nothing counted twice, under another name
        assert delta(settled(agent, requests_of, *p), before[p]) == Counter()
    count1, sum1 = settled(agent, durations_of, *pair)
    assert count1 - count0 == sum(truth.values()) == len(times)
    assert 0 < sum1 - sum0 <= sum(times)  # first byte to first byte lies within each client's measured time


def raw_exchange(lab, ep, host: str, port: int, segments: list[bytes], read: bool = True) -> bytes:
    """One connection: each segment sent on its own (no coalescing), then the half-close and the reply."""
    s = lab.socket(ep.netns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.connect((host, port))
        for seg in segments:
            s.sendall(seg)
            time.sleep(0.05)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while read and (chunk := s.recv(65536)):
            got += chunk
        return got
    finally:
        s.close()


def test_a_pipelined_request_is_counted_without_a_status_class(lab, cluster):
    agent = cluster
    web, api = lab.pods[:2]
    before = settled(agent, requests_of, WEB, API)
    pipelined0 = agent.scrape().get("fovea_agent_http_pipelined_requests_total")
    # The second request leaves while the server still sleeps on the first (its own segment:
    # only a segment's first bytes are read).
    two = [b"GET /200?delay=0.3 HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /404 HTTP/1.1\r\nHost: a\r\n\r\n"]
    reply = raw_exchange(lab, web, api.ipv4, PORT, two)
    assert reply.count(b"HTTP/1.1 ") == 2
    # The first is answered; the second's response cannot be told from the first's: none.
    assert delta(settled(agent, requests_of, WEB, API), before) == Counter({("GET", "2xx"): 1, ("GET", "none"): 1})
    assert agent.scrape().get("fovea_agent_http_pipelined_requests_total") - pipelined0 == 1


def test_a_request_never_answered_is_counted_without_a_status_class(lab, cluster):
    agent = cluster
    web, api = lab.pods[:2]
    before = settled(agent, requests_of, WEB, API)
    for _ in range(3):  # the sink closes without a word: the server's FIN ends the request
        raw_exchange(lab, web, api.ipv4, SINK, [b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"])
    assert delta(settled(agent, requests_of, WEB, API), before) == Counter({("POST", "none"): 3})


def test_hostile_bytes_are_rejected_and_never_miscount_the_other_traffic(lab, cluster):
    """From the world, so that each payload crosses one pod interface (the server's)."""
    agent = cluster
    web, api, world = lab.pods[0], lab.pods[1], lab.world
    hostile = [
        [b"FOO /x HTTP/9.9\r\n\r\n"],  # an uppercase token whose line is not HTTP/1.x's: request_line
        [b"GET\t/ HTTP/1.1\r\n\r\n"],  # a tab for the space: request_line
        [b"LOREM IPSUM dolor sit amet"],  # request_line
        [b"A" * 40],  # no space within the first bytes: request_line
        [b"HTTP/1.1 999 Nope\r\n\r\n"],  # status class 9: status_line (a reject, not also unmatched)
        [b"HTTP/2 200\r\n\r\n"],  # status_line
        [b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 4],  # binary (a TLS record): not looked at
        [b"{\"GET\": \"/ HTTP/1.1\"}"],  # a body: not looked at
        [b"GE", b"T / HTTP/1.1\r\nHost: a\r\n\r\n"],  # a split request line: request_line, then method OTHER
    ]
    expected_rejects = {"request_line": 5, "status_line": 2}
    reject0 = {r: agent.scrape().get("fovea_agent_http_rejected_total", reason=r) for r in expected_rejects}
    unmatched0 = agent.scrape().get("fovea_agent_http_unmatched_responses_total")
    before = {p: settled(agent, requests_of, *p) for p in [(EXTERNAL, API), (WEB, API)]}

    stop = threading.Event()
    honest: list[Counter] = []

    def keep_talking():  # the other traffic: a keep-alive client, meanwhile
        truth = Counter()
        conn = LabHTTPConnection(lab, web, api.ipv4, PORT)
        try:
            while not stop.is_set():
                conn.request("GET", "/200")
                conn.getresponse().read()
                truth[("GET", "2xx")] += 1
        finally:
            conn.close()
            honest.append(truth)

    talker = threading.Thread(target=keep_talking)
    talker.start()
    try:
        for segments in hostile:
            raw_exchange(lab, world, api.ipv4, SINK, segments)
    finally:
        stop.set()
        talker.join()

    after = {r: agent.settled("fovea_agent_http_rejected_total", reason=r) for r in expected_rejects}
    assert {r: after[r] - reject0[r] for r in expected_rejects} == expected_rejects
    assert agent.scrape().get("fovea_agent_http_unmatched_responses_total") - unmatched0 == 0
    # The split request's second half reads as a request of another method; the sink never answers it.
    assert delta(settled(agent, requests_of, EXTERNAL, API), before[(EXTERNAL, API)]) == Counter(
        {("OTHER", "none"): 1})
    assert delta(settled(agent, requests_of, WEB, API), before[(WEB, API)]) == honest[0]
    assert agent.ready().status_code == 200, agent.ready().text
