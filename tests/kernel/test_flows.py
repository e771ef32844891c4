"""Flows from the kernel flow table as spans at a real OTLP receiver, and in `fovea observe`.

Two lab pods named by a static file; TCP connections of known sizes between
them; spans decoded by a gRPC TraceService in the test (tests/otlp_receiver.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FOVEA, RunningAgent, free_port
from tests.otlp_receiver import GrpcReceiver

pytestmark = pytest.mark.kernel

WEB = ("shop", "web-7d9c-abcde", "Deployment", "web")
DB = ("shop", "db-0", "StatefulSet", "db")
IDLE = 2.0  # flows.idleTimeout in these tests
# IP + TCP header bytes: 20 + 40 on a SYN / SYN-ACK (MSS, SACK-permitted, timestamps,
# window scale), 20 + 32 on every later packet (timestamps). Without loss on the lab's
# veths no packet carries SACK blocks, so each direction is exact:
# payload + 60 + 52 * (packets - 1).
SYN_HEADERS, HEADERS = 60, 52


def pods_file(lab, d: Path) -> Path:
    web, db = lab.pods
    pods = [{"ip": ip, "namespace": p[0], "pod": p[1], "workloadKind": p[2], "workloadName": p[3]}
            for ep, p in ((web, WEB), (db, DB)) for ip in (ep.ipv4, ep.ipv6)]
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    return d / "pods.yaml"


def agent_config(lab, d: Path, name: str, **sections) -> str:
    cfg = {"staticPods": str(pods_file(lab, d)), "pods": {"interfaces": [lab.prefix + "p*"]},
           "flows": {"idleTimeout": IDLE, "reportInterval": 60.0}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    (d / name).write_text(yaml.safe_dump(cfg))
    return str(d / name)


class UdpSink:
    """A UDP socket in a lab namespace that reads and discards (no NO_SOCKET drops
    host-wide, which other tests on the host count)."""

    def __init__(self, lab, ep, port: int):
        self.sock = lab.socket(ep.netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ep.ipv4, port))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        while True:
            try:
                self.sock.recv(65536)
            except OSError:
                return

    def close(self):
        self.sock.close()


def udp_flows(lab, ep, dst: str, dport: int, sports) -> None:
    """One datagram per source port: a UDP flow each."""
    for sport in sports:
        s = lab.socket(ep.netns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((ep.ipv4, sport))
            s.sendto(b"z" * 10, (dst, dport))
        finally:
            s.close()


class Server:
    """A TCP server in a lab namespace: reads to EOF, answers `reply` bytes, closes."""

    def __init__(self, lab, ep, port: int, reply: int):
        self.sock = lab.socket(ep.netns, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ep.ipv4, port))
        self.sock.listen(64)
        self.reply = reply
        self.received: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                n = 0
                while chunk := conn.recv(65536):
                    n += len(chunk)
                self.received.append(n)
                conn.sendall(b"y" * self.reply)

    def close(self):
        self.sock.close()


def exchange(lab, ep, dst: str, port: int, payload: int, timeout: float = 5.0) -> tuple[int, float, int]:
    """One connection: send `payload` bytes, read the reply to EOF. (source port, seconds, reply bytes)."""
    s = lab.socket(ep.netns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        t0 = time.monotonic()
        s.connect((dst, port))
        sport = s.getsockname()[1]
        s.sendall(b"x" * payload)
        s.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
        return sport, time.monotonic() - t0, got
    finally:
        s.close()


@pytest.fixture(scope="module")
def flow_agent(lab, receiver, tmp_path_factory):
    d = tmp_path_factory.mktemp("flows")
    cfg = agent_config(lab, d, "fovea.yaml", otlp={"enabled": True, "protocol": "grpc",
                                                   "endpoint": receiver.endpoint})
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg)
    yield agent
    assert agent.stop() == 0, agent.output()


def spans_to(receiver, dst: str, port: int, expect: int):
    return receiver.wait(lambda s: s.attributes.get("destination.address") == dst
                         and s.attributes.get("destination.port") == port, timeout=IDLE * 5 + 20)


def test_tcp_connections_are_one_span_each_with_exact_bytes_and_pods(lab, flow_agent, receiver):
    web, db = lab.pods
    port = 7100
    sizes = [1000, 5000, 20000, 100, 64000]
    reply = 3000
    server = Server(lab, db, port, reply)
    try:
        made = [exchange(lab, web, db.ipv4, port, n) for n in sizes]
    finally:
        server.close()
    assert server.received == sizes and all(r == reply for _, _, r in made)
    spans = spans_to(receiver, db.ipv4, port, len(sizes))
    assert len(spans) == len(sizes)
    by_port = {s.attributes["source.port"]: s for s in spans}
    assert sorted(by_port) == sorted(sport for sport, _, _ in made)
    for (sport, seconds, _), size in zip(made, sizes):
        s = by_port[sport]
        a = s.attributes
        assert s.name == "tcp connection" and not s.error
        assert (a["source.address"], a["destination.address"]) == (web.ipv4, db.ipv4)
        assert a["network.transport"] == "tcp" and a["network.type"] == "ipv4"
        assert a["fovea.flow.bytes"] == size + SYN_HEADERS + HEADERS * (a["fovea.flow.packets"] - 1)
        assert a["fovea.flow.reply_bytes"] == reply + SYN_HEADERS + HEADERS * (a["fovea.flow.reply_packets"] - 1)
        assert set(a["fovea.tcp.flags"].split("|")) >= {"SYN", "ACK", "FIN"}
        assert a["fovea.flow.end_reason"] == "fin" and a["fovea.observer"] == "source"
        assert (a["k8s.namespace.name"], a["k8s.pod.name"], a["k8s.deployment.name"]) == (WEB[0], WEB[1], "web")
        assert (a["fovea.peer.namespace"], a["fovea.peer.workload"], a["fovea.peer.pod"]) == ("shop", "db", "db-0")
        assert s.resource["service.name"] == "fovea" and s.resource["k8s.node.name"].startswith("test-")
        # First packet (SYN) to last (the ACK of the server's FIN): inside what the client
        # measured from connect() to EOF; the gap is scheduling only (generous: a loaded VM).
        assert 0 < s.duration <= seconds + 0.001
        assert seconds - s.duration < 0.5


def test_a_dropped_flow_carries_the_drop_events(lab, flow_agent, receiver):
    web, db = lab.pods
    port = 7101
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    lab.run(db.netns, "iptables", "-A", *rule)
    try:
        with pytest.raises(OSError):
            exchange(lab, web, db.ipv4, port, 10, timeout=1.5)  # the SYN and its retransmit(s)
    finally:
        lab.run(db.netns, "iptables", "-D", *rule, check=False)
    [span] = spans_to(receiver, db.ipv4, port, 1)
    a = span.attributes
    assert a["fovea.flow.end_reason"] == "idle" and a["fovea.flow.reply_packets"] == 0
    drops = [e for e in span.events if e[0] == "drop"]
    m = flow_agent.scrape()
    skipped = {s: m.get("fovea_agent_lost_events_total", source=s)
               for s in ("drop_events_over_rate", "drop_events_ring_full")}
    # every SYN was dropped, every drop is an event
    assert len(drops) == a["fovea.flow.packets"] >= 2, (drops, skipped)
    assert {e[2]["fovea.drop.reason"] for e in drops} == {"NETFILTER_DROP"}


def observe(agent, *args) -> list[str]:
    out = subprocess.run([FOVEA, "observe", "--server", f"127.0.0.1:{agent.observe_port}", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_fovea_observe_prints_the_flows_sent(lab, flow_agent, receiver):
    web, db = lab.pods
    port = 7102
    server = Server(lab, db, port, 100)
    try:
        made = [exchange(lab, web, db.ipv4, port, n) for n in (300, 400, 500)]
    finally:
        server.close()
    spans = spans_to(receiver, db.ipv4, port, 3)  # all ended
    assert len(spans) == 3
    records = [json.loads(x) for x in observe(flow_agent, "-o", "json", "--port", str(port), "--last", "100")]
    # The kernel may also drop a packet at a socket's close (e.g. NOT_SPECIFIED): drop records, not flows.
    assert {r["type"] for r in records} <= {"flow", "drop"}
    records = [r for r in records if r["type"] == "flow"]
    assert sorted(r["source"]["port"] for r in records) == sorted(m[0] for m in made)
    for r in records:
        span = next(s for s in spans if s.attributes["source.port"] == r["source"]["port"])
        assert r["type"] == "flow" and r["final"] and r["protocol"] == "tcp"
        assert (r["bytes"], r["packets"]) == (span.attributes["fovea.flow.bytes"], span.attributes["fovea.flow.packets"])
        assert r["source"]["pod"] == WEB[1] and r["destination"]["pod"] == DB[1]
    assert observe(flow_agent, "-o", "json", "--port", str(port), "--protocol", "udp") == []
    assert observe(flow_agent, "-o", "json", "--port", str(port), "--namespace", "elsewhere") == []
    by_pod = [json.loads(x) for x in observe(flow_agent, "-o", "json", "--port", str(port), "--pod", f"{DB[0]}/{DB[1]}")]
    assert len([r for r in by_pod if r["type"] == "flow"]) == 3
    human = [line for line in observe(flow_agent, "--port", str(port)) if " FLOW " in line]
    assert len(human) == 3 and all(f"shop/{WEB[1]}:" in line and f"shop/{DB[1]}:{port}" in line for line in human)
    # The dropped flow of the test above, and its drop records.
    dropped = [json.loads(x) for x in observe(flow_agent, "-o", "json", "--verdict", "dropped", "--port", "7101")]
    assert dropped and all(d["reason"] == "NETFILTER_DROP" for d in dropped)


def test_flow_table_full_every_flow_reaches_a_span_or_a_counter(lab, receiver, tmp_path):
    """A table of 2 entries: flows go through the ring buffer and are re-aggregated;
    what neither could keep is counted. Spans + connections counted lost = flows made."""
    web, db = lab.pods
    port = 7103
    cfg = agent_config(lab, tmp_path, "tiny.yaml", flows={"mapSize": 2},
                       otlp={"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint})
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg)
    try:
        server = Server(lab, db, port, 2000)
        n = 30
        try:
            made = [exchange(lab, web, db.ipv4, port, 1000 + i) for i in range(n)]
        finally:
            server.close()
        mine = {m[0] for m in made}
        node = f"test-{agent.port}"  # the module's agent exports these flows too: keep this one's
        spans = [s for s in spans_to(receiver, db.ipv4, port, n)
                 if s.attributes["source.port"] in mine and s.resource["k8s.node.name"] == node]
        m = agent.scrape()
        lost = m.get("fovea_agent_lost_events_total", source="flows_pods_connections")
        ring = m.get("fovea_agent_records_total", kind="flows_pods_ring_buffer")
        assert ring > 0  # the fallback was used
        assert len(spans) + lost == n
        # Each connection's outcome, too: decided from the re-aggregated SYN, or counted lost.
        outcomes = {r: m.get("fovea_workload_connections_total", source_namespace="shop", source_workload="web",
                             destination_namespace="shop", destination_workload="db", result=r)
                    for r in ("established", "refused", "timeout")}
        assert outcomes == {"established": n - lost, "refused": 0, "timeout": 0}
        for s in spans:  # re-aggregated flows are as exact as table flows
            a = s.attributes
            assert a["fovea.flow.reply_bytes"] == 2000 + SYN_HEADERS + HEADERS * (a["fovea.flow.reply_packets"] - 1)
    finally:
        assert agent.stop() == 0, agent.output()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_collector_down_then_up(lab, tmp_path):
    """Nothing listens at the endpoint for the first part: the agent stays healthy,
    its span queue stays bounded, every span is accounted for; export resumes."""
    web, db = lab.pods
    port = free_port()
    cfg = agent_config(lab, tmp_path, "down.yaml",
                       otlp={"enabled": True, "protocol": "grpc", "endpoint": f"http://127.0.0.1:{port}",
                             "queueSize": 32, "batchSize": 8})
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg)
    receiver = None
    sink = UdpSink(lab, db, 7104)
    try:
        udp_flows(lab, web, db.ipv4, 7104, range(20000, 20300))  # 300 UDP flows
        time.sleep(IDLE + 3)
        rss_before = rss_kib(agent.proc.pid)
        m = agent.scrape()
        assert m.get("fovea_agent_spans_exported_total") == 0
        assert m.get("fovea_agent_spans_queued") <= 32
        assert m.get("fovea_agent_spans_dropped_total", reason="queue_full") > 0
        import requests

        assert requests.get(agent.url + "/healthz", timeout=5).status_code == 200
        receiver = GrpcReceiver(port)
        deadline = time.monotonic() + 60  # the spans still queued go out first
        while agent.scrape().get("fovea_agent_spans_exported_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert agent.scrape().get("fovea_agent_spans_exported_total") > 0
        udp_flows(lab, web, db.ipv4, 7104, [29999])
        got = receiver.wait(lambda s: s.attributes.get("source.port") == 29999, timeout=60)
        assert len(got) == 1
        m = agent.scrape()
        records = m.get("fovea_agent_records_total", kind="flows_pods")
        accounted = (m.get("fovea_agent_spans_exported_total") + m.get("fovea_agent_spans_failed_total")
                     + m.get("fovea_agent_spans_queued")
                     + sum(m.get("fovea_agent_spans_dropped_total", reason=r)
                           for r in ("queue_full", "rate_limit")))
        assert m.get("fovea_agent_lost_events_total", source="records_otlp_queue_full") == 0
        assert records == accounted >= 301  # every flow: a span exported, failed, queued or dropped
        assert rss_kib(agent.proc.pid) - rss_before < 20_000  # the queue is 32 spans: no growth worth the name
    finally:
        sink.close()
        if receiver:
            receiver.stop()
        assert agent.stop() == 0, agent.output()


def test_a_long_connection_is_reported_per_interval_in_linked_spans(lab, receiver, tmp_path):
    web, db = lab.pods
    port = 7105
    cfg = agent_config(lab, tmp_path, "long.yaml", flows={"reportInterval": 1.0},
                       otlp={"enabled": True, "protocol": "grpc", "endpoint": receiver.endpoint})
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg)
    try:
        server = Server(lab, db, port, 500)
        s = lab.socket(web.netns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((db.ipv4, port))
            sport = s.getsockname()[1]
            for _ in range(4):  # 4 s of a connection, some data each second
                s.sendall(b"x" * 1000)
                time.sleep(1.0)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        finally:
            s.close()
            server.close()
        node = f"test-{agent.port}"
        spans = receiver.wait(lambda sp: sp.attributes.get("source.port") == sport
                              and sp.resource["k8s.node.name"] == node, timeout=IDLE * 5 + 20)
        spans.sort(key=lambda sp: sp.attributes["fovea.flow.window"])
        assert len(spans) >= 3  # ~4 s at one report per second
        assert [sp.attributes["fovea.flow.window"] for sp in spans] == list(range(len(spans)))
        assert len({sp.attributes["fovea.flow.id"] for sp in spans}) == 1
        for before, after in zip(spans, spans[1:]):  # each window links the one before
            assert after.links == [(before.trace_id, before.span_id)]
        assert spans[0].links == []
        assert [sp.attributes["fovea.flow.end_reason"] for sp in spans[:-1]] == ["interval"] * (len(spans) - 1)
        assert spans[-1].attributes["fovea.flow.end_reason"] == "fin"
        # The windows add up to the whole connection, exactly.
        packets = sum(sp.attributes["fovea.flow.packets"] for sp in spans)
        assert sum(sp.attributes["fovea.flow.bytes"] for sp in spans) == 4000 + SYN_HEADERS + HEADERS * (packets - 1)
        replies = sum(sp.attributes["fovea.flow.reply_packets"] for sp in spans)
        assert sum(sp.attributes["fovea.flow.reply_bytes"] for sp in spans) == 500 + SYN_HEADERS + HEADERS * (replies - 1)
    finally:
        assert agent.stop() == 0, agent.output()
