"""The agent without LLVM: its programs are compiled in a compiler process of their own, and an
unchanged restart takes them from the cache, compiling nothing (agent/compiler.py), while the
counters continue exactly (lifecycle.keepAttached), the tracepoints' (drops, TCP) included."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent import pins
from tests.conftest import RunningAgent
from tests.kernel.test_keep_attached import counts, expected, moved, node, write_config  # noqa: F401 (fixture)
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
