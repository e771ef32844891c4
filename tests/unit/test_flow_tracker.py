"""FlowTracker on a fake kernel table: directions joined, one point per flow, ends, windows, ring buffer."""

from __future__ import annotations

import ipaddress

import pytest

from agent.config import FlowsConfig
from agent.flows import (ACK, FIN, POD_RECEIVED, POD_SENT, REJECTED, RST, SYN, SYN_ONLY, UPLINK_IN, FlowEvent, FlowId,
                         FlowStats, FlowTracker)

S = 1_000_000_000
WEB, DB, OUT = "10.0.1.2", "10.0.2.2", "93.184.216.34"


def fid(src, sport, dst, dport, point=POD_SENT, proto=6) -> FlowId:
    k = FlowId(family=4, l4proto=proto, point=point, sport=sport, dport=dport)
    k.saddr[:4] = ipaddress.IPv4Address(src).packed
    k.daddr[:4] = ipaddress.IPv4Address(dst).packed
    return k


class FakeTable:
    """Per-CPU entries as the kernel keeps them (2 CPUs), and a ring buffer."""

    max_entries = 100

    def __init__(self):
        self.entries: dict[bytes, list[FlowStats]] = {}
        self.ring: list[FlowEvent] = []
        self.callback = None
        self.lost_counts = (0, 0, 0)

    def add(self, key: FlowId, packets, nbytes, at_ns, flags=0, cpu=0, seq=0):
        leaf = self.entries.setdefault(bytes(key), [FlowStats(), FlowStats()])
        s = leaf[cpu]
        s.packets += packets
        s.bytes += nbytes
        s.first_ns = s.first_ns or at_ns
        s.last_ns = at_ns
        s.flags |= flags | (SYN_ONLY if flags & (SYN | ACK) == SYN else 0)
        if flags & (SYN | ACK) == SYN:
            s.syn_tag = seq & 0xFFFF

    def listen(self, callback):
        self.callback = callback

    def consume(self):
        for e in self.ring:
            self.callback(e)
        self.ring.clear()

    def items(self):
        return list(self.entries.items())

    def pop(self, raw):
        return self.entries.pop(raw, None)

    def lost(self):
        return self.lost_counts

    def set_pod_addresses(self, add, remove):
        self.pods = getattr(self, "pods", set()) | add - remove

    def set_pod_interfaces(self, add, remove):
        self.ifaces = getattr(self, "ifaces", set()) | add - remove


class Names:
    """What the tracker asks the attribution stage: local pod addresses and interfaces, Services."""

    def __init__(self, pods=(), services=()):
        self.pod_addresses = frozenset(pods)
        self.pod_interfaces = {}
        self.services = set(services)

    def service(self, ip):
        return "svc" if ip in self.services else None


class Clock:
    def __init__(self):
        self.now = 100 * S

    def __call__(self):
        return self.now


def tracker(pods=(WEB, DB), services=(), **cfg):
    table, clock, out = FakeTable(), Clock(), []
    t = FlowTracker(table, FlowsConfig(**{"idleTimeout": 5.0, "reportInterval": 20.0, **cfg}), out.append,
                    Names(pods, services), clock=clock)
    return t, table, clock, out


def tcp_connection(table, at, sport=40000, request=1000, reply=300, point_reply=POD_SENT, reset=False):
    """A client WEB:sport -> DB:5432 connection as the kernel would count it at the pods' interfaces."""
    c, s = fid(WEB, sport, DB, 5432), fid(DB, 5432, WEB, sport, point=point_reply)
    table.add(c, 1, 60, at, SYN)
    table.add(s, 1, 60, at + 1000, SYN | ACK, cpu=1)
    table.add(c, 2, 104 + request, at + 2000, ACK)
    table.add(s, 1, 52 + reply, at + 3000, ACK)
    if reset:
        table.add(s, 1, 40, at + 4000, RST)
        return
    table.add(c, 1, 52, at + 4000, FIN | ACK)
    table.add(s, 1, 52, at + 5000, FIN | ACK)
    table.add(c, 1, 52, at + 6000, ACK)


def test_a_closed_connection_is_one_record_once_the_last_ack_landed():
    t, table, clock, out = tracker()
    tcp_connection(table, clock.now)
    t.read()
    assert out == []  # closing, but the first read: wait for a read without change
    clock.now += S
    t.read()
    [r] = out
    assert (r.source, r.source_port, r.destination, r.destination_port) == (WEB, 40000, DB, 5432)
    assert (r.packets, r.bytes, r.reply_packets, r.reply_bytes) == (5, 60 + 1104 + 52 + 52, 3, 60 + 352 + 52)
    assert r.final and r.end_reason == "fin" and r.observer == "source" and r.transport == "tcp"
    assert r.tcp_flags == FIN | SYN | ACK
    assert abs((r.end - r.start) * 1e9 - 6000) < 500  # seconds since 1970 as a float: ~240 ns steps
    assert table.entries == {}  # deleted from the kernel after the end


def test_a_reset_is_the_end_and_late_packets_are_not_a_new_flow():
    t, table, clock, out = tracker()
    tcp_connection(table, clock.now, reset=True)
    t.read()
    clock.now += S
    t.read()
    assert [r.end_reason for r in out] == ["rst"] and out[0].tcp_flags & RST
    table.add(fid(WEB, 40000, DB, 5432), 1, 40, clock.now, RST)  # after the close
    clock.now += S
    t.read()
    clock.now += 10 * S
    t.read()
    assert len(out) == 1 and t.late_packets == 1
    tcp_connection(table, clock.now)  # the same ports again, with a SYN: a new connection
    t.read()
    clock.now += S
    t.read()
    assert len(out) == 2 and out[1].flow_id != out[0].flow_id


def test_one_observation_point_per_flow():
    """From an outside client to a pod: the request is kept where the pod received it,
    the reply where the pod sent it; the uplink's copies are not counted again."""
    t, table, clock, out = tracker()
    table.add(fid(OUT, 5555, WEB, 443, point=UPLINK_IN), 1, 60, clock.now, SYN)
    table.add(fid(OUT, 5555, WEB, 443, point=POD_RECEIVED), 1, 60, clock.now, SYN)
    table.add(fid(WEB, 443, OUT, 5555, point=POD_SENT), 1, 60, clock.now + 10, SYN | ACK)
    # Pod to pod: the receiving pod's copy is left to the sender's interface.
    table.add(fid(WEB, 1000, DB, 53, point=POD_RECEIVED, proto=17), 1, 80, clock.now)
    table.add(fid(WEB, 1000, DB, 53, point=POD_SENT, proto=17), 1, 80, clock.now)
    t.read()
    clock.now += 6 * S
    t.read()
    by_port = {r.destination_port: r for r in out}
    assert set(by_port) == {443, 53}
    inbound = by_port[443]
    assert (inbound.source, inbound.packets, inbound.reply_packets) == (OUT, 1, 1)
    assert inbound.observer == "destination" and inbound.end_reason == "idle"
    udp = by_port[53]
    assert (udp.transport, udp.packets, udp.bytes, udp.observer) == ("udp", 1, 80, "source")


def test_a_long_flow_is_reported_per_interval_with_what_each_window_added():
    t, table, clock, out = tracker()
    key = fid(WEB, 7000, DB, 7000, proto=17)
    for i in range(30):
        table.add(key, 1, 100, clock.now)
        t.read()
        clock.now += S
    assert [(r.window, r.packets, r.final) for r in out] == [(0, 21, False)]  # the read 20 s after the first one
    clock.now += 6 * S
    t.read()
    assert [(r.window, r.packets, r.bytes, r.final) for r in out] == [(0, 21, 2100, False), (1, 9, 900, True)]
    assert out[0].flow_id == out[1].flow_id and out[1].start == pytest.approx(out[0].end, abs=1e-3)


def test_packets_that_found_the_table_full_are_reaggregated_from_the_ring_buffer():
    t, table, clock, out = tracker()
    key = fid(WEB, 9000, DB, 9000, proto=17)
    table.add(key, 2, 200, clock.now)  # in the table
    for i in range(3):  # and three more packets through the ring buffer
        table.ring.append(FlowEvent(FlowId.from_buffer_copy(bytes(key)),
                                    FlowStats(packets=1, bytes=50, first_ns=clock.now + i, last_ns=clock.now + i)))
    table.lost_counts = (7, 700, 2)
    t.read()
    clock.now += 6 * S
    t.read()
    [r] = out
    assert (r.packets, r.bytes) == (5, 350)
    assert t.ring_records == 3 and t.lost() == (7, 2)


CLUSTER_IP = "10.96.0.10"


@pytest.mark.parametrize("same_read", [True, False])
def test_a_service_connection_to_a_local_backend_is_one_record(same_read):
    """WEB -> the ClusterIP, DNATed to DB on this node: the kernel keeps the request at
    WEB's interface (before DNAT) and the replies at DB's (after reverse NAT they come
    from a pod interface, flows.inc). The two halves are one record, named by the Service."""
    t, table, clock, out = tracker(services=(CLUSTER_IP,))
    c, s = fid(WEB, 40000, CLUSTER_IP, 80), fid(DB, 8080, WEB, 40000)
    table.add(c, 1, 60, clock.now, SYN)
    if not same_read:
        t.read()  # the request alone first
    table.add(s, 1, 60, clock.now + 1000, SYN | ACK)
    table.add(c, 2, 204, clock.now + 2000, ACK)
    table.add(s, 1, 352, clock.now + 3000, ACK)
    table.add(c, 1, 52, clock.now + 4000, FIN | ACK)
    table.add(s, 1, 52, clock.now + 5000, FIN | ACK)
    table.add(c, 1, 52, clock.now + 6000, ACK)
    t.read()
    clock.now += S
    t.read()
    [r] = out
    assert (r.source, r.source_port, r.destination, r.destination_port) == (WEB, 40000, CLUSTER_IP, 80)
    assert (r.packets, r.bytes, r.reply_packets, r.reply_bytes) == (5, 368, 3, 464)
    assert r.end_reason == "fin" and r.observer == "source"
    assert table.entries == {}  # both halves deleted from the kernel
    # The pairing ends with the flow: the same ports later, without a Service flow, stand alone.
    clock.now += 10 * S
    t.read()
    table.add(fid(DB, 8080, WEB, 40000, proto=17), 1, 30, clock.now)
    t.read()
    clock.now += 6 * S
    t.read()
    assert len(out) == 2 and out[1].source == DB


def test_a_service_connection_from_the_port_of_a_closed_direct_one_to_its_backend_gets_its_answer():
    """WEB talks to DB:8080 directly and through the ClusterIP. A Service connection from the
    port of a direct one that just closed has, after DNAT, the closed flow's reply tuple: the
    backend's SYN-ACK on it is the new connection's answer, not a late packet of the old one."""
    t, table, clock, out = tracker(services=(CLUSTER_IP,), connectTimeout=3.0)
    direct, reply = fid(WEB, 40031, DB, 8080), fid(DB, 8080, WEB, 40031)
    for key, flags, at in ((direct, SYN, 0), (reply, SYN | ACK, 1), (direct, ACK, 2),
                           (direct, FIN | ACK, 3), (reply, FIN | ACK, 4), (direct, ACK, 5)):
        table.add(key, 1, 60, clock.now + at * 1000, flags)
    t.read()
    clock.now += S
    t.read()
    assert [(r.destination, r.end_reason) for r in out] == [(DB, "fin")]
    service = fid(WEB, 40031, CLUSTER_IP, 80)
    table.add(service, 1, 60, clock.now, SYN)
    table.add(reply, 1, 60, clock.now + 1000, SYN | ACK)
    table.add(service, 1, 52, clock.now + 2000, ACK)
    clock.now += S
    t.read()
    assert outcomes(t) == [(WEB, 40031, CLUSTER_IP, 80, "established")]
    assert t.late_packets == 0


def test_replies_to_a_client_without_a_service_flow_are_a_flow_of_their_own():
    t, table, clock, out = tracker(services=(CLUSTER_IP,))
    table.add(fid(WEB, 40000, "10.96.0.99", 80), 1, 60, clock.now)  # not a Service
    table.add(fid(DB, 8080, WEB, 40000), 1, 60, clock.now + 10)
    t.read()
    clock.now += 6 * S
    t.read()
    assert len(out) == 2


def test_a_packet_sent_to_a_pod_after_coming_from_a_pod_interface_is_kept_where_it_was_sent():
    """A Service reply after reverse NAT (source: the ClusterIP) reaches the client pod's
    interface from the backend's: its flow record is the backend's; from the uplink it is kept."""
    from agent.flows import Key, keep_point

    pods, ifaces = {"10.1.1.2", "10.1.1.3"}, {7, 8}
    reply = Key(4, 6, POD_RECEIVED, "10.96.0.10", 80, "10.1.1.2", 40000, ifindex=7, came_in=8)
    assert not keep_point(reply, pods, ifaces)
    assert keep_point(Key(4, 6, POD_RECEIVED, "10.96.0.10", 80, "10.1.1.2", 40000, ifindex=7, came_in=2),
                      pods, ifaces)


# -- connection outcomes (the service map) ----------------------------------------------

def outcomes(t) -> list[tuple[str, int, str, int, str]]:
    return [(k.src, k.sport, k.dst, k.dport, result) for k, result in t.outcomes]


def test_an_answered_connection_is_established_once_and_its_record_says_so():
    t, table, clock, out = tracker(connectTimeout=3.0)
    tcp_connection(table, clock.now)
    t.read()
    assert outcomes(t) == [(WEB, 40000, DB, 5432, "established")]
    clock.now += S
    t.read()
    assert outcomes(t) == []  # decided once
    [r] = out
    assert r.connection == "established"


def test_a_reset_answering_the_syn_is_refused():
    t, table, clock, out = tracker(connectTimeout=3.0)
    table.add(fid(WEB, 40001, DB, 5433), 1, 60, clock.now, SYN)
    table.add(fid(DB, 5433, WEB, 40001), 1, 40, clock.now + 1000, RST | ACK)
    t.read()
    assert outcomes(t) == [(WEB, 40001, DB, 5433, "refused")]
    clock.now += S
    t.read()
    assert [(r.end_reason, r.connection) for r in out] == [("rst", "refused")]


@pytest.mark.parametrize("reply_later", [False, True])
def test_a_port_used_again_after_a_refused_attempt_is_a_new_attempt_with_its_own_answer(reply_later):
    """A client connecting from the same port again while the ended attempt is still
    remembered as closed: the new SYN opens a new attempt, and the server's answer to it
    (read with it or a read later) is that attempt's, not a late packet of the closed one."""
    t, table, clock, out = tracker(connectTimeout=3.0)
    c, s = fid(WEB, 40010, DB, 5433), fid(DB, 5433, WEB, 40010)
    decided = []
    for attempt in range(3):
        table.add(c, 1, 60, clock.now, SYN)
        if reply_later:
            t.read()
            decided += outcomes(t)
            clock.now += S // 2
        table.add(s, 1, 40, clock.now, RST | ACK)
        t.read()
        decided += outcomes(t)
        clock.now += S
        t.read()  # unchanged: the attempt ends on its reset
        decided += outcomes(t)
        clock.now += S  # well within idleTimeout (5 s), while the closed tuple is remembered
    assert decided == [(WEB, 40010, DB, 5433, "refused")] * 3
    assert [(r.end_reason, r.connection, r.packets, r.reply_packets) for r in out] == [("rst", "refused", 1, 1)] * 3
    assert len({r.flow_id for r in out}) == 3 and t.late_packets == 0 and table.entries == {}


def test_an_icmp_rejection_answering_the_syn_is_refused():
    """The kernel keeps an ICMP error that rejects a connection under the reverse of the
    tuple it quotes (flows.inc): the attempt's answer, as a reset would be."""
    t, table, clock, out = tracker(connectTimeout=3.0)
    table.add(fid(WEB, 40011, DB, 5434), 1, 60, clock.now, SYN)
    table.add(fid(DB, 5434, WEB, 40011), 1, 88, clock.now + 1000, REJECTED)  # a REJECT rule in db
    t.read()
    assert outcomes(t) == [(WEB, 40011, DB, 5434, "refused")]
    clock.now += 10 * S  # ends idle: nothing closes it, and it is not decided again
    t.read()
    assert outcomes(t) == [] and [(r.connection, r.reply_packets) for r in out] == [("refused", 1)]


def test_a_reset_after_the_handshake_is_an_established_connection():
    t, table, clock, out = tracker(connectTimeout=3.0)
    tcp_connection(table, clock.now, reset=True)
    t.read()
    assert [r for *_, r in outcomes(t)] == ["established"]


def test_an_answer_whose_syn_ack_the_kernel_could_not_keep_is_established():
    """The SYN-ACK found the table and ring buffer full (counted lost); the server's later
    packets were kept: it answered."""
    t, table, clock, out = tracker(connectTimeout=3.0)
    table.add(fid(WEB, 40010, DB, 5432), 2, 120, clock.now, SYN)
    table.add(fid(DB, 5432, WEB, 40010), 1, 352, clock.now + 3000, ACK)
    t.read()
    assert [r for *_, r in outcomes(t)] == ["established"]


def test_a_retransmitted_syn_is_the_same_attempt():
    """The first SYN lost, the retransmit answered within connectTimeout: one attempt, established."""
    t, table, clock, out = tracker(connectTimeout=3.0)
    c = fid(WEB, 40002, DB, 5432)
    table.add(c, 1, 60, clock.now, SYN)
    t.read()
    assert outcomes(t) == []  # no answer yet, time left
    clock.now += S
    table.add(c, 1, 60, clock.now, SYN)  # the retransmit, a second later
    table.add(fid(DB, 5432, WEB, 40002), 1, 60, clock.now + 1000, SYN | ACK)
    t.read()
    assert outcomes(t) == [(WEB, 40002, DB, 5432, "established")]
    clock.now += 10 * S
    t.read()
    [r] = out
    assert r.connection == "established" and r.packets == 2


def test_an_unanswered_syn_is_a_timeout_reported_at_once_and_counted_once():
    t, table, clock, out = tracker(connectTimeout=3.0, idleTimeout=5.0)
    c = fid(WEB, 40003, DB, 5432)
    start = clock.now
    seen = []
    for retransmit in (0, 1, 3):  # the kernel's SYN retransmits
        clock.now = start + retransmit * S
        table.add(c, 1, 60, clock.now, SYN)
        t.read()
        seen += outcomes(t)
    assert seen == [] and out == []  # 3 s after the first SYN, not more: undecided
    clock.now = start + 3 * S + 1
    t.read()
    assert outcomes(t) == [(WEB, 40003, DB, 5432, "timeout")]
    [r] = out  # at once, not when the flow ends
    assert (r.final, r.connection, r.packets, r.reply_packets) == (False, "timeout", 3, 0)
    clock.now = start + 9 * S  # idle: 6 s since the last SYN
    t.read()
    assert outcomes(t) == [] and [(r.final, r.end_reason, r.connection) for r in out[1:]] == [(True, "idle", "timeout")]


def test_a_late_answer_is_a_timeout_whenever_the_read_comes():
    """Decided on the kernel's times: the SYN-ACK came 4 s after the first SYN, past
    connectTimeout (3 s), though no read happened in between."""
    t, table, clock, out = tracker(connectTimeout=3.0)
    table.add(fid(WEB, 40004, DB, 5432), 1, 60, clock.now, SYN)
    table.add(fid(DB, 5432, WEB, 40004), 1, 60, clock.now + 4 * S, SYN | ACK)
    clock.now += 4 * S + 1
    t.read()
    assert [r for *_, r in outcomes(t)] == ["timeout"]
    table.add(fid(WEB, 40004, DB, 5432), 5, 500, clock.now, ACK)  # the connection goes on
    clock.now += S
    t.read()
    assert outcomes(t) == []  # never counted again as established


def test_an_answer_in_time_read_late_is_established():
    t, table, clock, out = tracker(connectTimeout=3.0)
    table.add(fid(WEB, 40005, DB, 5432), 1, 60, clock.now, SYN)
    table.add(fid(DB, 5432, WEB, 40005), 1, 60, clock.now + 2 * S, SYN | ACK)
    clock.now += 10 * S  # the first read long after
    t.read()
    assert [r for *_, r in outcomes(t)] == ["established"]


def test_a_flow_that_ends_unanswered_before_the_timeout_is_a_timeout():
    """idleTimeout shorter than connectTimeout, and the client gave up: never answered."""
    t, table, clock, out = tracker(connectTimeout=20.0, idleTimeout=2.0)
    table.add(fid(WEB, 40006, DB, 5432), 1, 60, clock.now, SYN)
    t.read()
    clock.now += 3 * S
    t.read()
    assert [r for *_, r in outcomes(t)] == ["timeout"]
    assert [(r.end_reason, r.connection) for r in out] == [("idle", "timeout")]


def test_a_syn_retransmitted_after_the_flow_ended_idle_is_not_a_new_attempt():
    """The kernel's SYN retransmits grow apart (1, 2, 4... up to 120 s): one may come after
    the unanswered flow ended. Its record says timeout; the attempt is not counted again."""
    t, table, clock, out = tracker(connectTimeout=3.0, idleTimeout=5.0)
    c = fid(WEB, 40007, DB, 5432)
    table.add(c, 1, 60, clock.now, SYN)
    t.read()
    clock.now += 4 * S
    t.read()
    first = outcomes(t)
    clock.now += 2 * S
    t.read()  # idle: ended, deleted from the kernel
    assert [r for *_, r in first] == ["timeout"] and out[-1].final and table.entries == {}
    clock.now += 30 * S
    table.add(c, 1, 60, clock.now, SYN)  # the next retransmit
    table.add(fid(DB, 5432, WEB, 40007), 1, 60, clock.now + 1000, SYN | ACK)  # answered, too late
    t.read()
    assert outcomes(t) == []
    clock.now += 10 * S
    t.read()
    assert out[-1].connection == "timeout" and out[-1].flow_id != out[0].flow_id
    # Past the longest retransmit gap, the same ports are a new attempt.
    clock.now += 200 * S
    table.add(c, 1, 60, clock.now, SYN)
    table.add(fid(DB, 5432, WEB, 40007), 1, 60, clock.now + 1000, SYN | ACK)
    t.read()
    assert [r for *_, r in outcomes(t)] == ["established"]


def test_a_new_attempt_from_the_port_of_an_unanswered_one_is_counted_again():
    """The client gave up and connects again from the same port while the timed-out flow
    is live: its SYN has another sequence number, a retransmit repeats it (on any CPU).
    Each attempt is its own flow and outcome; every packet is counted once."""
    t, table, clock, out = tracker(connectTimeout=3.0, idleTimeout=30.0)
    c = fid(WEB, 40012, DB, 5432)
    decided, counted = [], 0

    def read():
        nonlocal counted
        counted += sum(p for p, _ in t.read().values())
        decided.extend(r for *_, r in outcomes(t))

    table.add(c, 1, 60, clock.now, SYN, seq=7000)
    read()
    clock.now += S
    table.add(c, 1, 60, clock.now, SYN, cpu=1, seq=7000)  # its retransmit
    read()
    clock.now += 3 * S
    read()
    assert decided == ["timeout"]
    clock.now += S
    table.add(c, 1, 60, clock.now, SYN, seq=9001)  # a new attempt, the same 5-tuple
    read()
    first = [r for r in out if r.flow_id == out[0].flow_id]
    assert [(r.final, r.end_reason, r.packets) for r in first] == [(False, "interval", 2), (True, "reused", 0)]
    clock.now += S
    table.add(c, 1, 60, clock.now, SYN, cpu=1, seq=9001)  # the new attempt's retransmit
    read()
    assert decided == ["timeout"]  # its own connectTimeout has not passed
    clock.now += 3 * S
    read()
    assert decided == ["timeout", "timeout"]
    clock.now += 60 * S
    read()
    second = [r for r in out if r.flow_id != out[0].flow_id]
    assert sum(r.packets for r in second) == 2 and second[-1].final and second[-1].connection == "timeout"
    assert counted == 4 and table.entries == {} and t.late_packets == 0


def test_a_new_attempt_within_the_first_ones_connect_timeout_decides_it():
    """A client that gives up well before connectTimeout (0.2 s) and connects again from
    the same port: the first attempt is a timeout then (never answered); the second is
    answered and established."""
    t, table, clock, out = tracker(connectTimeout=3.0, idleTimeout=30.0)
    c, s = fid(WEB, 40013, DB, 5432), fid(DB, 5432, WEB, 40013)
    table.add(c, 1, 60, clock.now, SYN, seq=1)
    t.read()
    assert outcomes(t) == []
    clock.now += S // 2
    table.add(c, 1, 60, clock.now, SYN, seq=2)
    table.add(s, 1, 60, clock.now + 1000, SYN | ACK)
    t.read()
    assert [r for *_, r in outcomes(t)] == ["timeout", "established"]
    assert [(r.end_reason, r.connection, r.packets) for r in out] == [("reused", "timeout", 1)]


def test_a_new_attempt_after_the_unanswered_flow_ended_is_counted_again():
    """As a retransmit after the flow ended idle is not (test above), by its sequence number."""
    t, table, clock, out = tracker(connectTimeout=3.0, idleTimeout=5.0)
    c = fid(WEB, 40014, DB, 5432)
    table.add(c, 1, 60, clock.now, SYN, seq=11)
    t.read()
    clock.now += 4 * S
    t.read()
    clock.now += 2 * S
    t.read()  # idle: ended
    assert [(r.final, r.connection) for r in out][-1] == (True, "timeout") and table.entries == {}
    clock.now += 10 * S
    table.add(c, 1, 60, clock.now, SYN, seq=12)
    table.add(fid(DB, 5432, WEB, 40014), 1, 40, clock.now + 1000, RST | ACK)
    t.read()
    assert [r for *_, r in outcomes(t)] == ["refused"]


@pytest.mark.parametrize("services", [(), (CLUSTER_IP,)])
def test_a_connection_that_began_during_the_read_waits_for_its_syn(services):
    """A map read misses keys the kernel inserts behind it: a connection that began while the
    table was read can show its answer without its SYN. It is made at the next read, opened by
    the SYN and decided, a Service connection with its backend's answer joined."""
    t, table, clock, out = tracker(services=services, connectTimeout=3.0)
    server = CLUSTER_IP if services else DB
    syn, answer = fid(WEB, 40020, server, 5432), fid(DB, 5432, WEB, 40020)
    table.add(answer, 1, 60, clock.now + 2000, SYN | ACK)  # this read passed the SYN's key already
    t.read()
    assert outcomes(t) == [] and out == []
    table.add(syn, 1, 60, clock.now + 1000, SYN)
    clock.now += S
    t.read()
    assert outcomes(t) == [(WEB, 40020, server, 5432, "established")]
    clock.now += 10 * S
    t.read()
    [r] = out
    assert (r.source, r.source_port, r.destination, r.connection) == (WEB, 40020, server, "established")
    assert (r.packets, r.reply_packets) == (1, 1)


def test_no_outcome_without_an_opening_syn():
    """UDP, and a TCP connection already open when the agent started (no SYN seen)."""
    t, table, clock, out = tracker(connectTimeout=1.0)
    table.add(fid(WEB, 5000, DB, 53, proto=17), 1, 80, clock.now)
    table.add(fid(WEB, 40008, DB, 5432), 3, 300, clock.now, ACK)
    table.add(fid(DB, 5432, WEB, 40008), 3, 300, clock.now, ACK)
    t.read()
    clock.now += 10 * S
    t.read()
    assert outcomes(t) == [] and len(out) == 2 and {r.connection for r in out} == {""}


def test_a_service_connection_is_decided_on_the_backends_answer_and_named_by_the_clusterip():
    t, table, clock, out = tracker(services=(CLUSTER_IP,), connectTimeout=3.0)
    table.add(fid(WEB, 40009, CLUSTER_IP, 80), 1, 60, clock.now, SYN)
    t.read()
    table.add(fid(DB, 8080, WEB, 40009), 1, 40, clock.now + 1000, RST | ACK)  # the backend refuses
    t.read()
    assert outcomes(t) == [(WEB, 40009, CLUSTER_IP, 80, "refused")]
    assert t.outcomes[0][0].point == POD_SENT
