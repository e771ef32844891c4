"""The agent's own health: map fill, lost details, idle keys, plugins down."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.conftest import RunningAgent

pytestmark = pytest.mark.kernel


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "fovea.yaml"
    path.write_text(text)
    return str(path)


def send_to_closed_port(lab, pod_index: int, family: int, n: int) -> None:
    pod, world = lab.pods[pod_index], lab.world
    s = lab.socket(pod.netns, family, socket.SOCK_DGRAM)
    dst = world.ipv4 if family == socket.AF_INET else world.ipv6
    for _ in range(n):
        s.sendto(b"z", (dst, 47100 + pod_index))
    s.close()


def total_drops(m) -> float:
    return sum(v for (name, _), v in m.samples.items() if name == "fovea_drop_packets_total")


def test_full_drop_map_keeps_totals_and_counts_lost_details(lab, tmp_path):
    agent = RunningAgent("--uplink", lab.uplink, "--config", config_file(tmp_path, "drops: {mapSize: 1}\n"))
    try:
        k = 17
        send_to_closed_port(lab, 0, socket.AF_INET, 1)  # likely takes the map's only slot
        before = agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp")
        m0 = agent.scrape()
        send_to_closed_port(lab, 0, socket.AF_INET, k)
        send_to_closed_port(lab, 1, socket.AF_INET6, k)
        after = agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp")
        m1 = agent.scrape()
        assert after - before == 2 * k  # totals stay right with the detail map full
        assert m1.get("fovea_agent_map_fill_ratio", map="drop_counts") == 1.0
        # The only slot was taken before pod 1 sent (by pod 0's first drop, or an
        # earlier drop elsewhere on the host), so all of pod 1's drops lost their
        # detail; no more than every drop in the window can have.
        lost = m1.get("fovea_agent_lost_events_total", source="drop_counts_full") - m0.get(
            "fovea_agent_lost_events_total", source="drop_counts_full")
        all_drops = total_drops(m1) - total_drops(m0)
        assert k <= lost <= all_drops
    finally:
        assert agent.stop() == 0


def test_counts_survive_idle_key_deletion(lab, tmp_path):
    """With keys retired after one unchanged read, a key that comes back adds on top."""
    agent = RunningAgent("--uplink", lab.uplink, "--config", config_file(tmp_path, "idleReads: 1\ninterval: 0.2\n"))
    try:
        k = 11
        before = agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp")
        send_to_closed_port(lab, 1, socket.AF_INET, k)
        assert agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp") - before == k
        time.sleep(1.5)  # several reads: the key is idle, folded into the base and deleted
        send_to_closed_port(lab, 1, socket.AF_INET, k)  # the same key again: a new map entry
        assert agent.settled("fovea_drop_packets_total", reason="NO_SOCKET", protocol="udp") - before == 2 * k
    finally:
        assert agent.stop() == 0


def test_idle_key_is_deleted_from_a_real_map(root):
    """CounterHash on a real per-CPU hash map (agent/bpfmaps.py): increments, and retiring
    with the kernel's lookup-and-delete."""
    import os

    from agent import bpfsys
    from agent.bpfmaps import PERCPU_HASH, Table
    from agent.maps import CounterHash

    counter = ["fovea_counter", [["packets", "unsigned long long"], ["bytes", "unsigned long long"]], "struct"]
    fd = bpfsys.map_create(PERCPU_HASH, 4, 16, 8, 0, b"h")
    table = Table("h", fd, {"type": PERCPU_HASH, "max_entries": 8, "key": "unsigned int", "leaf": counter})
    counts = CounterHash(table, decode=lambda key: key.value, idle_reads=2)

    def put(key: int, packets: int) -> None:
        leaf = table.Leaf()
        leaf[0].packets, leaf[0].bytes = packets, packets * 100
        table[table.Key(key)] = leaf

    put(1, 5)
    put(2, 7)
    assert counts.read() == {1: (5, 500), 2: (7, 700)}
    put(2, 9)
    assert counts.read() == {2: (2, 200)}  # increments: 1 unchanged once
    assert counts.read() == {}  # 1 unchanged twice: deleted, having gained nothing
    assert [k.value for k in table.keys()] == [2]
    assert counts.fill_ratio == 1 / 8
    put(1, 3)  # the key comes back and counts from zero in the kernel
    assert counts.read() == {1: (3, 300)}
    os.close(fd)


def test_missing_btf_takes_down_only_the_plugins_that_read_kernel_structs(lab, tmp_path):
    cfg = config_file(tmp_path, "kernel: {btf: /nonexistent/vmlinux}\n")
    agent = RunningAgent("--uplink", lab.uplink, "--config", cfg)
    try:
        m = agent.scrape()
        assert m.get("fovea_agent_plugin_up", plugin="forward") == 1
        assert m.get("fovea_agent_plugin_up", plugin="pods") == 1
        assert m.get("fovea_agent_plugin_up", plugin="drops") == 0
        assert m.get("fovea_agent_plugin_up", plugin="tcp") == 0
        ready = requests.get(agent.url + "/readyz", timeout=5).text
        assert "drops" in ready and "tcp" in ready and "no BTF at /nonexistent/vmlinux" in ready
    finally:
        assert agent.stop() == 0
    errors = [ln for ln in agent.output().splitlines() if "ERROR" in ln]
    assert len(errors) == 2
    assert "plugin drops is down: no BTF" in errors[0] and "plugin tcp is down: no BTF" in errors[1]


def test_missing_headers_stop_the_agent_with_one_line(lab, tmp_path):
    import subprocess

    from tests.conftest import FOVEA, free_port

    cfg = config_file(tmp_path, f"kernel: {{headers: {tmp_path}/none}}\n")
    r = subprocess.run([FOVEA, "agent", "--standalone", "--uplink", lab.uplink, "--config", cfg,
                        "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fovea: error:")]
    assert len(errors) == 1 and "has no include/linux" in errors[0], r.stderr
