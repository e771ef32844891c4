"""Drops counted by the kernel's own reason equal the drops the test caused."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.conftest import promtool, require

pytestmark = pytest.mark.kernel


def drops(agent, reason: str, protocol: str) -> tuple[float, float]:
    return (
        agent.settled("fovea_drop_packets_total", reason=reason, protocol=protocol),
        agent.settled("fovea_drop_bytes_total", reason=reason, protocol=protocol),
    )


def test_iptables_drop_counts_exactly(lab, agent):
    pod, world = lab.pods[0], lab.world
    k, payload, port = 23, 200, 47001
    rule = ["INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"]
    lab.run(world.netns, "iptables", "-A", *rule)
    try:
        before = drops(agent, "NETFILTER_DROP", "udp")
        s = lab.socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(k):
            s.sendto(b"d" * payload, (world.ipv4, port))
        s.close()
        after = drops(agent, "NETFILTER_DROP", "udp")
        counted = lab.run(world.netns, "iptables", "-L", "INPUT", "-v", "-x", "-n").stdout
    finally:
        lab.run(world.netns, "iptables", "-D", *rule, check=False)
    assert f" {k} " in counted.splitlines()[2]  # iptables' own counter: the ground truth
    assert after[0] - before[0] == k
    assert after[1] - before[1] == k * (20 + 8 + payload)


def test_udp_to_closed_port_is_a_no_socket_drop(lab, agent):
    pod, world = lab.pods[1], lab.world
    n, payload = 9, 64
    before = drops(agent, "NO_SOCKET", "udp")
    s = lab.socket(pod.netns, socket.AF_INET6, socket.SOCK_DGRAM)
    for _ in range(n):
        s.sendto(b"c" * payload, (world.ipv6, 47002))  # nothing listens there
    s.close()
    after = drops(agent, "NO_SOCKET", "udp")
    assert after[0] - before[0] == n
    assert after[1] - before[1] == n * (40 + 8 + payload)


def test_reason_names_come_from_the_running_kernel(agent):
    from agent.kernel.tracefs import Tracefs

    reasons = Tracefs().drop_reasons()
    names = {dict(labels).get("reason") for (name, labels) in agent.scrape().samples if name == "fovea_drop_packets_total"}
    assert names <= set(reasons.values()) | {"UNKNOWN"}
    assert "NETFILTER_DROP" in reasons.values()


def test_promtool_accepts_a_real_scrape(agent):
    tool = promtool()
    require(tool is not None, "promtool (Debian package prometheus) is not installed")
    text = agent.scrape().text
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("fovea_forward_packets_total", "fovea_forward_bytes_total", "fovea_agent_plugin_up"):
        assert name in text
