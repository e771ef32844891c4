"""One lookup per packet per hook: the map operations the tc programs make, counted.

The programs are built as the default agent builds them (flows and DNS on),
plus -DFOVEA_COUNT_MAP_OPS, which counts every map operation on the packet
path in fovea_map_ops (bpf/fovea.h). The kernel runs each program on a
synthetic packet with BPF_PROG_TEST_RUN (bench/tc_cost.py's packets): the
first run makes the flow's entry, the next ones are the steady state counted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import tc_cost  # noqa: E402
from tc_cost import NODE, POD, POD_VETH, build_flags, dns_message, packet  # noqa: E402

pytestmark = pytest.mark.kernel

RUNS = 10
PACKETS = {
    "tcp": packet(6, 40000, 5201, bytes(1400)),
    "udp": packet(17, 40000, 5201, bytes(64)),
    "udp from the node": packet(17, 40000, 5201, bytes(64), src=NODE),
    "dns query": packet(17, 40000, 53, dns_message(False)),
}


@pytest.fixture(scope="module")
def programs(root):
    from agent.compiler import compile_program
    from agent.config import Config
    from agent.flows import KernelFlowTable
    from agent.kernel.headers import find_headers

    cfg = Config()
    flags = build_flags(cfg)
    headers = find_headers(None, cache=cfg.kernel.cacheDir)
    loaded, objects = {}, []
    try:
        for program, names in (("pods", (b"pod_from_pod", b"pod_to_pod")),
                               ("forward", (b"forward_ingress", b"forward_egress"))):
            bpf = compile_program(program, flags[(program, "+dns+flows")] + ["-DFOVEA_COUNT_MAP_OPS"], headers)
            objects.append(bpf)
            KernelFlowTable(bpf).set_pod_addresses({POD}, set())
            KernelFlowTable(bpf).set_pod_interfaces({POD_VETH}, set())  # the uplink's program only
            for name in names:
                loaded[name.decode()] = (bpf, bpf.load_func(name, bpf.SCHED_CLS))
        yield loaded
    finally:
        for bpf in objects:
            bpf.cleanup()


def ops_per_run(programs, function: str, data: bytes, ingress_ifindex: int = 0) -> float:
    bpf, fn = programs[function]
    tc_cost.test_run(fn.fd, data, 1, ingress_ifindex)  # the flow's first packet makes its entry
    counter = bpf["fovea_map_ops"]
    before = sum(counter[0])
    tc_cost.test_run(fn.fd, data, RUNS, ingress_ifindex)
    return (sum(counter[0]) - before) / RUNS


@pytest.mark.parametrize("function", ["pod_from_pod", "pod_to_pod"])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_pod_interface_makes_one_map_operation_per_packet(programs, function, kind):
    """The flow entry carries the pod counters and the traffic map: nothing else is looked up."""
    assert ops_per_run(programs, function, PACKETS[kind], POD_VETH if function == "pod_to_pod" else 0) == 1


@pytest.mark.parametrize("kind", ["tcp", "udp", "dns query"])
def test_uplink_costs_a_forwarded_pod_packet_an_array_add_and_one_lookup(programs, kind):
    """A pod's packet leaving through the uplink was recorded at the pod's interface. The
    pod-address lookup of its source tells it was not source-NATed (then its replies
    need no stamp, flows.inc): one lookup more than the array add."""
    assert ops_per_run(programs, "forward_egress", PACKETS[kind], ingress_ifindex=POD_VETH) == 2


def test_uplink_stamps_a_masqueraded_pod_packet_for_its_replies(programs):
    """Came in through a pod interface, leaves with the node's address: the array add, the
    pod-address lookup (a miss), the pod-interface lookup and the reply stamp's lookup
    (the steady state: the stamp exists and is refreshed in place)."""
    masqueraded = packet(17, 40001, 5201, bytes(64), src=NODE)
    assert ops_per_run(programs, "forward_egress", masqueraded, ingress_ifindex=POD_VETH) == 4
    reply = swap_addresses(packet(17, 5201, 40001, bytes(64), src=NODE))  # PEER -> NODE, before de-NAT
    # The array add, the pod-address lookup, the stamp found fresh: left to the pod's interface.
    assert ops_per_run(programs, "forward_ingress", reply) == 3


def test_uplink_forwarded_between_uplinks_costs_two_lookups(programs):
    """Came in through an interface that is no pod's: kept where it came in, no stamp."""
    routed = packet(17, 40002, 5201, bytes(64), src=NODE)
    assert ops_per_run(programs, "forward_egress", routed, ingress_ifindex=POD_VETH + 1) == 3


def test_uplink_keeps_the_nodes_own_flow_with_one_lookup(programs):
    """The node's own packet: the array add and the flow entry."""
    assert ops_per_run(programs, "forward_egress", PACKETS["udp from the node"]) == 2


def test_uplink_keeps_a_packet_arriving_for_the_node(programs):
    """Arriving for the node itself: the array add, the pod-address lookup, the NAT-reply
    lookup (a masqueraded pod flow's reply looks the same before de-NAT) and the flow entry."""
    arriving = swap_addresses(packet(17, 40003, 5201, bytes(64), src=NODE))  # PEER -> NODE
    assert ops_per_run(programs, "forward_ingress", arriving) == 4


def test_uplink_leaves_a_packet_for_a_local_pod_after_one_lookup(programs):
    """Arriving for a local pod: the array add and the pod-address lookup, no flow entry."""
    reply = swap_addresses(packet(17, 5201, 40000, bytes(64)))  # PEER -> POD
    assert ops_per_run(programs, "forward_ingress", reply) == 2


def swap_addresses(data: bytes) -> bytes:
    """The same frame with IPv4 source and destination exchanged (checksums are not read)."""
    ip = 14
    return data[:ip + 12] + data[ip + 16:ip + 20] + data[ip + 12:ip + 16] + data[ip + 20:]


def test_dns_code_is_reached_by_its_port_only(programs):
    """A DNS query adds the DNS counter and the in-flight entry to the flow's lookup: the
    counter sees them, so the single operation of the tests above is not a blind spot."""
    assert ops_per_run(programs, "pod_from_pod", PACKETS["dns query"]) == 3


def test_uplink_leaves_a_dns_response_for_a_local_pod_to_its_interface(programs):
    """A DNS response arriving for a local pod costs the uplink what any packet for a pod
    costs (the array add and the pod-address lookup): no route lookup, no in-flight lookup;
    the pod's interface counts it."""
    response = swap_addresses(packet(17, 40000, 53, dns_message(True)))  # PEER:53 -> POD:40000
    assert ops_per_run(programs, "forward_ingress", response) == 2

