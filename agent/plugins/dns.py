"""DNS health: queries, responses, latency and unanswered queries, per node and per pod.

The kernel side is bpf/dns.h, compiled into the pods and forward tc programs
(a TcExtension): it parses each port-53 message at fixed offsets, counts it
once per node, matches responses to queries and measures the latency. Here:
- counters are read as increments, like every other map (agent/maps.py);
- queries in flight longer than `dns.timeout` are taken out of the kernel's
  table (an atomic lookup-and-delete) and counted as unanswered;
- a sampled share of messages comes up through a perf buffer, is decoded with
  dnspython (agent/dnswire.py) and published as DnsTransaction records on the
  event hub: one per sampled transaction, answered or not.
Python's cost grows with scrapes, pods and sampled messages, not with the
query rate.
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
import time
from collections import OrderedDict, defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent import dnswire
from agent.addresses import ip_text
from agent.attribution import WAIT, client_server_addresses
from agent.config import DnsConfig
from agent.errors import FoveaError
from agent.events import OBSERVERS, DnsTransaction, wall_clock
from agent.maps import CounterHash, take_expired
from agent.datapath import Datapath, TcExtension
from agent.plugins.base import Plugin, PluginContext, PluginHealth
from agent.plugins.pods import POD_LABELS
from agent.series import SeriesStore

log = logging.getLogger(__name__)

HOSTS = ("pods", "forward")  # tc programs that carry bpf/dns.h
LATENCY_BASE_NS = 50_000  # first bucket: 50 us; each next one doubles it
LATENCY_BUCKETS = 18  # up to 6.6 s
QUERY, RESPONSE = 0, 1
TRANSPORTS = {6: "tcp", 17: "udp"}
# Index in dns_stats (bpf/dns.h) -> kernel reject reason.
KERNEL_REJECTS = ("truncated", "tcp_length", "opcode", "qdcount", "bad_name", "direction")
UNMATCHED, INFLIGHT_FULL, COUNTS_FULL = 6, 7, 8
POLL_MS = 100
MAX_SAMPLED_QUERIES = 10_000  # sampled queries waiting for their response


class DnsFlow(ct.Structure):
    _fields_ = [("family", ct.c_uint8), ("transport", ct.c_uint8), ("id", ct.c_uint16),
                ("client_port", ct.c_uint16), ("server_port", ct.c_uint16),
                ("client", ct.c_uint8 * 16), ("server", ct.c_uint8 * 16)]


class DnsEvent(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("latency", ct.c_uint64), ("ifindex", ct.c_uint32),
                ("offset", ct.c_uint32), ("length", ct.c_uint32), ("qtype", ct.c_uint16),
                ("kind", ct.c_uint8), ("rcode", ct.c_uint8), ("observer", ct.c_uint8),
                ("pad", ct.c_uint8 * 3), ("flow", DnsFlow)]



def _flow_key(flow) -> tuple:
    return (flow.family, flow.transport, flow.id, flow.client_port, flow.server_port,
            bytes(flow.client), bytes(flow.server))


def dns_cflags(cfg: DnsConfig) -> list[str]:
    """The -D flags that put bpf/dns.h into the pods and forward programs."""
    threshold = min(1 << 32, int(cfg.sampleRatio * (1 << 32)))  # sampled: prandom u32 below it
    return [
        "-DFOVEA_DNS", f"-DDNS_COUNT_SIZE={cfg.mapSize}", f"-DDNS_INFLIGHT_SIZE={cfg.inflightMapSize}",
        f"-DDNS_SAMPLE_THRESHOLD={threshold}ULL", f"-DDNS_SAMPLE_BYTES={cfg.sampleBytes}",
        f"-DDNS_LATENCY_BASE_NS={LATENCY_BASE_NS}ULL", f"-DDNS_LATENCY_BUCKETS={LATENCY_BUCKETS}",
    ]


class _Host:
    """The DNS maps inside one host plugin's BPF object."""

    def __init__(self, program: str, bpf, idle_reads: int, on_event, on_lost):
        self.program = program
        self.bpf = bpf
        self.counts = CounterHash(bpf[b"dns_counts"], self._decode_count, idle_reads)
        self.inflight = bpf[b"dns_inflight"]
        self.latency = bpf[b"dns_latency"]
        self.stats = bpf[b"dns_stats"]
        self.pod_ifaces = bpf[b"dns_pod_ifaces"] if program == "pods" else None
        self.inflight_entries = 0
        bpf[b"dns_events"].open_perf_buffer(on_event, page_cnt=64, lost_cb=on_lost)

    @staticmethod
    def _decode_count(k) -> tuple:
        """(local address, kind, qtype name, rcode name)."""
        rcode = dnswire.rcode_name(k.rcode) if k.kind == RESPONSE else ""
        return (ip_text(k.family, k.addr), k.kind, dnswire.qtype_name(k.qtype), rcode)

    def percpu_sums(self, table) -> list[int]:
        return [sum(table[ct.c_int(i)]) for i in range(table.max_entries)]


class DnsPlugin(Plugin, TcExtension):
    name = "dns"

    def __init__(self):
        self._ctx: PluginContext | None = None
        self._cflags: list[str] = []
        self._hosts: dict[str, _Host] = {}
        self._failed: dict[str, str] = {}  # host program -> why DNS is not in it
        self._lock = threading.Lock()  # state shared by the poll thread and the read loop
        self._poll_lock = threading.Lock()  # held while a host's perf buffer is polled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests: dict[str, int] = defaultdict(int)
        self.responses: dict[tuple[str, str], int] = defaultdict(int)
        self.unanswered: dict[str, int] = defaultdict(int)
        self._latency: dict[str, list[int]] = {}  # host -> cumulative buckets (+Inf) and sum of ns
        self._stats: dict[str, list[int]] = {}  # host -> cumulative dns_stats
        self.decode_rejects: dict[str, int] = defaultdict(int)
        self.lost_events = 0
        self.sampled_full = 0
        self._sampled: OrderedDict[tuple, tuple[float, str | None]] = OrderedDict()  # flow -> (start, name)
        self.published = 0
        self._saved: dict = {}  # what the previous agent saved (lifecycle.keepAttached)

    # -- the plugin -----------------------------------------------------------

    def declare(self, datapath: Datapath) -> None:
        cfg = datapath.config
        if not any(h in cfg.plugins for h in HOSTS):
            raise FoveaError("the dns plugin counts inside the pods and forward plugins' tc programs",
                             "enable the pods plugin (and forward for the node's own DNS)")
        self._idle_reads = cfg.idleReads
        self._cflags = dns_cflags(cfg.dns)
        self._saved = datapath.saved(self.name)  # lifecycle.keepAttached: the previous agent's counters
        datapath.declare(self)

    def start(self, ctx: PluginContext) -> None:
        cfg = ctx.config
        self._ctx = ctx
        self.attribution = ctx.attribution
        level = cfg.podLevel
        self.pod_requests = SeriesStore(POD_LABELS + ("qtype",), level.maxSeries, level.seriesTTL,
                                        keep_on_overflow=("qtype",))
        self.pod_responses = SeriesStore(POD_LABELS + ("qtype", "rcode"), level.maxSeries, level.seriesTTL,
                                         keep_on_overflow=("qtype", "rcode"))
        self._pending = self.attribution.pending("dns")
        # Sampled transactions naming a pod not known yet wait for it (the pending window).
        self._records = self.attribution.holding("dns_transaction", ctx.events.publish, client_server_addresses)
        self._timeout_ns = int(cfg.dns.timeout * 1e9)
        self._restore(self._saved)
        self._thread = threading.Thread(target=self._poll, name="dns-events", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        now_ns = time.monotonic_ns()
        for name, host in list(self._hosts.items()):
            for (addr, kind, qtype, rcode), (n, _) in host.counts.read().items():
                if kind == QUERY:
                    self.requests[qtype] += n
                else:
                    self.responses[(qtype, rcode)] += n
                self._pending.add({(addr, qtype, rcode if kind == RESPONSE else None): (n, 0)})
            self._latency[name] = host.percpu_sums(host.latency)
            self._stats[name] = host.percpu_sums(host.stats)
            self._expire(host, now_ns)
        self._pending.drain(self._attribute)
        self._records.release()
        present = self.attribution.local_pod_labels()
        for store in (self.pod_requests, self.pod_responses):
            store.touch(lambda labels: labels[:4] in present)
        oldest = time.time() - 2 * self._ctx.config.dns.timeout
        with self._lock:  # sampled queries whose response event was lost
            while self._sampled and next(iter(self._sampled.values()))[0] < oldest:
                self._sampled.popitem(last=False)

    def _attribute(self, key, count, _bytes) -> bool:
        """Pod series, once the local address names a pod of this node."""
        addr, qtype, rcode = key
        labels = self.attribution.labels(self.attribution.owner(addr))
        if labels is WAIT:
            return False
        if labels is not None:
            if rcode is None:
                self.pod_requests.add(labels + (qtype,), count, 0)
            else:
                self.pod_responses.add(labels + (qtype, rcode), count, 0)
        return True

    def _expire(self, host: _Host, now_ns: int) -> None:
        """Queries older than the timeout: unanswered. Taken with lookup-and-delete,
        so a response that lands meanwhile is counted once, one way or the other."""
        host.inflight_entries, taken = take_expired(host.inflight, now_ns, self._timeout_ns)
        for key, leaf in taken:
            qtype = dnswire.qtype_name(leaf.qtype)
            self.unanswered[qtype] += 1
            if leaf.sampled:
                with self._lock:
                    start, name = self._sampled.pop(_flow_key(key), (wall_clock(leaf.ts), None))
                self._publish(key, start, None, qtype, None, leaf.observer, leaf.ifindex, name, ())

    def metrics(self):
        requests = CounterMetricFamily("fovea_dns_requests", "DNS queries, once per node", labels=["qtype"])
        for qtype, n in sorted(self.requests.items()):
            requests.add_metric([qtype], n)
        responses = CounterMetricFamily("fovea_dns_responses", "DNS responses matched to a query, once per node",
                                        labels=["qtype", "rcode"])
        for (qtype, rcode), n in sorted(self.responses.items()):
            responses.add_metric([qtype, rcode], n)
        unanswered = CounterMetricFamily("fovea_dns_unanswered",
                                         "DNS queries without a response within dns.timeout", labels=["qtype"])
        for qtype, n in sorted(self.unanswered.items()):
            unanswered.add_metric([qtype], n)
        buckets = [0] * (LATENCY_BUCKETS + 2)
        for values in self._latency.values():
            buckets = [a + b for a, b in zip(buckets, values)]
        cumulative, running = [], 0
        for i in range(LATENCY_BUCKETS + 1):
            running += buckets[i]
            bound = "+Inf" if i == LATENCY_BUCKETS else repr(LATENCY_BASE_NS * 2**i / 1e9)
            cumulative.append((bound, running))
        latency = HistogramMetricFamily("fovea_dns_latency_seconds", "DNS query to response, measured in the kernel",
                                        buckets=cumulative, sum_value=buckets[-1] / 1e9)
        rejected = CounterMetricFamily("fovea_agent_dns_rejected",
                                       "DNS messages that could not be parsed, by stage and reason",
                                       labels=["stage", "reason"])
        stats = [sum(v) for v in zip(*self._stats.values())] or [0] * (COUNTS_FULL + 1)
        for i, reason in enumerate(KERNEL_REJECTS):
            rejected.add_metric(["kernel", reason], stats[i])
        with self._lock:
            for reason in dnswire.REASONS:
                rejected.add_metric(["decoder", reason], self.decode_rejects[reason])
        unmatched = CounterMetricFamily(
            "fovea_agent_dns_unmatched_responses",
            "DNS responses from outside the node for a local client with no query in flight (late, duplicate)")
        unmatched.add_metric([], stats[UNMATCHED])
        inside = GaugeMetricFamily("fovea_agent_dns_datapath",
                                   "1 if DNS is counted inside this tc program, 0 if it failed to load there",
                                   labels=["program"])
        for program in sorted(set(self._hosts) | set(self._failed)):
            inside.add_metric([program], 1.0 if program in self._hosts else 0.0)
        return [requests, responses, unanswered, latency, rejected, unmatched, inside,
                self.pod_requests.counter("fovea_pod_dns_requests", "DNS queries of observed pods"),
                self.pod_responses.counter("fovea_pod_dns_responses", "DNS responses of observed pods")]

    def problem(self) -> str | None:
        if self._failed:
            return "; ".join(f"DNS is not counted in the {p} programs: {why}" for p, why in self._failed.items())
        if not self._hosts:
            return "no tc program counts DNS: the pods and forward plugins are down"
        return None

    def health(self) -> PluginHealth:
        stats = [sum(v) for v in zip(*self._stats.values())] or [0] * (COUNTS_FULL + 1)
        fill = {}
        for name, host in self._hosts.items():
            fill[f"{name}/dns_counts"] = host.counts.fill_ratio
            fill[f"{name}/dns_inflight"] = host.inflight_entries / host.inflight.max_entries
        with self._lock:
            lost = {"dns_events": self.lost_events, "dns_sampled_queries_full": self.sampled_full}
        lost.update(dns_inflight_full=stats[INFLIGHT_FULL], dns_counts_full=stats[COUNTS_FULL])
        return PluginHealth(
            map_fill=fill, lost=lost,
            series={"fovea_pod_dns_requests_total": len(self.pod_requests),
                    "fovea_pod_dns_responses_total": len(self.pod_responses)},
            overflowed={"fovea_pod_dns_requests_total": self.pod_requests.overflowed,
                        "fovea_pod_dns_responses_total": self.pod_responses.overflowed},
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._poll_lock:
            self._hosts.clear()
        if self._ctx is not None:
            self._records.flush()

    # -- the extension of the pods and forward programs ---------------------------

    def cflags(self, program: str) -> list[str]:
        return list(self._cflags) if program in HOSTS else []

    def _restore(self, saved: dict) -> None:
        """Continue the previous agent's totals, pod series and what waited for a pod (each
        host's reader of dns_counts is restored when that map is adopted: loaded())."""
        if not saved:
            return
        self.requests.update(saved["requests"])
        self.responses.update({(qtype, rcode): n for qtype, rcode, n in saved["responses"]})
        self.unanswered.update(saved["unanswered"])
        self.pod_requests.restore(saved["pod_requests"])
        self.pod_responses.restore(saved["pod_responses"])
        self._pending.restore(saved["pending"])

    def save(self) -> dict:
        return {"requests": dict(self.requests), "responses": [[*k, n] for k, n in self.responses.items()],
                "unanswered": dict(self.unanswered), "pod_requests": self.pod_requests.save(),
                "pod_responses": self.pod_responses.save(), "pending": self._pending.save(),
                "reads": {name: host.counts.save() for name, host in self._hosts.items()}}

    def loaded(self, program: str, bpf) -> None:
        host = _Host(program, bpf, self._idle_reads, self._on_event, self._on_lost)
        reads = self._saved.get("reads", {}).get(program)
        if reads is not None and "dns_counts" in bpf.adopted:  # else the map is new: so is its reader
            host.counts.restore(reads)
        with self._poll_lock:
            self._hosts[program] = host
        log.info("counting DNS in the %s programs", program)

    def failed(self, program: str, why: str) -> None:
        self._failed[program] = why
        log.error("DNS is not counted in the %s programs: %s", program, why)

    def attached(self, program: str, ifindex: int) -> None:
        host = self._hosts.get(program)
        if host is not None and host.pod_ifaces is not None:
            host.pod_ifaces[ct.c_uint32(ifindex)] = ct.c_uint8(1)

    def detached(self, program: str, ifindex: int) -> None:
        host = self._hosts.get(program)
        if host is not None and host.pod_ifaces is not None:
            try:
                del host.pod_ifaces[ct.c_uint32(ifindex)]
            except KeyError:
                pass

    def unloading(self, program: str) -> None:
        with self._poll_lock:
            self._hosts.pop(program, None)

    # -- sampled messages (the poll thread) -----------------------------------------

    def _poll(self) -> None:
        while not self._stop.is_set():
            with self._poll_lock:
                hosts = list(self._hosts.values())
                for host in hosts:
                    try:
                        host.bpf.perf_buffer_poll(timeout=POLL_MS // max(1, len(hosts)))
                    except Exception:  # never let one bad event end the thread
                        log.exception("reading sampled DNS messages failed")
            # Let loaded()/unloading() take the lock between polls.
            self._stop.wait(POLL_MS / 1000 if not hosts else 0.001)

    def _on_lost(self, lost: int) -> None:
        with self._lock:
            self.lost_events += lost

    def _on_event(self, _cpu, data, size) -> None:
        if size < ct.sizeof(DnsEvent):
            return
        raw = ct.string_at(data, size)
        ev = DnsEvent.from_buffer_copy(raw)
        body = raw[ct.sizeof(DnsEvent):]
        wire = body[ev.offset:ev.offset + ev.length] if ev.offset <= len(body) else b""
        try:
            decoded = dnswire.decode(wire, complete=len(wire) == ev.length)
        except dnswire.Rejected as e:
            with self._lock:
                self.decode_rejects[e.reason] += 1
            decoded = None
        key = _flow_key(ev.flow)
        qtype = dnswire.qtype_name(ev.qtype)
        name = decoded.name if decoded else None
        if ev.kind == QUERY:
            with self._lock:
                self._sampled[key] = (wall_clock(ev.ts), name)
                self._sampled.move_to_end(key)
                if len(self._sampled) > MAX_SAMPLED_QUERIES:
                    self._sampled.popitem(last=False)
                    self.sampled_full += 1
            return
        with self._lock:
            start, query_name = self._sampled.pop(key, (wall_clock(ev.ts - ev.latency), None))
        self._publish(ev.flow, start, ev.latency / 1e9, qtype, dnswire.rcode_name(ev.rcode), ev.observer,
                      ev.ifindex, name or query_name, decoded.answers if decoded else ())

    def _publish(self, flow, start, duration, qtype, rcode, observer, ifindex, name, answers) -> None:
        self._records.publish(DnsTransaction(
            start=start, duration=duration,
            client=ip_text(flow.family, flow.client), client_port=flow.client_port,
            server=ip_text(flow.family, flow.server), server_port=flow.server_port,
            transport=TRANSPORTS.get(flow.transport, "udp"), id=flow.id, qtype=qtype, rcode=rcode,
            observer=OBSERVERS[observer & 1], ifindex=ifindex, name=name, answers=answers,
        ))
        self.published += 1
