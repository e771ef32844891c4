"""Forward counters on the lab uplink equal the traffic the test sent.

Lab: a pod namespace routed through the host to a "world" namespace behind
the lab uplink, which the agent is told to watch (--uplink). Static neighbour
entries and no IPv6 router solicitation/DAD mean nothing else crosses it.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import TC_MODES, RunningAgent, tc_mode_config

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=TC_MODES)
def agent(lab, request, tmp_path_factory):
    """The agent attached with tcx, then with the clsact fallback: the same exact counts either way."""
    a = RunningAgent("--uplink", lab.uplink, "--config", tc_mode_config(tmp_path_factory.mktemp("tc"), request.param))
    assert a.scrape().get("fovea_agent_attach_mode", mode=request.param) == 1
    yield a
    assert a.stop() == 0, a.output()

ICMP_ECHO_IP_BYTES = {4: 20 + 8 + 56, 6: 40 + 8 + 56}  # ping's default 56-byte payload
IP_HDR = {4: 20, 6: 40}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def forward(agent, direction: str) -> tuple[float, float]:
    return (
        agent.settled("fovea_forward_packets_total", direction=direction),
        agent.settled("fovea_forward_bytes_total", direction=direction),
    )


def addr(ep, version: int) -> str:
    return ep.ipv4 if version == 4 else ep.ipv6


@pytest.mark.parametrize("version", [4, 6])
def test_icmp_and_udp_counts_are_exact(lab, agent, version):
    pod, world = lab.pods[0], lab.world
    n_pings, n_udp, payload = 25, 40, 333

    listener = lab.socket(world.netns, FAMILY[version], socket.SOCK_DGRAM)
    listener.bind((addr(world, version), 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    out0, in0 = forward(agent, "egress"), forward(agent, "ingress")

    ping = lab.run(pod.netns, "ping", f"-{version}", "-c", str(n_pings), "-i", "0.002", "-q", addr(world, version))
    assert f"{n_pings} received" in ping.stdout, ping.stdout
    sender = lab.socket(pod.netns, FAMILY[version], socket.SOCK_DGRAM)
    for _ in range(n_udp):
        sender.sendto(b"u" * payload, (addr(world, version), port))
    received = sum(1 for _ in range(n_udp) if listener.recv(2048))
    sender.close()
    listener.close()
    assert received == n_udp  # ground truth: every datagram arrived

    out1, in1 = forward(agent, "egress"), forward(agent, "ingress")
    udp_ip_bytes = IP_HDR[version] + 8 + payload
    assert out1[0] - out0[0] == n_pings + n_udp
    assert out1[1] - out0[1] == n_pings * ICMP_ECHO_IP_BYTES[version] + n_udp * udp_ip_bytes
    assert in1[0] - in0[0] == n_pings  # echo replies
    assert in1[1] - in0[1] == n_pings * ICMP_ECHO_IP_BYTES[version]


PACING = 125_000_000  # bytes/s (1 Gbit/s): bursts small enough not to overflow a veth backlog
SO_MAX_PACING_RATE = 47  # asm-generic/socket.h; Python's socket module lacks the name


def transfer(lab, agent, version, total):
    """One paced TCP transfer pod -> world: (counter deltas, ground truth) or None
    if a segment was retransmitted (lost somewhere: before or after the uplink,
    the ground truth can't tell)."""
    pod, world = lab.pods[1], lab.world
    server = lab.socket(world.netns, FAMILY[version], socket.SOCK_STREAM)
    server.bind((addr(world, version), 0))
    server.listen(1)
    got = []

    def sink():
        conn, _ = server.accept()
        n = 0
        while chunk := conn.recv(1 << 16):
            n += len(chunk)
        conn.close()
        got.append(n)

    t = threading.Thread(target=sink)
    t.start()
    out0, in0 = forward(agent, "egress"), forward(agent, "ingress")
    truth0 = [lab.snmp(pod.netns, "Tcp", "OutSegs"), lab.snmp(world.netns, "Tcp", "OutSegs"),
              lab.snmp(pod.netns, "Tcp", "RetransSegs") + lab.snmp(world.netns, "Tcp", "RetransSegs")]
    client = lab.socket(pod.netns, FAMILY[version], socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, PACING)
    client.connect((addr(world, version), server.getsockname()[1]))
    client.sendall(b"t" * total)
    client.shutdown(socket.SHUT_WR)
    t.join(60)
    client.close()
    server.close()
    assert got == [total]
    out1, in1 = forward(agent, "egress"), forward(agent, "ingress")
    truth1 = [lab.snmp(pod.netns, "Tcp", "OutSegs"), lab.snmp(world.netns, "Tcp", "OutSegs"),
              lab.snmp(pod.netns, "Tcp", "RetransSegs") + lab.snmp(world.netns, "Tcp", "RetransSegs")]
    if truth1[2] != truth0[2]:
        return None
    counted = (out1[0] - out0[0], out1[1] - out0[1], in1[0] - in0[0])
    return counted, (truth1[0] - truth0[0], truth1[1] - truth0[1])


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_transfer_counts_segments_not_skbs(lab, agent, version):
    """With segmentation offload on, tc sees GSO skbs; packets must equal segments."""
    total = 8 * 1024 * 1024
    for _ in range(3):  # a transfer that lost a segment proves nothing: run another
        result = transfer(lab, agent, version, total)
        if result is not None:
            break
    assert result is not None, "every transfer had retransmits: the lab is losing packets"
    (egress_packets, egress_bytes, ingress_packets), (pod_segs, world_segs) = result
    assert pod_segs > total // 65536  # many segments: far more than 64 KiB GSO skbs
    assert egress_packets == pod_segs
    assert ingress_packets == world_segs
    # Every segment carries its own IP and TCP headers, the payload counts once.
    # TCP header: 32 bytes (timestamps option, on by default in a new netns);
    # the SYN's is 40 (MSS, SACK-permitted, timestamps, window scale).
    assert egress_bytes == total + pod_segs * (IP_HDR[version] + 32) + 8
