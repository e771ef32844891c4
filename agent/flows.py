"""Flows: the kernel flow table (bpf/flows.inc) read into FlowRecords.

The tc programs keep one entry per (5-tuple, observation point). Every
interval, a FlowTracker reads the table, adds the ring-buffer records of
packets that found it full (re-aggregated here), keeps one observation point
per packet (DESIGN.md: the sending pod's interface when the sender is local,
else the receiving pod's, else the uplink), joins the two directions of a flow
and decides what ends:

- a TCP flow that saw RST, or FIN both ways, ends once a read finds it
  unchanged (the last ACK of the close lands first);
- any flow ends after `idleTimeout` seconds without a packet;
- a flow still running is reported every `reportInterval` seconds.

Address translation never makes two flows of one connection (DESIGN.md): the
uplink's program skips what a pod interface kept and keep_point drops what
came to a pod from another pod interface (bpf/flows.inc), and a
connection to a Service whose backend is a local pod is seen as two halves,
the client's request to the ClusterIP (before DNAT) and the backend's replies
(kept where the backend sent them). The tracker pairs them: a new flow that
only carries replies to a client end (address, port) which has a live flow to
a ClusterIP joins that flow, so the connection is one record, named by the
Service, with the backend's replies as its reply counts.

Only the entries of ended flows are deleted from the kernel, with
lookup-and-delete, so whatever arrived until the delete is in the record.

A TCP flow whose opening SYN the table kept is a connection attempt, and its
outcome is decided once (connection_outcome): established, refused or
timeout. Each read hands the outcomes it decided to the caller (`outcomes`),
with the opener's key, for the service map (agent/plugins/pods.py); the flow's
records carry it.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

from agent.addresses import ip_packed, ip_text
from agent.events import FlowRecord

log = logging.getLogger(__name__)

POD_SENT, POD_RECEIVED, UPLINK_IN, UPLINK_OUT = range(4)  # observation points, as in flows.inc
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
SYN_ONLY = 0x100
REJECTED = 0x200  # an ICMP error rejecting the connection, kept by the kernel as its answer (flows.inc)
L4_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
POD_ADDRESSES = 16384  # local pod addresses the kernel knows (flow_pod_addrs)
NAT_REPLIES = 65536  # reply tuples of masqueraded pod flows the uplink programs remember (an LRU)
MAX_RING_FLOWS = 65536  # flows re-aggregated here from ring-buffer records; past it they are counted lost
ESTABLISHED, REFUSED, TIMEOUT = "established", "refused", "timeout"  # connection outcomes
# The longest a client waits between two SYNs of one attempt (the kernel's TCP_RTO_MAX): a
# flow that ended unanswered is remembered that long, so a retransmit after it is no new attempt.
SYN_RETRY_GAP_NS = 120 * 1_000_000_000
MAX_UNANSWERED = 65536  # unanswered attempts remembered; past it, a late retransmit counts again


class FlowId(ct.Structure):
    _fields_ = [("family", ct.c_uint8), ("l4proto", ct.c_uint8), ("point", ct.c_uint8), ("pad", ct.c_uint8),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("saddr", ct.c_uint8 * 16), ("daddr", ct.c_uint8 * 16), ("ifindex", ct.c_uint32),
                ("in_ifindex", ct.c_uint32)]


class FlowStats(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("first_ns", ct.c_uint64),
                ("last_ns", ct.c_uint64), ("ifindex", ct.c_uint32), ("flags", ct.c_uint16), ("syn_tag", ct.c_uint16)]


class FlowEvent(ct.Structure):
    _fields_ = [("id", FlowId), ("stats", FlowStats)]


class FlowLost(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("syns", ct.c_uint64)]


@dataclass
class Stats:
    """Cumulative counts of one kernel key (one direction at one point)."""

    packets: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    flags: int = 0
    ifindex: int = 0
    syn_tag: int = 0  # of the latest SYN without ACK (flows.inc): a retransmit repeats it
    syn_ns: int = 0  # about when that SYN came

    def merge(self, s) -> None:
        """Add a kernel slot (one CPU's, or a ring-buffer record) or another Stats."""
        self.packets += s.packets
        self.bytes += s.bytes
        if s.first_ns and (not self.first_ns or s.first_ns < self.first_ns):
            self.first_ns = s.first_ns
        if s.last_ns > self.last_ns:
            self.last_ns = s.last_ns
            self.ifindex = s.ifindex or self.ifindex
        syn_ns = s.syn_ns if isinstance(s, Stats) else s.last_ns  # a slot's last SYN: its last packet or before
        if s.flags & SYN_ONLY and syn_ns >= self.syn_ns:
            self.syn_tag, self.syn_ns = s.syn_tag, syn_ns
        self.flags |= s.flags


def merge_percpu(leaf) -> Stats:
    out = Stats()
    for s in leaf:
        if s.packets:
            out.merge(s)
    return out


@dataclass(frozen=True)
class Key:
    """A kernel key, decoded: one direction of a flow at one point."""

    family: int
    l4proto: int
    point: int
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int = 0  # the interface it was seen at
    came_in: int = 0  # at a pod's egress: the interface it came in through (0: the node's own)

    @classmethod
    def decode(cls, k) -> "Key":
        return cls(k.family, k.l4proto, k.point, ip_text(k.family, bytes(k.saddr)), k.sport,
                   ip_text(k.family, bytes(k.daddr)), k.dport, k.ifindex, k.in_ifindex)

    @property
    def flow(self) -> tuple:
        """The same for both directions of a flow."""
        a, b = (self.src, self.sport), (self.dst, self.dport)
        return (self.family, self.l4proto, min(a, b), max(a, b))



@dataclass
class Flow:
    id: int
    source: tuple[str, int]
    destination: tuple[str, int]
    key: Key  # the opener's key (protocol, family)
    keys: dict[bytes, Key] = field(default_factory=dict)  # raw kernel key -> decoded
    totals: dict[bytes, Stats] = field(default_factory=dict)  # cumulative per raw key
    reported: tuple[int, int, int, int] = (0, 0, 0, 0)  # fwd packets, bytes, reverse packets, bytes
    window: int = 0
    window_start_ns: int = 0  # first packet of the window being counted
    window_opened_ns: int = 0  # when this window began (monotonic), for report intervals
    last_seen: tuple = ()  # totals at the previous read: closing flows end once unchanged
    joined: tuple = ()  # flow keys of the halves joined to this one (a Service's backend replies)
    client: tuple = ()  # (family, l4proto, address, port) of a Service connection's client
    outcome: str | None = ""  # connection_outcome once decided; None: a TCP attempt, undecided; "": none

    def forward(self, key: Key) -> bool:
        return (key.src, key.sport) == self.source

    def counts(self) -> tuple[int, int, int, int]:
        fp = fb = rp = rb = 0
        for raw, s in self.totals.items():
            if self.forward(self.keys[raw]):
                fp, fb = fp + s.packets, fb + s.bytes
            else:
                rp, rb = rp + s.packets, rb + s.bytes
        return fp, fb, rp, rb

    def flags(self, forward: bool | None = None) -> int:
        out = 0
        for raw, s in self.totals.items():
            if forward is None or self.forward(self.keys[raw]) == forward:
                out |= s.flags
        return out

    @property
    def first_ns(self) -> int:
        return min((s.first_ns for s in self.totals.values() if s.first_ns), default=0)

    @property
    def last_ns(self) -> int:
        return max((s.last_ns for s in self.totals.values()), default=0)

    @property
    def observer(self) -> str:
        """`source` when the node holds the opening end: it saw that end send
        (pod interface or uplink egress) or receive the replies."""
        for raw, key in self.keys.items():
            if local_sender(key) == self.forward(key):
                return "source"
        return "destination"

    def answered(self) -> bool:
        return any(not self.forward(self.keys[raw]) and s.packets for raw, s in self.totals.items())

    def closing(self) -> str | None:
        if self.key.l4proto != 6:
            return None
        if self.flags() & RST:
            return "rst"
        if self.flags(True) & FIN and self.flags(False) & FIN:
            return "fin"
        return None


def connection_outcome(flow: Flow, now_ns: int, timeout_ns: int, ended: bool = False) -> str | None:
    """The outcome of a TCP connection attempt (DESIGN.md, service map), from the flags each
    direction OR'ed and the time of its first packet: `refused` when the other end answered
    the SYN with a RST (or a firewall with an ICMP rejection) and no SYN-ACK, `established` when it answered otherwise (a SYN-ACK;
    or later packets, when the SYN-ACK found the flow table and ring buffer full), `timeout`
    when no answer came within `timeout_ns` of the first SYN. A retransmitted SYN is the same
    key, so the same attempt; an answer that came later is a timeout still, decided from the
    kernel's times whenever the read happens. None while unanswered and within the timeout,
    unless the flow ended (then `timeout`: it was never answered)."""
    syn_ns = min((s.first_ns for raw, s in flow.totals.items()
                  if s.flags & SYN_ONLY and s.first_ns and flow.forward(flow.keys[raw])), default=0)
    answer_ns = flags = 0
    for raw, s in flow.totals.items():
        if s.packets and s.first_ns and not flow.forward(flow.keys[raw]):
            answer_ns = min(answer_ns or s.first_ns, s.first_ns)
            flags |= s.flags
    if answer_ns and answer_ns - syn_ns <= timeout_ns:
        return REFUSED if flags & (RST | REJECTED) and not flags & SYN else ESTABLISHED
    if answer_ns or ended or now_ns - syn_ns > timeout_ns:
        return TIMEOUT
    return None


def keep_point(key: Key, pod_addresses: frozenset[str] | set[str], pod_interfaces=()) -> bool:
    """One observation point per packet (DESIGN.md counting rules); the uplink's
    program applies the same rules first (flows.inc)."""
    if key.point == POD_SENT:
        return True
    if key.point == POD_RECEIVED:  # else: kept where that pod sent it (a Service reply after reverse NAT too)
        return key.src not in pod_addresses and key.came_in not in pod_interfaces
    if key.point == UPLINK_IN:
        return key.dst not in pod_addresses
    return key.src not in pod_addresses


def local_sender(key: Key) -> bool:
    return key.point in (POD_SENT, UPLINK_OUT)


class KernelFlowTable:
    """The maps of one program's flow table, behind the few calls the tracker makes
    (tests hand the tracker a fake with the same methods)."""

    def __init__(self, bpf):
        self.bpf = bpf
        self.table = bpf["flows"]
        self.max_entries = self.table.max_entries

    def listen(self, callback: Callable[[FlowEvent], None]) -> None:
        self.bpf["flow_events"].open_ring_buffer(
            lambda _ctx, data, _size: callback(ct.cast(data, ct.POINTER(FlowEvent)).contents))

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def items(self) -> list:
        """[(raw key bytes, per-CPU FlowStats)]"""
        try:
            items = list(self.table.items_lookup_batch())
        except Exception:
            items = list(self.table.items())
        return [(bytes(k), leaf) for k, leaf in items]

    def pop(self, raw: bytes):
        """Lookup-and-delete: the per-CPU FlowStats the key held, or None if it was gone."""
        return self.table.pop(FlowId.from_buffer_copy(raw))

    def set_pod_interfaces(self, add: set[int], remove: set[int]) -> None:
        """The host-side pod interfaces: what came in through one was kept there (flows.inc).
        Only the uplink's program has the table (the pods program's keys say it)."""
        try:
            table = self.bpf["flow_pod_ifaces"]
        except KeyError:
            return
        for ifindex in add:
            try:
                table[ct.c_uint32(ifindex)] = ct.c_uint8(1)
            except Exception as e:  # a full table: that interface's NATed packets are kept twice
                log.debug("flow_pod_ifaces add %d: %s", ifindex, e)
        for ifindex in remove:
            try:
                del table[ct.c_uint32(ifindex)]
            except KeyError:
                pass

    def set_pod_addresses(self, add: set[str], remove: set[str]) -> None:
        """The addresses of local pods, so the kernel keeps each packet at one point only."""
        table = self.bpf["flow_pod_addrs"]
        for address, present in [(a, True) for a in add] + [(a, False) for a in remove]:
            key = table.Key()
            key.family, packed = ip_packed(address)
            ct.memmove(ct.addressof(key.addr), packed, len(packed))
            try:
                if present:
                    table[key] = ct.c_uint8(1)
                else:
                    del table[key]
            except (KeyError, Exception) as e:  # a full table only costs a double count, filtered below
                log.debug("flow_pod_addrs %s %s: %s", "add" if present else "remove", address, e)

    def lost(self) -> tuple[int, int, int]:
        """(packets, bytes, SYNs) the kernel could keep neither in the table nor the ring buffer."""
        counters = self.bpf["flow_lost"][ct.c_int(0)]
        return (sum(c.packets for c in counters), sum(c.bytes for c in counters), sum(c.syns for c in counters))


class FlowTracker:
    """Reads one program's flow table and ring buffer; hands out FlowRecords."""

    def __init__(self, table: KernelFlowTable, cfg, publish: Callable[[FlowRecord], None],
                 attribution, clock: Callable[[], int] = time.monotonic_ns):
        """attribution: pod_addresses, pod_interfaces and service(ip), as agent/attribution.py has them."""
        self.kernel = table
        self.cfg = cfg
        self.publish = publish
        self.attribution = attribution
        self.clock = clock
        self.max_entries = table.max_entries
        self.entries = 0
        self._ring: dict[bytes, tuple[FlowId, Stats]] = {}  # packets that found the table full (or a new attempt's, _new_attempt)
        self._flows: dict[tuple, Flow] = {}
        self._closed: dict[bytes, int] = {}  # raw key of a closed TCP flow -> until (ns): late packets
        self._decoded: dict[bytes, Key] = {}  # raw key -> Key, for the keys in the table now
        self._pods_in_kernel: frozenset[str] = frozenset()
        self._ifaces_in_kernel: set[int] = set()
        self._joined: dict[tuple, tuple] = {}  # flow key of a backend's replies -> the Service flow's key
        self._clients: dict[tuple, tuple] = {}  # client end of a live Service flow -> its flow key
        self._counted: dict[bytes, tuple[int, int]] = {}  # raw key -> (packets, bytes) handed out by read()
        self._increments: dict[Key, list[int]] = {}
        self._unanswered: dict[bytes, tuple[int, int]] = {}  # opener's raw key of an attempt that timed out -> (until (ns), syn_tag)
        self.outcomes: list[tuple[Key, str]] = []  # (opener's key, outcome) of the attempts the last read decided
        self._wall_offset = time.time_ns() - time.monotonic_ns()
        self._ids = itertools.count(random.getrandbits(48) << 8)
        self.ring_records = 0
        self.ring_lost = [0, 0]  # packets, connections the user-space overflow bound refused
        self.late_packets = 0
        self.records = 0
        table.listen(self._on_event)

    # -- input ------------------------------------------------------------------

    def _on_event(self, e: FlowEvent) -> None:
        raw = bytes(e.id)
        self.ring_records += 1
        got = self._ring.get(raw)
        if got is None:
            if len(self._ring) >= MAX_RING_FLOWS:  # memory here is bounded too
                self.ring_lost[0] += e.stats.packets
                self.ring_lost[1] += 1 if e.stats.flags & SYN_ONLY else 0
                return
            got = self._ring[raw] = (FlowId.from_buffer_copy(raw), Stats())
        got[1].merge(e.stats)

    def _snapshot(self) -> dict[bytes, Stats]:
        """Cumulative stats of every key: kernel table plus ring-buffer records."""
        self.kernel.consume()
        items = self.kernel.items()
        self.entries = len(items)
        out = {raw: merge_percpu(leaf) for raw, leaf in items}
        for raw, (_, s) in self._ring.items():
            merged = Stats()
            if raw in out:
                merged.merge(out[raw])
            merged.merge(s)
            out[raw] = merged
        return out

    def lost(self) -> tuple[int, int]:
        """(packets, connections) that neither the table nor the ring buffer could keep."""
        packets, _, syns = self.kernel.lost()
        return packets + self.ring_lost[0], syns + self.ring_lost[1]

    # -- the read ---------------------------------------------------------------

    def _count(self, raw: bytes, stats: Stats, final: bool = False) -> None:
        """What the key gained since the last read, into this read's increments."""
        before = self._counted.pop(raw, (0, 0)) if final else self._counted.get(raw, (0, 0))
        if not final:
            self._counted[raw] = (stats.packets, stats.bytes)
        if (stats.packets, stats.bytes) != before:
            key = self._decoded.get(raw) or Key.decode(FlowId.from_buffer_copy(raw))
            inc = self._increments.setdefault(key, [0, 0])
            inc[0] += stats.packets - before[0]
            inc[1] += stats.bytes - before[1]

    def read(self) -> dict[Key, tuple[int, int]]:
        """Read the table; returns what each key gained since the previous read (packets,
        bytes), every observation point included: the per-interface counters come from it."""
        self._increments = {}
        self.outcomes = []
        now = self.clock()
        self._wall_offset = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        pods = self.attribution.pod_addresses
        if pods != self._pods_in_kernel:
            self.kernel.set_pod_addresses(pods - self._pods_in_kernel, self._pods_in_kernel - pods)
            self._pods_in_kernel = pods
        ifaces = set(self.attribution.pod_interfaces)
        if ifaces != self._ifaces_in_kernel:
            self.kernel.set_pod_interfaces(ifaces - self._ifaces_in_kernel, self._ifaces_in_kernel - ifaces)
            self._ifaces_in_kernel = ifaces
        snapshot = self._snapshot()
        fresh: dict[tuple, list[tuple[bytes, Key, Stats]]] = {}
        decoded = {raw: self._decoded.get(raw) or Key.decode(FlowId.from_buffer_copy(raw)) for raw in snapshot}
        self._decoded = decoded
        for raw, stats in list(snapshot.items()):
            replaced = self._replaced(raw, decoded[raw], stats) if stats.flags & SYN_ONLY and raw in snapshot else None
            if replaced:
                self._new_attempt(replaced, raw, snapshot)
        # A SYN or SYN-ACK on a closed flow's tuple is a new connection (the client used its
        # port again, perhaps to a Service that DNATs to the same backend): its packets, either
        # way, are none of the closed flow's late ones.
        reopened = {decoded[raw].flow for raw, stats in snapshot.items()
                    if stats.flags & SYN and raw in self._closed}
        for raw, stats in snapshot.items():
            key = decoded[raw]
            if raw in self._closed and key.flow not in reopened:
                self.late_packets += self._delete(raw).packets  # after the close: not a new flow
                continue
            if not keep_point(key, pods, ifaces):  # a record of it is kept at another point
                if self._counted.get(raw) == (stats.packets, stats.bytes):
                    self._delete(raw)  # and nothing came since the last read
                else:
                    self._count(raw, stats)
                continue
            self._count(raw, stats)
            flow = self._flows.get(self._joined.get(key.flow, key.flow))
            if flow is not None:
                flow.keys[raw] = key
                flow.totals[raw] = stats
            else:
                fresh.setdefault(key.flow, []).append((raw, key, stats))
        # Service connections first, so that their backends' replies can join them.
        for fkey in sorted(fresh, key=lambda k: not self._client_end(fresh[k])):
            parts = fresh[fkey]
            target = self._flows.get(self._join_target(fkey, parts))
            if target is not None:
                for raw, key, stats in parts:
                    target.keys[raw] = key
                    target.totals[raw] = stats
                continue
            if min(s.first_ns for _, _, s in parts) > now:
                # Every key of it came while the table was read, and a map read misses keys the
                # kernel inserts behind it: the opener's (its SYN) may be missing. The next read has it.
                continue
            flow = self._flows[fkey] = self._new_flow(parts)
            flow.client = self._client_end(parts) or ()
            if flow.client:
                self._clients[flow.client] = fkey
        self._closed = {raw: until for raw, until in self._closed.items() if until > now}
        self._unanswered = {raw: v for raw, v in self._unanswered.items() if v[0] > now}

        for fkey, flow in list(self._flows.items()):
            counts = flow.counts()
            # A timeout is reported at once: the flow may go on retransmitting SYNs for minutes.
            timed_out = flow.outcome is None and self._decide(flow, now) == TIMEOUT
            idle = now - flow.last_ns > self.cfg.idleTimeout * 1e9
            closing = flow.closing()
            if closing and counts == flow.last_seen:
                self._end(fkey, flow, closing)
            elif idle:
                self._end(fkey, flow, "idle")
            elif (timed_out or now - flow.window_opened_ns >= self.cfg.reportInterval * 1e9) \
                    and counts != flow.reported:
                self._report(flow, final=False, reason="interval")
                flow.window_opened_ns = now
            flow.last_seen = counts
        return {key: (p, b) for key, (p, b) in self._increments.items()}

    def _new_flow(self, parts: list[tuple[bytes, Key, Stats]]) -> Flow:
        """Who opened it: the direction that sent a SYN without ACK, else the first packet."""
        opener = next((p for p in parts if p[2].flags & SYN_ONLY), None)
        opener = opener or min(parts, key=lambda p: p[2].first_ns or 1 << 63)
        oraw, okey, ostats = opener
        flow = Flow(next(self._ids), (okey.src, okey.sport), (okey.dst, okey.dport), okey)
        if okey.l4proto == 6 and ostats.flags & SYN_ONLY:
            # A SYN after an unanswered attempt's flow ended: that attempt's retransmit (the same
            # sequence number), counted already; another number is a new attempt from the same port.
            until, tag = self._unanswered.pop(oraw, (0, 0))
            flow.outcome = TIMEOUT if until > self.clock() and tag == ostats.syn_tag else None
        for raw, key, stats in parts:
            flow.keys[raw] = key
            flow.totals[raw] = stats
        flow.window_start_ns = flow.first_ns
        flow.window_opened_ns = self.clock()
        return flow

    def _replaced(self, raw: bytes, key: Key, stats: Stats) -> tuple | None:
        """The live flow whose unanswered attempt this SYN replaces: its sequence number is
        not the attempt's (a retransmit repeats it), so the client gave up and connects
        again from the same port."""
        fkey = self._joined.get(key.flow, key.flow)
        flow = self._flows.get(fkey)
        before = flow.totals.get(raw) if flow is not None else None
        if before is None or flow.key.l4proto != 6 or not before.flags & SYN_ONLY or flow.answered():
            return None
        return fkey if stats.syn_tag != before.syn_tag else None

    def _new_attempt(self, fkey: tuple, raw: bytes, snapshot: dict[bytes, Stats]) -> None:
        """End the replaced attempt with what it had at the last read; what came since is the
        new attempt's, held here as ring-buffer records are while the kernel counts on from 0."""
        flow = self._flows[fkey]
        before = flow.totals[raw]
        now = self._delete(raw)  # into this read's increments, once
        new = Stats(packets=max(0, now.packets - before.packets), bytes=max(0, now.bytes - before.bytes),
                    first_ns=now.syn_ns, last_ns=now.last_ns, flags=now.flags, ifindex=now.ifindex,
                    syn_tag=now.syn_tag, syn_ns=now.syn_ns)
        for other in flow.keys:  # ended with it: read and counted
            snapshot.pop(other, None)
        self._end(fkey, flow, "reused")
        self._ring[raw] = (FlowId.from_buffer_copy(raw), new)
        self._counted[raw] = (new.packets, new.bytes)
        snapshot[raw] = new

    def _client_end(self, parts) -> tuple | None:
        """(family, l4proto, address, port) of the client of a connection to a ClusterIP."""
        key = parts[0][1]
        for (addr, port), other in (((key.src, key.sport), key.dst), ((key.dst, key.dport), key.src)):
            if self.attribution.service(other) is not None and self.attribution.service(addr) is None:
                return (key.family, key.l4proto, addr, port)
        return None

    def _join_target(self, fkey: tuple, parts) -> tuple | None:
        """The Service flow these packets are the backend's replies of: every one
        is sent to the client end of a live Service flow (none comes from it)."""
        if self._client_end(parts):
            return None
        family, l4proto = fkey[0], fkey[1]
        ends = {(k.dst, k.dport) for _, k, _ in parts}
        if len(ends) != 1 or any((k.src, k.sport) in ends for _, k, _ in parts):
            return None
        target = self._clients.get((family, l4proto, *next(iter(ends))))
        if target is not None:
            self._joined[fkey] = target
            self._flows[target].joined += (fkey,)
        return target

    def _delete(self, raw: bytes) -> Stats:
        """Lookup-and-delete one kernel key; what it held (ring-buffer part included)."""
        out = Stats()
        leaf = self.kernel.pop(raw)
        if leaf is not None:
            out.merge(merge_percpu(leaf))
        ring = self._ring.pop(raw, None)
        if ring is not None:
            out.merge(ring[1])
        self._count(raw, out, final=True)
        return out

    def _decide(self, flow: Flow, now: int, ended: bool = False) -> str | None:
        """Decide an attempt's outcome once, and hand it out with this read's."""
        flow.outcome = connection_outcome(flow, now, int(self.cfg.connectTimeout * 1e9), ended)
        if flow.outcome:
            self.outcomes.append((flow.key, flow.outcome))
        return flow.outcome

    def _end(self, fkey: tuple, flow: Flow, reason: str) -> None:
        for raw in flow.keys:
            final = self._delete(raw)  # kernel + ring part, as in the snapshot, plus what came since
            if final.packets >= flow.totals[raw].packets:
                flow.totals[raw] = final
        if flow.outcome is None:
            self._decide(flow, self.clock(), ended=True)
        if flow.outcome == TIMEOUT and not flow.answered() and len(self._unanswered) < MAX_UNANSWERED:
            until = flow.last_ns + SYN_RETRY_GAP_NS
            for raw, key in flow.keys.items():
                if flow.forward(key) and flow.totals[raw].flags & SYN_ONLY:
                    self._unanswered[raw] = (until, flow.totals[raw].syn_tag)
        self._report(flow, final=True, reason=reason)
        del self._flows[fkey]
        for joined in flow.joined:
            self._joined.pop(joined, None)
        if self._clients.get(flow.client) == fkey:
            del self._clients[flow.client]
        if reason in ("fin", "rst"):
            until = self.clock() + int(self.cfg.idleTimeout * 1e9)
            for raw in flow.keys:
                self._closed[raw] = until

    def _report(self, flow: Flow, final: bool, reason: str) -> None:
        fp, fb, rp, rb = counts = flow.counts()
        pp, pb, prp, prb = flow.reported
        last = flow.last_ns
        offset = self._wall_offset
        record = FlowRecord(
            flow_id=flow.id, window=flow.window,
            start=(flow.window_start_ns + offset) / 1e9, end=(last + offset) / 1e9,
            transport=L4_NAMES.get(flow.key.l4proto, "other"), family=flow.key.family,
            source=flow.source[0], source_port=flow.source[1],
            destination=flow.destination[0], destination_port=flow.destination[1],
            packets=fp - pp, bytes=fb - pb, reply_packets=rp - prp, reply_bytes=rb - prb,
            tcp_flags=flow.flags() & 0xFF, observer=flow.observer, final=final, end_reason=reason,
            ifindex=max(flow.totals.values(), key=lambda s: s.last_ns).ifindex, connection=flow.outcome or "",
        )
        flow.reported = counts
        flow.window += 1
        flow.window_start_ns = last
        self.records += 1
        self.publish(record)

    def save(self) -> dict:
        """What the next agent needs to continue exactly (lifecycle.keepAttached), once the
        kernel table is its: what each key has handed out, the ring-buffer records it holds,
        and the open flows, which then go on in the next agent instead of ending here."""
        flows = [{"key": fkey, "id": f.id, "source": f.source, "destination": f.destination,
                  "opener": astuple(f.key), "keys": [raw.hex() for raw in f.keys],
                  "reported": f.reported, "window": f.window, "window_start_ns": f.window_start_ns,
                  "window_opened_ns": f.window_opened_ns, "last_seen": f.last_seen, "joined": f.joined,
                  "client": f.client} for fkey, f in self._flows.items()]
        self._flows.clear()  # nothing to report on close: they continue
        return {"counted": {raw.hex(): v for raw, v in self._counted.items()},
                "ring": {raw.hex(): astuple(s) for raw, (_, s) in self._ring.items()},
                "closed": {raw.hex(): until for raw, until in self._closed.items()},
                "flows": flows}

    def restore(self, saved: dict) -> None:
        """Continue from what save() returned in the previous agent (whose table this is)."""
        self._counted = {bytes.fromhex(raw): tuple(v) for raw, v in saved.get("counted", {}).items()}
        self._closed = {bytes.fromhex(raw): until for raw, until in saved.get("closed", {}).items()}
        for raw, stats in saved.get("ring", {}).items():
            raw = bytes.fromhex(raw)
            self._ring[raw] = (FlowId.from_buffer_copy(raw), Stats(*stats))
        for f in saved.get("flows", []):
            fkey = _tuples(f["key"])
            raws = [bytes.fromhex(raw) for raw in f["keys"]]
            flow = Flow(f["id"], tuple(f["source"]), tuple(f["destination"]), Key(*f["opener"]),
                        keys={raw: Key.decode(FlowId.from_buffer_copy(raw)) for raw in raws},
                        totals={raw: Stats() for raw in raws}, reported=tuple(f["reported"]),
                        window=f["window"], window_start_ns=f["window_start_ns"],
                        window_opened_ns=f["window_opened_ns"], last_seen=tuple(f["last_seen"]),
                        joined=tuple(_tuples(j) for j in f["joined"]), client=tuple(f["client"]))
            self._flows[fkey] = flow
            for joined in flow.joined:
                self._joined[joined] = fkey
            if flow.client:
                self._clients[flow.client] = fkey

    def close(self) -> None:
        """Report every flow still open (the agent stops)."""
        for fkey, flow in list(self._flows.items()):
            if flow.counts() != flow.reported:
                self._report(flow, final=True, reason="interval")
        self._flows.clear()

    @property
    def fill_ratio(self) -> float:
        return self.entries / self.max_entries if self.max_entries else 0.0


def _tuples(value):
    """JSON lists back into the tuples they were (flow keys: (family, l4proto, (addr, port), (addr, port)))."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"),
                  (0x40, "ECE"), (0x80, "CWR"))


def tcp_flag_names(flags: int) -> str:
    return "|".join(name for bit, name in TCP_FLAG_NAMES if flags & bit)


def flow_cflags(cfg) -> list[str]:
    """-D flags that build the flow table into the forward program (empty when flows are off)."""
    return ["-DFOVEA_FLOWS", *flow_table_cflags(cfg)] if cfg.enabled else []


def flow_table_cflags(cfg) -> list[str]:
    """The flow table's sizes (the pods program always keeps it: its counters come from it)."""
    return [f"-DFLOW_TABLE_SIZE={cfg.mapSize}", f"-DFLOW_RINGBUF_PAGES={cfg.ringBufferSize // 4096}",
            f"-DFLOW_POD_ADDRS={POD_ADDRESSES}", f"-DFLOW_NAT_REPLIES={NAT_REPLIES}",
            f"-DFLOW_NAT_TTL_NS={int(cfg.idleTimeout * 1e9)}ULL"]


# Self-observation of a plugin's tracker (fovea_agent_*), keyed by the plugin's name.
def flow_fill(tracker: FlowTracker | None, where: str) -> dict[str, float]:
    return {f"flows_{where}": tracker.fill_ratio} if tracker else {}


def flow_lost(tracker: FlowTracker | None, where: str) -> dict[str, int]:
    if tracker is None:
        return {}
    packets, connections = tracker.lost()
    return {f"flows_{where}_packets": packets, f"flows_{where}_connections": connections,
            f"flows_{where}_late_packets": tracker.late_packets}


def flow_records(tracker: FlowTracker | None, where: str) -> dict[str, int]:
    if tracker is None:
        return {}
    return {f"flows_{where}": tracker.records, f"flows_{where}_ring_buffer": tracker.ring_records}
