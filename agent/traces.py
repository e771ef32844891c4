"""OTLP traces: flows, DNS transactions and HTTP requests as spans (DESIGN.md "Traces").

Records come from the event hub (agent/events.py) through a bounded queue;
one thread turns them into spans with the OpenTelemetry SDK; a bounded span
queue feeds the OTLP exporter (gRPC or HTTP/protobuf) on a thread of its own.
A collector that is down, slow or refusing costs queued spans, counted, and
never the readers: publishing to the hub never blocks, and memory here is
bounded by the two queues and the tables of drops and open flows.

An HTTP request's span is a child of its connection's span (the window that
holds the request), which is exported later, when that window is reported: the
connection's span ids are chosen when its first request comes (ReservedIds),
and the connection's requests and flow windows are sampled together.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import zlib

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                                 set_span_in_context)

from agent import __version__
from agent.events import CaptureReport, DnsTransaction, DropEvent, FlowRecord, HttpRequest
from agent.flows import tcp_flag_names
from agent.supervise import Supervisor, fault

log = logging.getLogger(__name__)

ERROR_RCODES = ("SERVFAIL", "REFUSED")
CONNECT_FAILURES = {"refused": "connection refused", "timeout": "connect timeout"}  # a span's error message
WORKLOAD_ATTRIBUTES = {  # owner kind -> semantic-convention attribute of its name
    "Deployment": "k8s.deployment.name", "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name", "ReplicaSet": "k8s.replicaset.name",
    "Job": "k8s.job.name", "CronJob": "k8s.cronjob.name",
}
MAX_DROP_KEYS = 10_000  # flows with drop events waiting for their span
MAX_DROPS_PER_FLOW = 16
RECORD_QUEUE = 10_000  # a full one loses records (fovea_agent_lost_events_total{source="records_otlp_queue_full"})
MAX_OPEN_FLOWS = 100_000  # span contexts of long flows, for the next window's link
MAX_REPORTED = 16_384  # TCP windows reported last, for an HTTP request published after its window
HTTP_METHOD_OTHER = "_OTHER"  # semantic conventions: a method the instrumentation does not know


def otlp_enabled(cfg) -> bool:
    """One switch: the config key, or the standard OTEL_TRACES_EXPORTER=otlp."""
    wanted = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return cfg.otlp.enabled or "otlp" in wanted


def otlp_protocol(cfg) -> str:
    return (cfg.otlp.protocol or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")


def make_exporter(cfg):
    """The SDK's OTLP exporter; endpoint, headers, TLS and timeout from the
    standard OTEL_EXPORTER_OTLP_* variables unless the config names an endpoint."""
    protocol = otlp_protocol(cfg)
    endpoint = cfg.otlp.endpoint or None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Reconnect within seconds once a collector that was down comes back.
        return OTLPSpanExporter(endpoint=endpoint, channel_options=(("grpc.max_reconnect_backoff_ms", 5000),))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
        return OTLPSpanExporter(endpoint=endpoint)
    from agent.errors import FoveaError

    raise FoveaError(f"OTLP protocol {protocol!r} is not supported", "use grpc or http/protobuf")


class BoundedExportProcessor(SpanProcessor):
    """Batches ended spans to the exporter from its own thread; when the queue
    is full, a span is dropped and counted (the SDK's batch processor drops
    without a count we could export)."""

    def __init__(self, exporter, queue_size: int, batch_size: int, flush_interval: float = 1.0,
                 supervisor: Supervisor | None = None):
        self.exporter = exporter
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self._stop = False
        self._deadline = float("inf")  # after shutdown: spans not sent by then are dropped
        # Restarted if it ever raises; it returns (and is not restarted) after shutdown().
        self.thread = (supervisor or Supervisor()).thread("otlp-export", self._run, threading.Event())

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span) -> None:
        with self.cond:
            if len(self.queue) >= self.queue_size:
                self.dropped += 1
                return
            self.queue.append(span)
            if len(self.queue) >= self.batch_size:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                if not self.queue and not self._stop:
                    self.cond.wait(self.flush_interval)
                if self._stop and (not self.queue or time.monotonic() > self._deadline):
                    self.dropped += len(self.queue)
                    self.queue.clear()
                    return
                batch = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
            if batch:
                self._export(batch)

    def _export(self, batch) -> None:
        try:
            ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
        except Exception as e:  # an exporter bug must not end the thread
            log.warning("OTLP export raised %s", e)
            ok = False
        with self.cond:
            if ok:
                self.exported += len(batch)
            else:
                self.failed += len(batch)

    def shutdown(self, grace: float = 5.0) -> None:
        """Send what is queued for up to `grace` seconds; drop (and count) the rest."""
        with self.cond:
            self._stop = True
            self._deadline = time.monotonic() + grace
            self.cond.notify()
        self.thread.join(timeout=grace + 1)
        self.exporter.shutdown()  # also ends an export retrying against a dead collector
        self.thread.join(timeout=5)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        while time.monotonic() < deadline:
            with self.cond:
                if not self.queue:
                    return True
                self.cond.notify()
            time.sleep(0.05)
        return False


class RateLimit:
    """A token bucket: at most `rate` per second, bursts of one second's worth."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.at = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _flow_key(transport: str, a: tuple[str, int], b: tuple[str, int]) -> tuple:
    return (transport, min(a, b), max(a, b))


def _bounded_put(table: collections.OrderedDict, key, value, size: int) -> None:
    """Put, forgetting the oldest entries past `size`."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > size:
        table.popitem(last=False)


def _connection_key(record) -> tuple | None:
    """The TCP connection of a flow record or an HTTP request (the same for both), else None."""
    if isinstance(record, HttpRequest):
        return _flow_key("tcp", (record.client, record.client_port), (record.server, record.server_port))
    if isinstance(record, FlowRecord) and record.transport == "tcp":
        return _flow_key("tcp", (record.source, record.source_port), (record.destination, record.destination_port))
    return None


_RANDOM = RandomIdGenerator()


class ReservedIds(RandomIdGenerator):
    """Random ids, except for the next span when one was reserved for it: a connection's
    span takes the ids its HTTP requests were given as their parent's."""

    def __init__(self):
        self.reserved: SpanContext | None = None

    def generate_trace_id(self) -> int:
        return self.reserved.trace_id if self.reserved else super().generate_trace_id()

    def generate_span_id(self) -> int:
        if self.reserved:
            span_id, self.reserved = self.reserved.span_id, None
            return span_id
        return super().generate_span_id()


class SpanBuilder:
    """Records -> spans, named by the attribution stage (pods, workloads, peers)."""

    def __init__(self, tracer, ids: ReservedIds, attribution=None):
        self.tracer = tracer
        self.ids = ids  # the tracer's id generator
        self.attribution = attribution
        # The span ids of TCP connections' windows, for their HTTP requests: chosen by a request
        # for the window to come, and those of the window reported last (with its last packet, ns).
        self._next: collections.OrderedDict[tuple, SpanContext] = collections.OrderedDict()
        self._reported: collections.OrderedDict[tuple, tuple[SpanContext, int]] = collections.OrderedDict()
        self._drops: collections.OrderedDict[tuple, list[DropEvent]] = collections.OrderedDict()
        self._links: collections.OrderedDict[int, object] = collections.OrderedDict()  # flow id -> SpanContext

    # -- naming ---------------------------------------------------------------------

    def endpoint_attributes(self, local: str, peer: str) -> dict:
        """The local end's pod under k8s.*, the other end under fovea.peer.*."""
        attrs: dict = {}
        if self.attribution is None:
            return attrs
        mine = self.attribution.endpoint(local)
        if mine.local:
            attrs["k8s.namespace.name"] = mine.namespace
            attrs["k8s.pod.name"] = mine.pod
            if mine.workload_kind in WORKLOAD_ATTRIBUTES:
                attrs[WORKLOAD_ATTRIBUTES[mine.workload_kind]] = mine.workload
            attrs["fovea.workload.kind"] = mine.workload_kind
            attrs["fovea.workload.name"] = mine.workload
        other = self.attribution.endpoint(peer)
        if other.namespace:
            attrs["fovea.peer.namespace"] = other.namespace
        attrs["fovea.peer.workload"] = other.workload
        if other.pod:
            attrs["fovea.peer.pod"] = other.pod
        return attrs

    @staticmethod
    def _network(source: str, sport: int, dest: str, dport: int, transport: str) -> dict:
        return {
            "network.transport": transport,
            "network.type": "ipv6" if ":" in source else "ipv4",
            "source.address": source, "source.port": sport,
            "destination.address": dest, "destination.port": dport,
        }

    # -- records --------------------------------------------------------------------

    def add_drop(self, d: DropEvent) -> None:
        key = _flow_key(d.transport, (d.source, d.source_port), (d.destination, d.destination_port))
        drops = self._drops.get(key)
        if drops is None:
            drops = self._drops[key] = []
            while len(self._drops) > MAX_DROP_KEYS:
                self._drops.popitem(last=False)
        if len(drops) < MAX_DROPS_PER_FLOW:
            drops.append(d)

    def flow_span(self, r: FlowRecord) -> None:
        local, peer = (r.source, r.destination) if r.observer == "source" else (r.destination, r.source)
        attrs = self._network(r.source, r.source_port, r.destination, r.destination_port, r.transport)
        attrs.update({
            "fovea.observer": r.observer,
            "fovea.flow.id": r.flow_id, "fovea.flow.window": r.window, "fovea.flow.end_reason": r.end_reason,
            "fovea.flow.packets": r.packets, "fovea.flow.bytes": r.bytes,
            "fovea.flow.reply_packets": r.reply_packets, "fovea.flow.reply_bytes": r.reply_bytes,
        })
        if r.transport == "tcp":
            attrs["fovea.tcp.flags"] = tcp_flag_names(r.tcp_flags)
        if r.connection:
            attrs["fovea.tcp.connection"] = r.connection
        attrs.update(self.endpoint_attributes(local, peer))
        links = []
        previous = self._links.pop(r.flow_id, None)
        if previous is not None:
            links.append(Link(previous, {"fovea.link": "previous window"}))
        name = "tcp connection" if r.transport == "tcp" else f"{r.transport} flow"
        connection = _connection_key(r)
        self.ids.reserved = self._next.pop(connection, None)  # the ids its requests named as their parent's
        span = self.tracer.start_span(name, start_time=_ns(r.start), kind=SpanKind.INTERNAL,
                                      attributes=attrs, links=links)
        self.ids.reserved = None
        if connection is not None:
            _bounded_put(self._reported, connection, (span.get_span_context(), _ns(r.end)), MAX_REPORTED)
        key = _flow_key(r.transport, (r.source, r.source_port), (r.destination, r.destination_port))
        for d in self._drops.pop(key, ()):
            span.add_event("drop", {"fovea.drop.reason": d.reason, "fovea.drop.packets": d.packets,
                                    "fovea.drop.bytes": d.bytes, "source.address": d.source,
                                    "destination.address": d.destination}, timestamp=_ns(d.time))
        failed = CONNECT_FAILURES.get(r.connection)
        if failed:
            span.set_status(Status(StatusCode.ERROR, failed))
        elif r.transport == "tcp" and r.tcp_flags & 0x04:
            span.set_status(Status(StatusCode.ERROR, "connection reset"))
        span.end(end_time=max(_ns(r.end), _ns(r.start)))
        if not r.final:
            self._links[r.flow_id] = span.get_span_context()
            while len(self._links) > MAX_OPEN_FLOWS:
                self._links.popitem(last=False)

    def dns_span(self, t: DnsTransaction) -> None:
        local, peer = (t.client, t.server) if t.observer == "source" else (t.server, t.client)
        attrs = self._network(t.client, t.client_port, t.server, t.server_port, t.transport)
        attrs.update({"fovea.observer": t.observer, "fovea.dns.id": t.id, "fovea.dns.qtype": t.qtype})
        if t.name is not None:
            attrs["dns.question.name"] = t.name
        if t.rcode is not None:
            attrs["fovea.dns.rcode"] = t.rcode
        if t.answers:
            attrs["fovea.dns.answers"] = list(t.answers)
        attrs.update(self.endpoint_attributes(local, peer))
        span = self.tracer.start_span(f"dns {t.qtype}", start_time=_ns(t.start), kind=SpanKind.INTERNAL,
                                      attributes=attrs)
        if t.rcode is None:
            span.set_status(Status(StatusCode.ERROR, "unanswered"))
        elif t.rcode in ERROR_RCODES:
            span.set_status(Status(StatusCode.ERROR, t.rcode))
        span.end(end_time=_ns(t.start) + _ns(t.duration or 0.0))  # exact: seconds since 1970 lose ns


    def _connection_span(self, key: tuple, start_ns: int) -> SpanContext:
        """The span of the connection's window that holds `start_ns`: the window reported
        last if the request began within it (a request published after that report),
        else the window to come, whose ids are chosen now."""
        reported = self._reported.get(key)
        if reported is not None and start_ns <= reported[1]:
            return reported[0]
        parent = self._next.get(key)
        if parent is None:
            parent = SpanContext(_RANDOM.generate_trace_id(), _RANDOM.generate_span_id(), is_remote=False,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            _bounded_put(self._next, key, parent, MAX_OPEN_FLOWS)
        return parent

    def http_span(self, t: HttpRequest) -> None:
        """A child of its connection's span, named by the semantic conventions' HTTP attributes."""
        local, peer = (t.client, t.server) if t.observer == "source" else (t.server, t.client)
        attrs = self._network(t.client, t.client_port, t.server, t.server_port, "tcp")
        attrs.update({"fovea.observer": t.observer,
                      "http.request.method": t.method if t.method != "OTHER" else HTTP_METHOD_OTHER})
        if t.status_code is not None:
            attrs["http.response.status_code"] = t.status_code
        if t.path is not None:
            attrs["url.path"] = t.path
        attrs.update(self.endpoint_attributes(local, peer))
        parent = self._connection_span(_connection_key(t), _ns(t.start))
        span = self.tracer.start_span(f"http {t.method}", context=set_span_in_context(NonRecordingSpan(parent)),
                                      start_time=_ns(t.start), kind=SpanKind.INTERNAL, attributes=attrs)
        if t.status_code is None:
            span.set_status(Status(StatusCode.ERROR, "no response"))
        elif t.status_code >= 500:
            span.set_status(Status(StatusCode.ERROR, str(t.status_code)))
        span.end(end_time=_ns(t.start) + _ns(t.duration or 0.0))

    def capture_span(self, c: CaptureReport) -> None:
        """This node's part of a capture run: what it captured, where the file went."""
        attrs = {"fovea.capture.kind": c.kind, "fovea.capture.name": c.name, "fovea.capture.uid": c.uid,
                 "fovea.capture.phase": c.phase, "fovea.capture.packets": c.packets,
                 "fovea.capture.bytes": c.bytes, "fovea.capture.dropped_packets": c.dropped_packets}
        if c.namespace:
            attrs["k8s.namespace.name"] = c.namespace
        if c.filter:
            attrs["fovea.capture.filter"] = c.filter
        if c.location:
            attrs["fovea.capture.location"] = c.location
        span = self.tracer.start_span(f"capture {c.name}", start_time=_ns(c.start), kind=SpanKind.INTERNAL,
                                      attributes=attrs)
        if c.phase != "Succeeded":
            span.set_status(Status(StatusCode.ERROR, c.message or c.phase))
        span.end(end_time=max(_ns(c.end), _ns(c.start)))


class TraceExporter:
    """The hub consumer that turns records into exported spans."""

    def __init__(self, cfg, hub, attribution=None, exporter=None, supervisor: Supervisor | None = None):
        self.cfg = cfg
        resource = Resource.create({"service.name": "fovea", "service.version": __version__,
                                    "k8s.node.name": cfg.node})
        self.supervisor = supervisor or Supervisor()
        self.processor = BoundedExportProcessor(exporter or make_exporter(cfg), cfg.otlp.queueSize,
                                                cfg.otlp.batchSize, supervisor=self.supervisor)
        ids = ReservedIds()
        self.provider = TracerProvider(resource=resource, id_generator=ids)
        self.provider.add_span_processor(self.processor)
        self.builder = SpanBuilder(self.provider.get_tracer("fovea", __version__), ids, attribution)
        self.limit = RateLimit(cfg.otlp.maxSpansPerSecond)
        self.ratio = cfg.otlp.sampleRatio
        self.sampled_out = 0
        self.rate_limited = 0
        self.errors = 0
        self.hub = hub
        self.sub = hub.subscribe("otlp", maxsize=RECORD_QUEUE)  # records waiting to become spans
        self._stop = threading.Event()
        self.thread = self.supervisor.thread("otlp-spans", self._run, self._stop)
        log.info("exporting spans over OTLP (%s)", otlp_protocol(cfg))

    def _sampled(self, record) -> bool:
        if self.ratio >= 1:
            return True
        connection = _connection_key(record)
        if connection is not None:  # a TCP connection's windows and HTTP requests together, or none
            return random.Random(zlib.crc32(repr(connection).encode())).random() < self.ratio
        if isinstance(record, FlowRecord):  # every window of a flow, or none
            return random.Random(record.flow_id).random() < self.ratio
        return random.random() < self.ratio

    def handle(self, record) -> None:
        if isinstance(record, DropEvent):
            self.builder.add_drop(record)
            return
        if isinstance(record, CaptureReport):  # rare and asked for: never sampled out
            self.builder.capture_span(record)
            return
        if not isinstance(record, (FlowRecord, DnsTransaction, HttpRequest)):
            return
        if not self._sampled(record):
            self.sampled_out += 1
            return
        if not self.limit.allow():
            self.rate_limited += 1
            return
        if isinstance(record, FlowRecord):
            self.builder.flow_span(record)
        elif isinstance(record, HttpRequest):
            self.builder.http_span(record)
        else:
            self.builder.dns_span(record)

    def _run(self) -> None:
        while not self._stop.is_set():
            fault("otlp-spans")  # tests only
            record = self.sub.get(timeout=0.5)
            if record is None:
                continue
            try:
                self.handle(record)
            except Exception as e:  # one bad record never ends the exporter
                self.errors += 1
                self.supervisor.failed("otlp-record", e)

    def counts(self) -> dict[str, int]:
        p = self.processor
        return {"exported": p.exported, "failed": p.failed, "queue_full": p.dropped,
                "rate_limit": self.rate_limited, "records_lost": self.sub.dropped,
                "sampled_out": self.sampled_out, "queued": len(p.queue)}

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        while (record := self.sub.get(timeout=0)) is not None:  # what the readers published last
            self.handle(record)
        self.hub.unsubscribe(self.sub)
        self.provider.shutdown()
