"""TCP health from tracepoints: retransmits, resets, connection states,
handshake latency and smoothed RTT, for the node and per pod.

Every event is keyed in the kernel by the socket's network namespace; the node
is the host's namespace (unless `tcp.includeHost` is off) plus the namespaces of
the pod interfaces Fovea counts, so other namespaces on the machine never add
to the node's numbers. Per-pod series go by the socket's local address.

Connection states: the kernel counts transitions per namespace and state
(`sock:inet_sock_set_state`); every `tcp.reconcileInterval` seconds a sock_diag
dump of each observed namespace replaces the running sum with the truth. That
dump is also the only source for TIME_WAIT (the tracepoint never reports it)
and for sockets older than the agent.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pyroute2 import DiagSocket

from agent.addresses import ip_text
from agent.attribution import WAIT
from agent.errors import FoveaError
from agent.maps import CounterHash
from agent.nsenter import in_netns
from agent.plugins.base import Plugin, PluginContext, PluginHealth
from agent.series import SeriesStore

log = logging.getLogger(__name__)

# tracepoint -> (C function, fields the C code reads and their sizes)
TRACEPOINTS = {
    ("tcp", "tcp_retransmit_skb"): ("on_retransmit_skb", {"skbaddr": 8, "skaddr": 8, "family": 2, "saddr": 4, "saddr_v6": 16, "err": 4}),
    ("tcp", "tcp_retransmit_synack"): ("on_retransmit_synack", {"skaddr": 8, "family": 2, "saddr": 4, "saddr_v6": 16}),
    ("tcp", "tcp_send_reset"): ("on_send_reset", {"skbaddr": 8, "skaddr": 8, "saddr": 28}),
    ("tcp", "tcp_receive_reset"): ("on_receive_reset", {"skaddr": 8, "family": 2, "saddr": 4, "saddr_v6": 16}),
    ("sock", "inet_sock_set_state"): ("on_set_state", {"skaddr": 8, "oldstate": 4, "newstate": 4, "protocol": 2}),
    ("tcp", "tcp_probe"): ("on_probe", {"skaddr": 8, "srtt": 4}),
}
# struct -> {member path: (-D name, size)}, offsets from the running kernel's BTF
KERNEL_MEMBERS = {
    "sock_common": {"skc_net": ("SKC_NET_OFF", 8)},
    "net": {"ns.inum": ("NET_INUM_OFF", 4)},
    "sk_buff": {"dev": ("SKB_DEV_OFF", 8), "cb": ("SKB_CB_OFF", 48)},
    "tcp_skb_cb": {"tcp_gso_segs": ("GSO_SEGS_OFF", 2)},
    "net_device": {"nd_net": ("DEV_ND_NET_OFF", 8)},
}

EVENTS = ("retransmit", "reset_sent", "reset_received")  # kinds, as in tcp.c
HISTOGRAMS = ("connect", "rtt")
BUCKETS = tuple(10e-6 * 2**i for i in range(21))  # upper bounds in seconds; tcp.c adds +Inf
LOST = ("tcp_events_full", "tcp_sockets_full", "tcp_hist_full", "tcp_states_full")  # tcp_lost slots
# Kernel state numbers (include/net/tcp_states.h) -> the names `ss` uses.
STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
          8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
TIME_WAIT = 6
POD_LABELS = ("namespace", "pod", "workload_kind", "workload_name")



def socket_states(netns_path: str | None) -> dict[int, int]:
    """TCP sockets per state in one network namespace (None: this one), from sock_diag."""
    counts: dict[int, int] = defaultdict(int)

    def dump():
        with DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(family=family, states=0xFFF):
                    counts[msg["idiag_state"]] += 1

    if netns_path:
        with in_netns(netns_path):
            dump()
    else:
        dump()
    return counts


class TcpPlugin(Plugin):
    name = "tcp"
    capabilities = ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN")  # SYS_ADMIN: sockets of pod namespaces

    def __init__(self, clock=time.monotonic):
        self._bpf = None
        self._ctx: PluginContext | None = None
        self.clock = clock
        self.host_netns = os.stat("/proc/self/ns/net").st_ino
        self.observed: dict[int, str | None] = {}  # netns inode -> path (None: the agent's own)
        self.events = [0, 0, 0]  # node totals per kind
        self.hist = {h: [[0] * (len(BUCKETS) + 1), 0] for h in HISTOGRAMS}  # per-bucket counts, sum in ns
        self.snapshot: dict[int, dict[int, int]] = {}  # netns -> state -> sockets at the last dump
        self.since: dict[int, dict[int, int]] = {}  # netns -> state -> transitions since that dump
        self._next_dump = 0.0
        self._pending = None
        self._lost = dict.fromkeys(LOST, 0)
        self._overflow_seen = [0] * len(EVENTS)
        self._dump_problem: str | None = None

    def check(self, tracefs) -> str | None:
        for (category, event), (_fn, fields) in TRACEPOINTS.items():
            why = tracefs.lacks(category, event, fields)
            if why:
                return why
        return None

    def cflags(self, ctx: PluginContext) -> list[str]:
        flags = []
        for (category, event), (_fn, fields) in TRACEPOINTS.items():
            flags += ctx.tracefs.offset_flags(category, event, list(fields))
        for struct, members in KERNEL_MEMBERS.items():
            for path, (define, size) in members.items():
                m = ctx.btf.member(struct, path)
                if m.size != size or m.bitfield_size:
                    raise FoveaError(f"struct {struct}.{path} is {m.size} bytes in this kernel, expected {size}",
                                     "this kernel is not supported by the tcp plugin")
                flags.append(f"-D{define}={m.offset}")
        cfg = ctx.config
        return flags + [f"-DTCP_MAP_SIZE={cfg.tcp.mapSize}", f"-DSOCKET_MAP_SIZE={cfg.tcp.socketMapSize}",
                        f"-DRTT_INTERVAL_NS={int(cfg.interval * 1e9)}"]

    def start(self, ctx: PluginContext) -> None:
        self._ctx = ctx
        cfg = ctx.config
        self.attribution = ctx.attribution
        self._pending = self.attribution.pending("tcp")
        self.pod_retransmits = SeriesStore(POD_LABELS, cfg.podLevel.maxSeries, cfg.podLevel.seriesTTL)
        self.pod_resets = SeriesStore(POD_LABELS + ("direction",), cfg.podLevel.maxSeries, cfg.podLevel.seriesTTL,
                                      keep_on_overflow=("direction",))
        self._bpf = ctx.datapath.load_program("tcp", self.cflags(ctx))
        self._events = CounterHash(self._bpf["tcp_events"],
                                   lambda k: (k.netns, k.kind, ip_text(k.family, bytes(k.addr))), cfg.idleReads)
        self._hist = CounterHash(self._bpf["tcp_hist"], lambda k: (k.netns, k.hist, k.bucket), cfg.idleReads)
        self._states = CounterHash(self._bpf["tcp_states"], lambda k: (k.netns, k.state), cfg.idleReads)
        self._restore(ctx.datapath.saved(self.name), self._bpf.adopted)
        for (category, event), (fn, _fields) in TRACEPOINTS.items():
            attached = self._bpf.attach_tracepoint(tp=f"{category}:{event}".encode(), fn_name=fn.encode())
            if attached != "attached":
                log.info("%s:%s: %s the previous agent's program", category, event, attached)
        self.reconcile()

    def _restore(self, saved: dict, adopted: set[str]) -> None:
        """Continue the previous agent's counters (lifecycle.keepAttached): its totals, pod
        series and what waited for a pod; its reads of a map only with that map."""
        if not saved:
            return
        self.pod_retransmits.restore(saved["pod_retransmits"])
        self.pod_resets.restore(saved["pod_resets"])
        self._pending.restore(saved["pending"])
        self.events = saved["events"]
        self.hist = {h: [counts, total] for h, (counts, total) in saved["hist"].items()}
        if "tcp_events_overflow" in adopted:  # else it counts from 0 again
            self._overflow_seen = saved["overflow_seen"]
        for reader, table, name in ((self._events, "tcp_events", "event_reads"), (self._hist, "tcp_hist", "hist_reads"),
                                    (self._states, "tcp_states", "state_reads")):
            if table in adopted:  # else the map is new: so is its reader
                reader.restore(saved[name])

    def save(self) -> dict:
        return {"pod_retransmits": self.pod_retransmits.save(), "pod_resets": self.pod_resets.save(),
                "pending": self._pending.save(), "events": self.events, "overflow_seen": self._overflow_seen,
                "hist": self.hist, "event_reads": self._events.save(), "hist_reads": self._hist.save(),
                "state_reads": self._states.save()}

    # -- namespaces --------------------------------------------------------------

    def _scan_namespaces(self) -> None:
        observed: dict[int, str | None] = {self.host_netns: None} if self._ctx.config.tcp.includeHost else {}
        for iface in self._ctx.datapath.pod_interfaces().values():
            if iface.netns:
                try:
                    observed[os.stat(iface.netns).st_ino] = iface.netns
                except OSError:  # the pod went away meanwhile
                    continue
        for gone in set(self.observed) - set(observed):
            self.snapshot.pop(gone, None)
            self.since.pop(gone, None)
        for new in set(observed) - set(self.observed):
            self._next_dump = 0.0  # count its sockets at once
        self.observed = observed

    def reconcile(self) -> None:
        self._scan_namespaces()
        if self.clock() >= self._next_dump:
            self._dump_problem = None
            self.refresh()  # transitions up to now belong before the dump
            for netns, path in self.observed.items():
                try:
                    self.snapshot[netns] = socket_states(path)
                except PermissionError as e:  # not a pod going away: the agent may not enter namespaces
                    self._dump_problem = f"missing capability CAP_SYS_ADMIN? cannot list the sockets of {path}: {e}"
                    continue
                except Exception as e:  # the namespace vanished between scan and dump
                    log.debug("cannot list sockets of %s: %s", path, e)
                    continue
                self.since[netns] = defaultdict(int)
            self._next_dump = self.clock() + self._ctx.config.tcp.reconcileInterval

    # -- reads ---------------------------------------------------------------------

    def refresh(self) -> None:
        for (netns, kind, addr), (count, _) in self._events.read().items():
            if netns not in self.observed:
                continue  # another namespace on this machine: not the node's
            self.events[kind] += count
            if addr:
                self._pending.add({(kind, addr): (count, 0)})
        for (netns, hist, bucket), (count, total_ns) in self._hist.read().items():
            if netns in self.observed:
                h = self.hist[HISTOGRAMS[hist]]
                h[0][bucket] += count
                h[1] += total_ns
        for (netns, state), (entered, left) in self._states.read().items():
            if netns in self.since:
                self.since[netns][state] += entered - left
        # The event map was full: namespace unknown, but they happened on this machine.
        overflow = [sum(v) for v in self._bpf["tcp_events_overflow"].values()]
        for kind, count in enumerate(overflow):
            self.events[kind] += count - self._overflow_seen[kind]
        self._overflow_seen = overflow
        self._lost = {name: sum(v) for name, v in zip(LOST, self._bpf["tcp_lost"].values())}
        self._attribute_to_pods()

    def _attribute_to_pods(self) -> None:
        def attribute(key, count, _) -> bool:
            kind, addr = key
            labels = self.attribution.labels(self.attribution.owner(addr))
            if labels is WAIT:
                return False
            if labels is not None:
                if kind == 0:
                    self.pod_retransmits.add(labels, count, 0)
                else:
                    self.pod_resets.add(labels + (EVENTS[kind].removeprefix("reset_"),), count, 0)
            return True

        self._pending.drain(attribute)
        present = self.attribution.local_pod_labels()
        self.pod_retransmits.touch(lambda labels: labels in present)
        self.pod_resets.touch(lambda labels: labels[:4] in present)

    def connections(self) -> dict[str, int]:
        """Sockets per state name across the observed namespaces."""
        out = dict.fromkeys(STATES.values(), 0)
        for netns, snap in self.snapshot.items():
            since = self.since.get(netns, {})
            for state, name in STATES.items():
                out[name] += max(0, snap.get(state, 0) + (since.get(state, 0) if state != TIME_WAIT else 0))
        return out

    # -- export --------------------------------------------------------------------

    def metrics(self):
        retrans = CounterMetricFamily("fovea_tcp_retransmits", "TCP segments retransmitted (SYN-ACKs included)")
        retrans.add_metric([], self.events[0])
        resets = CounterMetricFamily("fovea_tcp_resets", "TCP resets sent and received", labels=["direction"])
        resets.add_metric(["sent"], self.events[1])
        resets.add_metric(["received"], self.events[2])
        states = GaugeMetricFamily("fovea_tcp_connections", "TCP sockets by state", labels=["state"])
        for name, count in self.connections().items():
            states.add_metric([name], count)
        out = [retrans, resets, states]
        for hist, name, doc in (("connect", "fovea_tcp_connect_duration_seconds", "TCP handshake latency (SYN_SENT to ESTABLISHED)"),
                                ("rtt", "fovea_tcp_rtt_seconds", "Smoothed TCP round-trip time, one sample per connection per interval")):
            counts, total_ns = self.hist[hist]
            buckets, running = [], 0
            for bound, count in zip([*(f"{b:.6g}" for b in BUCKETS), "+Inf"], counts):
                running += count
                buckets.append((bound, running))
            family = HistogramMetricFamily(name, doc)
            family.add_metric([], buckets, total_ns / 1e9)
            out.append(family)
        out.append(self.pod_retransmits.counter("fovea_pod_tcp_retransmits", "TCP segments observed pods retransmitted"))
        out.append(self.pod_resets.counter("fovea_pod_tcp_resets", "TCP resets observed pods sent and received"))
        return out

    def problem(self) -> str | None:
        return self._dump_problem

    def health(self) -> PluginHealth:
        if self._bpf is None:
            return PluginHealth()
        return PluginHealth(
            map_fill={"tcp_events": self._events.fill_ratio, "tcp_hist": self._hist.fill_ratio,
                      "tcp_states": self._states.fill_ratio},
            lost=dict(self._lost),
            series={"fovea_pod_tcp_retransmits_total": len(self.pod_retransmits),
                    "fovea_pod_tcp_resets_total": len(self.pod_resets)},
            overflowed={"fovea_pod_tcp_retransmits_total": self.pod_retransmits.overflowed,
                        "fovea_pod_tcp_resets_total": self.pod_resets.overflowed},
        )

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
