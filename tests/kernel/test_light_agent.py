"""The agent without LLVM: its programs are compiled in a compiler process of their own, and an
unchanged restart takes them from the cache, compiling nothing (agent/compiler.py), while the
counters continue exactly (lifecycle.keepAttached): pods and forward, drops and TCP, DNS and HTTP."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import yaml

from agent import pins
from tests.conftest import RunningAgent
from tests.kernel.test_keep_attached import WEB, counts, expected, moved, node, write_config  # noqa: F401 (fixture)
from tests.kernel.test_lifecycle import ping

pytestmark = pytest.mark.kernel

PLUGINS = ["forward", "drops", "pods", "tcp", "dns"]  # the default plugins
OBJECTS = 4  # pods.c and forward.c (DNS and flows compiled in), drops.c, tcp.c
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc.so")  # libbcc_bpf (no LLVM) would be fine; it is not used


def mapped_libraries(pid: int) -> set[str]:
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split()) > 5 and ".so" in line.split()[-1]}


def loaded(agent: RunningAgent) -> dict[str, float]:
    m = agent.scrape()
    return {source: m.get("fovea_agent_bpf_programs_loaded_total", source=source) for source in ("compiled", "cache")}


def test_the_agent_never_maps_llvm_and_an_unchanged_restart_compiles_nothing(lab, tmp_path, node):  # noqa: F811
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path, lab, "auto", plugins=PLUGINS, kernel={"cacheDir": str(cache)})
    first = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
    try:
        assert loaded(first) == {"compiled": OBJECTS, "cache": 0}, first.output()
        libraries = mapped_libraries(first.proc.pid)
        assert any(lib.startswith("libbpf.so") for lib in libraries)  # the buffers' reader: the check sees libraries
        assert not [lib for lib in libraries if lib.startswith(COMPILER_LIBRARIES)], libraries
        assert m_up(first) == dict.fromkeys(PLUGINS, 1.0), first.output()
        ping(lab, 3)
        before = counts(first)
    finally:
        assert first.stop() == 0, first.output()
    assert len(list((cache / "programs").glob("*.json"))) == OBJECTS
    n, m = 13, 7
    ping(lab, n)  # while no agent runs
    second = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
    try:
        assert loaded(second) == {"compiled": 0, "cache": OBJECTS}, second.output()
        assert "compiled in" not in second.output() and "took over its maps" in second.output()
        assert not [lib for lib in mapped_libraries(second.proc.pid) if lib.startswith(COMPILER_LIBRARIES)]
        assert m_up(second) == dict.fromkeys(PLUGINS, 1.0), second.output()
        ping(lab, m)
        assert moved(counts(second), before) == expected(n + m)
    finally:
        assert second.stop() == 0, second.output()


def m_up(agent: RunningAgent) -> dict[str, float]:
    m = agent.scrape()
    return {p: m.get("fovea_agent_plugin_up", plugin=p) for p in PLUGINS}


def drops_and_resets(lab, drops: int, resets: int) -> None:
    """UDP to a closed port of the world (dropped there: NO_SOCKET), and TCP connects from
    one pod to a closed port of the other (a reset sent by one, received by the other)."""
    client, server = lab.pods[:2]
    s = lab.socket(client.netns, socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(drops):
        s.sendto(b"z", (lab.world.ipv4, 47199))
    s.close()
    for _ in range(resets):
        c = lab.socket(client.netns, socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):
            c.connect((server.ipv4, 9))
        c.close()


def tracepoint_counts(agent: RunningAgent) -> dict[str, float]:
    return {"drops": agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp"),
            "resets sent": agent.settled("fovea_tcp_resets_total", direction="sent"),
            "resets received": agent.settled("fovea_tcp_resets_total", direction="received")}


def test_drop_and_tcp_counters_continue_across_restarts(lab, tmp_path, node):  # noqa: F811
    """The tracepoint programs stay attached while no agent runs; an unchanged one is kept as
    it is, a changed one (tcp_probe's, with another interval: its RTT sampling period is
    compiled in) replaced."""
    extra = {"plugins": ["forward", "pods", "drops", "tcp"], "tcp": {"includeHost": False},
             "kernel": {"cacheDir": str(tmp_path / "cache")}}
    cfg = write_config(tmp_path, lab, "auto", **extra)
    first = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
    try:
        drops_and_resets(lab, 2, 2)  # the series exist
        before = tracepoint_counts(first)
    finally:
        assert first.stop() == 0, first.output()
    total = 0
    for interval, probe, (n, m) in (("1", "kept", (11, 5)), ("0.5", "replaced", (7, 3))):
        drops_and_resets(lab, n, n)  # while no agent runs
        agent = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node, "--interval", interval)
        try:
            out = agent.output()
            assert "skb:kfree_skb: kept the previous agent's program" in out, out
            assert "tcp:tcp_send_reset: kept the previous agent's program" in out, out
            assert f"tcp:tcp_probe: {probe} the previous agent's program" in out, out  # it samples RTT per interval
            drops_and_resets(lab, m, m)
            total += n + m
            assert moved(tracepoint_counts(agent), before) == dict.fromkeys(before, total), agent.output()
        finally:
            assert agent.stop() == 0, agent.output()
    for hook in ("drops", "tcp"):  # one link per tracepoint, nothing stacked
        links = [p.name for p in (pins.NodePins(node).program_dir(hook)).iterdir() if p.name.startswith("link_")]
        assert len(links) == {"drops": 1, "tcp": 6}[hook], links


def serve_dns_and_http(lab, stop) -> None:
    """In the db pod: a DNS server on UDP 53 that answers every query (NOERROR, no records) and
    an HTTP server on 8080 that answers every request with 200, one request per connection."""
    db = lab.pods[1]
    udp = lab.socket(db.netns, socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 53))
    udp.settimeout(0.2)
    tcp = lab.socket(db.netns, socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 8080))
    tcp.listen(64)
    tcp.settimeout(0.2)

    def answer_dns():
        while not stop.is_set():
            try:
                query, peer = udp.recvfrom(512)
            except TimeoutError:
                continue
            udp.sendto(query[:2] + bytes([query[2] | 0x80, 0x80]) + query[4:], peer)  # QR, RA; rcode 0

    def answer_http():
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threads = [threading.Thread(target=f, daemon=True) for f in (answer_dns, answer_http)]
    for t in threads:
        t.start()
    return threads, (udp, tcp)


def ask_and_get(lab, n: int) -> None:
    """n DNS queries (type A) and n HTTP GETs from the web pod to the db pod, each answered."""
    web, db = lab.pods[:2]
    for i in range(n):
        s = lab.socket(web.netns, socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        query = (0x1000 + i).to_bytes(2, "big") + bytes.fromhex("01000001000000000000") + \
            b"\x03app\x04shop\x00" + bytes.fromhex("00010001")
        s.sendto(query, (db.ipv4, 53))
        assert s.recv(512)[:2] == query[:2]
        s.close()
        c = lab.socket(web.netns, socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect((db.ipv4, 8080))
        c.sendall(b"GET /x HTTP/1.1\r\nHost: db\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.close()


def dns_and_http_counts(agent: RunningAgent) -> dict[str, float]:
    pair = {"source_namespace": "shop", "source_workload": "web", "destination_namespace": "shop",
            "destination_workload": "db"}
    return {"dns requests": agent.settled("fovea_dns_requests_total", qtype="A"),
            "dns responses": agent.settled("fovea_dns_responses_total", qtype="A", rcode="NOERROR"),
            "web dns requests": agent.settled("fovea_pod_dns_requests_total", **WEB, qtype="A"),
            "http requests": agent.settled("fovea_workload_http_requests_total", **pair, method="GET",
                                           status_class="2xx")}


def test_dns_and_http_counters_continue_across_a_restart(lab, tmp_path, node):  # noqa: F811
    """Their maps live in the tc programs, which are swapped in place: the counts, the cumulative
    arrays and the requests in flight are adopted, and the readers continue from the saved state."""
    db = {"namespace": "shop", "pod": "db-0", "workloadKind": "StatefulSet", "workloadName": "db", "observe": True}
    cfg = write_config(tmp_path, lab, "auto", plugins=["forward", "pods", "dns", "http"])
    pods = yaml.safe_load((tmp_path / "pods.yaml").read_text())
    pods["pods"].append({"ip": lab.pods[1].ipv4, **db})
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump(pods))
    stop = threading.Event()
    threads, sockets = serve_dns_and_http(lab, stop)
    try:
        first = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
        try:
            ask_and_get(lab, 2)  # the series exist
            before = dns_and_http_counts(first)
            assert before == dict.fromkeys(before, 2), first.output()
        finally:
            assert first.stop() == 0, first.output()
        n, m = 9, 4
        ask_and_get(lab, n)  # while no agent runs
        second = RunningAgent("--uplink", lab.uplink, "--config", cfg, "--node-name", node)
        try:
            adopted = [ln for ln in second.output().splitlines() if "took over its maps" in ln]
            assert any("dns_counts" in ln and "http_counts" in ln for ln in adopted), second.output()
            ask_and_get(lab, m)
            assert moved(dns_and_http_counts(second), before) == dict.fromkeys(before, n + m), second.output()
        finally:
            assert second.stop() == 0, second.output()
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in sockets:
            s.close()
