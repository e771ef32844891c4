"""HTTP/1.x requests between workloads: requests by method and status class, and their durations.

The kernel side is bpf/http.h, compiled into the pods tc programs (a
TcExtension): it reads the first bytes of each TCP payload of the HTTP ports,
matches each response to its request per connection and counts requests by
(client, server, method, status class) and durations by (client, server,
log2 bucket). Here:
- counters are read as increments (agent/maps.py) and named as workload pairs
  by the attribution stage, once per cluster like the traffic map: at the
  client's node when the client is a pod of the cluster, at the server's only
  when not; a Service's ClusterIP names the Service;
- requests in flight longer than `http.timeout` are taken out of the kernel's
  table (an atomic lookup-and-delete) and counted with status_class none;
- a sampled share of the requests (`http.sampleRatio`: a hash of the request's
  first byte's time, in the kernel and here for the expired ones, so both agree)
  is published as HttpRequest records on the event hub, for spans and `fovea
  observe --http`, with url.path when `http.urlPath` is on (the request line's
  first bytes come up before the request's record and wait for it). Their ring
  buffer is read on the read loop, with the flow table (bpf.ring_buffer_consume
  reads every ring buffer of the pods programs), so a request is published
  before the flow report that covers its packets: its span finds its
  connection's (agent/traces.py).
Python's cost grows with pairs, scrapes and sampled requests, not with the request rate.
"""

from __future__ import annotations

import ctypes as ct
import logging
import time
from collections import OrderedDict, defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from agent.addresses import ip_text
from agent.attribution import WAIT, client_server_addresses
from agent.config import MAX_URL_PATH, HttpConfig
from agent.datapath import Datapath, TcExtension
from agent.errors import FoveaError
from agent.events import OBSERVERS, HttpRequest, wall_clock
from agent.maps import CounterHash, take_expired
from agent.plugins.base import Plugin, PluginContext, PluginHealth
from agent.plugins.pods import PAIR_LABELS, PodsPlugin
from agent.series import SeriesStore

log = logging.getLogger(__name__)

HOST = "pods"  # the tc program that carries bpf/http.h
METHODS = ("OTHER", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")  # index: bpf/http.h
STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")  # index: the status code's first digit
DURATION_BASE_NS = 250_000  # first bucket: 0.25 ms; each next one doubles it
DURATION_BUCKETS = 17  # up to 16.4 s
# Index in http_stats (bpf/http.h).
KERNEL_REJECTS = ("status_line", "request_line")
UNMATCHED, PIPELINED, INFLIGHT_FULL, COUNTS_FULL, EVENTS_FULL = 2, 3, 4, 5, 6
STATS = 7
DURATION = "duration"  # pending key kind of a duration bucket (beside a method index)
LINE_MAX = 256  # HTTP_LINE_MAX (bpf/http.h)
MAX_WAITING_LINES = 10_000  # sampled request lines waiting for their request's record


class HttpConn(ct.Structure):
    _fields_ = [("family", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("client_port", ct.c_uint16),
                ("server_port", ct.c_uint16), ("client", ct.c_uint8 * 16), ("server", ct.c_uint8 * 16)]


class HttpEvent(ct.Structure):
    """struct http_event (bpf/http.h): one sampled request."""

    _fields_ = [("ts", ct.c_uint64), ("duration", ct.c_uint64), ("conn", HttpConn), ("ifindex", ct.c_uint32),
                ("status", ct.c_uint16), ("method", ct.c_uint8), ("to_pod", ct.c_uint8)]


class HttpPathEvent(ct.Structure):
    """struct http_path_event (bpf/http.h): a sampled request's line, before its HttpEvent."""

    _fields_ = [("ts", ct.c_uint64), ("conn", HttpConn), ("length", ct.c_uint32), ("pad", ct.c_uint32),
                ("line", ct.c_uint8 * LINE_MAX)]


def sampled(ts_ns: int, threshold: int) -> bool:
    """http_sampled (bpf/http.h): the same choice for a request the kernel did not count."""
    return threshold > 0 and ((ts_ns * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 32 < threshold


def url_path(line: bytes, max_length: int) -> str | None:
    """The path of a request line's target (no query, no fragment), cut at max_length
    characters; None when the target has none (`*`, an authority) or was not read."""
    _, space, rest = line.partition(b" ")
    target = rest.split(b" ", 1)[0].split(b"\r", 1)[0].split(b"\n", 1)[0]
    if b"://" in target[:16]:  # absolute-form, as sent to a proxy: scheme://authority/path
        target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not space or not path.startswith(b"/"):
        return None
    return path.decode("utf-8", "replace")[:max_length]


def method_name(index: int) -> str:
    return METHODS[index] if index < len(METHODS) else "OTHER"


def http_request(conn, start: float, duration_ns: int, method: int, status: int, to_pod: bool,
                 ifindex: int, path: str | None = None) -> HttpRequest:
    """A kernel request (an event, or an expired in-flight entry) as a hub record."""
    return HttpRequest(
        start=start, duration=duration_ns / 1e9 if status else None,
        client=ip_text(conn.family, conn.client), client_port=conn.client_port,
        server=ip_text(conn.family, conn.server), server_port=conn.server_port,
        method=method_name(method), status_code=status or None,
        observer=OBSERVERS[1 if to_pod else 0], ifindex=ifindex, path=path)  # seen sent to the server pod: its end


def sample_threshold(cfg: HttpConfig) -> int:
    return min(1 << 32, int(cfg.sampleRatio * (1 << 32)))  # sampled: a 32-bit hash below it


def http_cflags(cfg: HttpConfig) -> list[str]:
    """The -D flags that put bpf/http.h into the pods programs."""
    mask = sum({1 << (p & 63) for p in cfg.ports})  # one bit per port's low 6 bits: most others miss it
    ports = ["-DHTTP_ALL_PORTS"] if not cfg.ports else [
        "-DHTTP_PORT(p)=(" + "||".join(f"(p)=={p}" for p in cfg.ports) + ")", f"-DHTTP_PORT_MASK={mask:#x}ULL"]
    path = [f"-DHTTP_PATH_BYTES={min(LINE_MAX, cfg.urlPathMaxLength + LINE_MAX - MAX_URL_PATH)}"] if cfg.urlPath else []
    return ["-DFOVEA_HTTP", *ports, f"-DHTTP_COUNT_SIZE={cfg.mapSize}",
            f"-DHTTP_SAMPLE_THRESHOLD={sample_threshold(cfg)}ULL", *path,
            f"-DHTTP_INFLIGHT_SIZE={cfg.inflightMapSize}",
            f"-DHTTP_DURATION_BASE_NS={DURATION_BASE_NS}ULL", f"-DHTTP_DURATION_BUCKETS={DURATION_BUCKETS}"]


def bucket_bounds() -> list[str]:
    """The `le` of each duration bucket, +Inf last."""
    return [repr(DURATION_BASE_NS * 2**i / 1e9) for i in range(DURATION_BUCKETS)] + ["+Inf"]


class _Maps:
    """The HTTP maps inside the pods plugin's BPF object."""

    def __init__(self, bpf, idle_reads: int, on_event):
        self.bpf = bpf
        self.counts = CounterHash(bpf[b"http_counts"], self._decode_count, idle_reads)
        self.durations = CounterHash(bpf[b"http_durations"], self._decode_duration, idle_reads)
        self.inflight = bpf[b"http_inflight"]
        self.stats = bpf[b"http_stats"]
        self.inflight_entries = 0
        bpf[b"http_events"].open_ring_buffer(on_event)

    @staticmethod
    def _decode_count(k) -> tuple:
        """(client, server, to_pod, method index, status class index)."""
        return (ip_text(k.family, k.client), ip_text(k.family, k.server), bool(k.to_pod), k.method, k.status)

    @staticmethod
    def _decode_duration(k) -> tuple:
        return (ip_text(k.family, k.client), ip_text(k.family, k.server), bool(k.to_pod), DURATION, k.bucket)

    def stat_totals(self) -> list[int]:
        return [sum(self.stats[ct.c_int(i)]) for i in range(STATS)]


class HttpPlugin(Plugin, TcExtension):
    name = "http"
    capabilities = PodsPlugin.capabilities  # it runs inside the pods programs

    def __init__(self):
        self._ctx: PluginContext | None = None
        self._cflags: list[str] = []
        self._maps: _Maps | None = None
        self._failed = ""  # why HTTP is not in the pods programs
        self._stats = [0] * STATS
        self.unanswered_expired = 0
        self.published = 0
        self._saved: dict = {}  # what the previous agent saved (lifecycle.keepAttached)

    # -- the plugin -----------------------------------------------------------

    def declare(self, datapath: Datapath) -> None:
        cfg = datapath.config
        if HOST not in cfg.plugins:
            raise FoveaError("HTTP is counted inside the pods plugin's tc programs", "enable the pods plugin")
        self._idle_reads = cfg.idleReads
        self._cflags = http_cflags(cfg.http)
        self._saved = datapath.saved(self.name)  # lifecycle.keepAttached: the previous agent's counters
        self._ports = "ports " + ", ".join(map(str, cfg.http.ports)) if cfg.http.ports else "every TCP port"
        datapath.declare(self)

    def start(self, ctx: PluginContext) -> None:
        cfg = ctx.config
        self._ctx = ctx
        self.attribution = ctx.attribution
        level = cfg.podLevel
        self.requests = SeriesStore(PAIR_LABELS + ("method", "status_class"), level.maxSeries, level.seriesTTL,
                                    keep_on_overflow=("method", "status_class"))
        self.durations = SeriesStore(PAIR_LABELS + ("bucket",), level.maxSeries, level.seriesTTL,
                                     keep_on_overflow=("bucket",))
        self._pending = self.attribution.pending("http")
        self._timeout_ns = int(cfg.http.timeout * 1e9)
        self._threshold = sample_threshold(cfg.http)
        self._path_length = cfg.http.urlPathMaxLength if cfg.http.urlPath else 0
        self._lines: OrderedDict[tuple[bytes, int], str | None] = OrderedDict()  # (conn, ts) -> url.path
        # Sampled requests naming a pod not known yet wait for it (the pending window).
        self._records = self.attribution.holding("http_request", ctx.events.publish, client_server_addresses)
        if self._saved:  # the readers of the maps were restored with them (loaded())
            self.requests.restore(self._saved["requests"])
            self.durations.restore(self._saved["durations"])
            self._pending.restore(self._saved["pending"])
            self.unanswered_expired = self._saved["unanswered_expired"]

    def save(self) -> dict:
        maps = self._maps
        return {"requests": self.requests.save(), "durations": self.durations.save(), "pending": self._pending.save(),
                "unanswered_expired": self.unanswered_expired,
                "reads": {"counts": maps.counts.save(), "durations": maps.durations.save()} if maps else {}}

    def refresh(self) -> None:
        maps = self._maps
        if maps is None:
            return
        maps.bpf.ring_buffer_consume()  # sampled requests (also read with the flow table, before it)
        for read in (maps.counts.read(), maps.durations.read()):
            self._pending.add(read)
        self._stats = maps.stat_totals()
        self._expire(maps, time.monotonic_ns())
        self._pending.drain(self._attribute)
        self._records.release()
        for store in (self.requests, self.durations):
            store.touch(lambda labels: True)  # bounded by workload pairs, kept

    def _attribute(self, key, count, ns) -> bool:
        """Once per cluster, named as the traffic map names the pair (agent/attribution.py)."""
        client, server, to_pod, kind, value = key
        pair = self.attribution.workload_pair(client, server, to_pod)
        if pair is WAIT:
            return False
        if pair is not None:
            src, dst = pair
            labels = (src.namespace, src.workload, dst.namespace, dst.workload)
            if kind == DURATION:
                self.durations.add(labels + (str(value),), count, ns)
            else:
                self.requests.add(labels + (METHODS[kind] if kind < len(METHODS) else "OTHER",
                                            STATUS_CLASSES[value] if value < len(STATUS_CLASSES) else "none"),
                                  count, 0)
        return True

    def _expire(self, maps: _Maps, now_ns: int) -> None:
        """Requests older than the timeout: status class none. Taken with lookup-and-delete,
        so a response that lands meanwhile is counted once, one way or the other."""
        maps.inflight_entries, taken = take_expired(maps.inflight, now_ns, self._timeout_ns)
        expired: dict[tuple, tuple[int, int]] = defaultdict(lambda: (0, 0))
        for key, leaf in taken:
            if leaf.inflight:
                k = (ip_text(key.family, key.client), ip_text(key.family, key.server), bool(leaf.to_pod),
                     leaf.method, 0)
                expired[k] = (expired[k][0] + 1, 0)
                self.unanswered_expired += 1
                if sampled(leaf.ts, self._threshold):  # as the kernel samples those it counts
                    self._publish(http_request(key, wall_clock(leaf.ts), 0, leaf.method, 0, leaf.to_pod,
                                               leaf.ifindex, self._lines.pop((bytes(key), leaf.ts), None)))
        self._pending.add(expired)

    def metrics(self):
        out = [self.requests.counter("fovea_workload_http_requests",
                                     "HTTP/1.x requests between workloads, once per cluster")]
        bounds = bucket_bounds()
        pairs: dict[tuple, list[int]] = {}
        sums: dict[tuple, int] = defaultdict(int)
        for labels, (n, ns) in self.durations.values.items():
            *pair, bucket = labels
            counts = pairs.setdefault(tuple(pair), [0] * len(bounds))
            counts[min(int(bucket), len(bounds) - 1)] += n
            sums[tuple(pair)] += ns
        family = HistogramMetricFamily("fovea_workload_http_request_duration_seconds",
                                       "HTTP/1.x request's first byte to response's first byte, once per cluster",
                                       labels=PAIR_LABELS)
        for pair, counts in sorted(pairs.items()):
            cumulative, running = [], 0
            for le, n in zip(bounds, counts):
                running += n
                cumulative.append((le, running))
            family.add_metric(list(pair), cumulative, sums[pair] / 1e9)
        out.append(family)
        rejected = CounterMetricFamily("fovea_agent_http_rejected",
                                       "HTTP-port payloads that began like an HTTP message but were not one",
                                       labels=["reason"])
        for i, reason in enumerate(KERNEL_REJECTS):
            rejected.add_metric([reason], self._stats[i])
        out.append(rejected)
        unmatched = CounterMetricFamily("fovea_agent_http_unmatched_responses",
                                        "HTTP status lines with no request in flight on their connection")
        unmatched.add_metric([], self._stats[UNMATCHED])
        out.append(unmatched)
        pipelined = CounterMetricFamily("fovea_agent_http_pipelined_requests",
                                        "HTTP requests sent before the previous response (status_class none)")
        pipelined.add_metric([], self._stats[PIPELINED])
        out.append(pipelined)
        inside = GaugeMetricFamily("fovea_agent_http_datapath",
                                   "1 if HTTP is parsed inside the pods tc programs, 0 if it failed to load there")
        inside.add_metric([], 1.0 if self._maps is not None else 0.0)
        out.append(inside)
        return out

    def problem(self) -> str | None:
        if self._failed:
            return f"HTTP is not counted in the pods programs: {self._failed}"
        if self._maps is None:
            return "no tc program counts HTTP: the pods plugin is down"
        return None

    def health(self) -> PluginHealth:
        fill = {}
        if self._maps is not None:
            fill = {"pods/http_counts": self._maps.counts.fill_ratio,
                    "pods/http_durations": self._maps.durations.fill_ratio,
                    "pods/http_inflight": self._maps.inflight_entries / self._maps.inflight.max_entries}
        return PluginHealth(
            map_fill=fill,
            lost={"http_inflight_full": self._stats[INFLIGHT_FULL], "http_counts_full": self._stats[COUNTS_FULL],
                  "http_events": self._stats[EVENTS_FULL]},
            series={"fovea_workload_http_requests_total": len(self.requests)} if self._ctx else {},
            overflowed={"fovea_workload_http_requests_total": self.requests.overflowed} if self._ctx else {},
        )

    def close(self) -> None:
        self._maps = None
        if self._ctx is not None:
            self._records.flush()

    # -- sampled requests (the read loop) ---------------------------------------------

    def _on_event(self, _ctx, data, size) -> None:
        if size >= ct.sizeof(HttpPathEvent):  # a request line: its request's record follows
            line = ct.cast(data, ct.POINTER(HttpPathEvent)).contents
            if self._path_length:
                text = bytes(line.line[:min(line.length, LINE_MAX)])
                self._lines[(bytes(line.conn), line.ts)] = url_path(text, self._path_length)
                while len(self._lines) > MAX_WAITING_LINES:  # lines whose request was never counted here
                    self._lines.popitem(last=False)
            return
        if size < ct.sizeof(HttpEvent):
            return
        ev = ct.cast(data, ct.POINTER(HttpEvent)).contents
        self._publish(http_request(ev.conn, wall_clock(ev.ts), ev.duration, ev.method, ev.status, ev.to_pod,
                                   ev.ifindex, self._lines.pop((bytes(ev.conn), ev.ts), None)))

    def _publish(self, record: HttpRequest) -> None:
        if self._ctx is not None:
            self._records.publish(record)
            self.published += 1

    # -- the extension of the pods programs ---------------------------------------

    def cflags(self, program: str) -> list[str]:
        return list(self._cflags) if program == HOST else []

    def loaded(self, program: str, bpf) -> None:
        self._maps = _Maps(bpf, self._idle_reads, self._on_event)
        reads = self._saved.get("reads") if self._saved else None
        if reads and {"http_counts", "http_durations"} <= bpf.adopted:  # else the maps are new: so are their readers
            self._maps.counts.restore(reads["counts"])
            self._maps.durations.restore(reads["durations"])
        self._failed = ""
        log.info("counting HTTP in the %s programs (%s)", program, self._ports)

    def failed(self, program: str, why: str) -> None:
        self._failed = why
        log.error("HTTP is not counted in the %s programs: %s", program, why)

    def unloading(self, program: str) -> None:
        self._maps = None
