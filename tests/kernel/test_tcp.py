"""TCP health against ground truth in the node lab: resets, retransmits,
connection states, handshake latency and RTT, node-level and per pod.

The agent counts only the lab's pod namespaces (`tcp.includeHost: false`), so
the host's own connections (this test's scrapes among them) stay out of the
numbers and every count can be compared for equality.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import uuid

import pytest
import yaml

from tests.conftest import RunningAgent

pytestmark = pytest.mark.kernel

CLIENT = ("shop", "web-7d9c-abcde", "Deployment", "web")
SERVER = ("shop", "db-0", "StatefulSet", "db")
POD_KEYS = ("namespace", "pod", "workload_kind", "workload_name")


@pytest.fixture(scope="module")
def tcp_agent(lab, tmp_path_factory):
    client, server = lab.pods
    pods = [{"ip": ip, "namespace": who[0], "pod": who[1], "workloadKind": who[2], "workloadName": who[3],
             "observe": True}
            for ep, who in ((client, CLIENT), (server, SERVER)) for ip in (ep.ipv4, ep.ipv6)]
    d = tmp_path_factory.mktemp("tcp")
    (d / "pods.yaml").write_text(yaml.safe_dump({"pods": pods}))
    (d / "fovea.yaml").write_text(yaml.safe_dump({
        "staticPods": str(d / "pods.yaml"),
        "plugins": ["tcp"],
        "pods": {"interfaces": [lab.prefix + "p*"]},
        "tcp": {"includeHost": False, "reconcileInterval": 1},
    }))
    agent = RunningAgent("--uplink", lab.uplink, "--config", str(d / "fovea.yaml"))
    yield agent
    assert agent.stop() == 0, agent.output()


def pod_value(agent, name, who, **labels) -> float:
    return agent.settled(name, **dict(zip(POD_KEYS, who)), **labels)


def server_thread(lab, ns: str, port: int, handle, backlog: int = 128):
    """A listening socket in `ns`; `handle(conn)` runs for each accepted connection."""
    srv = lab.socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(backlog)
    conns = []

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            handle(conn)

    threading.Thread(target=loop, daemon=True).start()
    return srv, conns


def test_connects_to_a_closed_port_are_resets_sent_and_received(lab, tcp_agent):
    client, server = lab.pods
    n = 17
    sent0 = tcp_agent.settled("fovea_tcp_resets_total", direction="sent")
    recv0 = tcp_agent.settled("fovea_tcp_resets_total", direction="received")
    pod0 = pod_value(tcp_agent, "fovea_pod_tcp_resets_total", SERVER, direction="sent"), \
        pod_value(tcp_agent, "fovea_pod_tcp_resets_total", CLIENT, direction="received")
    refused = 0
    for _ in range(n):
        s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((server.ipv4, 9))  # nothing listens on discard
        except ConnectionRefusedError:
            refused += 1
        finally:
            s.close()
    assert refused == n
    assert tcp_agent.settled("fovea_tcp_resets_total", direction="sent") - sent0 == n
    assert tcp_agent.settled("fovea_tcp_resets_total", direction="received") - recv0 == n
    assert pod_value(tcp_agent, "fovea_pod_tcp_resets_total", SERVER, direction="sent") - pod0[0] == n
    assert pod_value(tcp_agent, "fovea_pod_tcp_resets_total", CLIENT, direction="received") - pod0[1] == n


def retrans_segs(lab) -> tuple[int, int]:
    """Retransmitted segments that left each pod: RetransSegs counts a
    retransmit before it is handed to the device, TCPRetransFail the ones the
    device refused (a full veth backlog on a busy host). Fovea counts what
    went out, so the truth is the difference."""
    def sent(ns: str) -> int:
        return lab.snmp(ns, "Tcp", "RetransSegs") - lab.snmp(ns, "TcpExt", "TCPRetransFail")
    client, server = lab.pods
    return sent(client.netns), sent(server.netns)


def test_retransmits_equal_the_kernels_retransmitted_segments(lab, tcp_agent):
    """Random loss on the server's input (no netem here: iptables statistic); the veth
    offloads segmentation (GSO), so a retransmitted skb may carry several segments:
    Fovea counts segments, as the kernel's RetransSegs does."""
    client, server = lab.pods
    port = 5201
    comment = f"fovea-test-{uuid.uuid4().hex[:8]}"
    rule = ["-p", "tcp", "--dport", str(port), "-m", "statistic", "--mode", "random", "--probability", "0.05",
            "-m", "comment", "--comment", comment, "-j", "DROP"]
    received = []

    def drain(conn):
        def loop():
            total = 0
            while chunk := conn.recv(65536):
                total += len(chunk)
            received.append(total)
            conn.close()
        threading.Thread(target=loop, daemon=True).start()

    srv, _ = server_thread(lab, server.netns, port, drain)
    lab.run(server.netns, "iptables", "-A", "INPUT", *rule)
    try:
        node0 = tcp_agent.settled("fovea_tcp_retransmits_total")
        pod0 = pod_value(tcp_agent, "fovea_pod_tcp_retransmits_total", CLIENT)
        truth0 = retrans_segs(lab)
        payload = b"x" * (4 << 20)
        s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect((server.ipv4, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the server closes after reading everything
        s.close()
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received == [len(payload)]
        # The server's FIN is retransmitted until its ACK gets through the loss rule: read the
        # truth once no socket waits for one (LAST_ACK), so no retransmit comes after it.
        while ss_count(lab, "last-ack") or ss_count(lab, "closing"):
            assert time.monotonic() < deadline, "the server's connection never finished closing"
            time.sleep(0.05)
        time.sleep(0.2)
        truth1 = retrans_segs(lab)
        node1 = tcp_agent.settled("fovea_tcp_retransmits_total")
        pod1 = pod_value(tcp_agent, "fovea_pod_tcp_retransmits_total", CLIENT)
    finally:
        lab.run(server.netns, "iptables", "-D", "INPUT", *rule, check=False)
        srv.close()
    client_truth = truth1[0] - truth0[0]
    assert client_truth >= 10, "the loss rule made too few retransmits to test anything"
    assert node1 - node0 == client_truth + truth1[1] - truth0[1]
    assert pod1 - pod0 == client_truth


def ss_count(lab, state: str) -> int:
    """Sockets `ss` lists in `state` across the lab's pod namespaces."""
    total = 0
    for ep in lab.pods:
        out = lab.run(ep.netns, "ss", "-Htan", "state", state).stdout
        total += len(out.splitlines())
    return total


def connections(agent, state: str) -> float:
    return agent.scrape().get("fovea_tcp_connections", state=state)


def wait_for(agent, state: str, want: float, timeout: float = 15) -> float:
    """The gauge once it equals `want` (or the last value after `timeout`: the
    state gauge is refreshed by transitions at once, TIME_WAIT by the next dump)."""
    deadline = time.monotonic() + timeout
    while (value := connections(agent, state)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_held_connections_move_the_state_gauge_as_ss_counts(lab, tcp_agent):
    client, server = lab.pods
    k = 12
    srv, accepted = server_thread(lab, server.netns, 5301, lambda conn: None)
    try:
        base_est = ss_count(lab, "established")
        assert wait_for(tcp_agent, "ESTABLISHED", base_est) == base_est
        socks = []
        for _ in range(k):
            s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
            s.connect((server.ipv4, 5301))
            socks.append(s)
        deadline = time.monotonic() + 10
        while len(accepted) < k and time.monotonic() < deadline:
            time.sleep(0.05)
        held = ss_count(lab, "established")
        assert held - base_est == 2 * k  # both ends live in lab namespaces
        assert wait_for(tcp_agent, "ESTABLISHED", held) == held
        # The client closes first: its sockets go to TIME_WAIT.
        for s in socks:
            s.close()
        for conn in accepted:
            conn.close()
        time.sleep(0.5)
        assert ss_count(lab, "established") == base_est
        assert wait_for(tcp_agent, "ESTABLISHED", base_est) == base_est
        time_wait = ss_count(lab, "time-wait")
        assert time_wait >= k
        assert wait_for(tcp_agent, "TIME_WAIT", time_wait) == time_wait
    finally:
        srv.close()


def histogram(agent, name: str) -> tuple[float, float]:
    m = agent.scrape()
    return m.get(name + "_count"), m.get(name + "_sum")


def test_handshake_latency_has_one_sample_per_connect(lab, tcp_agent):
    client, server = lab.pods
    n = 25
    srv, accepted = server_thread(lab, server.netns, 5401, lambda conn: conn.close())
    try:
        count0, sum0 = histogram(tcp_agent, "fovea_tcp_connect_duration_seconds")
        measured = 0.0
        for _ in range(n):
            s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
            t0 = time.perf_counter()
            s.connect((server.ipv4, 5401))
            measured += time.perf_counter() - t0
            s.close()
        time.sleep(1.5)
        count1, sum1 = histogram(tcp_agent, "fovea_tcp_connect_duration_seconds")
    finally:
        srv.close()
    assert count1 - count0 == n
    # The kernel times SYN_SENT -> ESTABLISHED, inside connect(): never longer than the call.
    assert 0 < sum1 - sum0 <= measured


def ss_rtts(lab, ns: str, port: int) -> list[float]:
    """Smoothed RTTs (seconds) `ss -ti` shows for the connections on `port` in `ns`."""
    out = lab.run(ns, "ss", "-Htin", "state", "established", f"( sport = :{port} or dport = :{port} )").stdout
    return [float(ms) / 1000 for ms in re.findall(r"\brtt:([\d.]+)/", out)]


def test_rtt_samples_agree_with_ss(lab, tcp_agent):
    """One echo per connection: each of the 2k sockets receives segments once
    within an interval, so exactly 2k samples; their mean agrees with the
    smoothed RTT `ss` reports for the same sockets."""
    client, server = lab.pods
    k, port = 10, 5501

    def echo(conn):
        conn.sendall(conn.recv(100))

    srv, accepted = server_thread(lab, server.netns, port, echo)
    socks = []
    try:
        time.sleep(1.2)  # past one RTT interval: no earlier sample of these ports
        count0, sum0 = histogram(tcp_agent, "fovea_tcp_rtt_seconds")
        for _ in range(k):
            s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
            s.connect((server.ipv4, port))
            s.sendall(b"p" * 100)
            assert s.recv(100) == b"p" * 100
            socks.append(s)
        time.sleep(0.5)
        rtts = ss_rtts(lab, client.netns, port) + ss_rtts(lab, server.netns, port)
        count1, sum1 = histogram(tcp_agent, "fovea_tcp_rtt_seconds")
    finally:
        for s in socks:
            s.close()
        srv.close()
    assert len(rtts) == 2 * k
    assert count1 - count0 == 2 * k
    mean_agent = (sum1 - sum0) / (count1 - count0)
    mean_ss = sum(rtts) / len(rtts)
    # The tracepoint sees srtt as each segment arrives, `ss` after the last one
    # was folded in (and rounds to 1 us); on a veth both are tens of us and one
    # late delayed ACK can move srtt by itself: within a factor of 2 and 50 us.
    assert abs(mean_agent - mean_ss) <= max(mean_ss, 50e-6), (mean_agent, mean_ss, rtts)
