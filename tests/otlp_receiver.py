"""An OTLP trace receiver for tests: a real gRPC TraceService (opentelemetry-proto
+ grpcio) and an HTTP/protobuf endpoint, decoding what the exporter sends."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    name: str
    start_ns: int
    end_ns: int
    attributes: dict
    resource: dict
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    events: list[tuple[str, int, dict]]
    links: list[tuple[bytes, bytes]]  # (trace id, span id)
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes = b""  # empty for a root span

    @property
    def duration(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def error(self) -> bool:
        return self.status_code == 2


@dataclass
class Collected:
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        out = []
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(Span(
                        s.name, s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes), resource,
                        s.status.code, s.status.message,
                        [(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events],
                        [(link.trace_id, link.span_id) for link in s.links], s.trace_id, s.span_id,
                        s.parent_span_id,
                    ))
        with self.lock:
            self.spans.extend(out)
            self.requests += 1

    def where(self, **attrs) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if all(s.attributes.get(k) == v for k, v in attrs.items())]

    def wait(self, predicate, timeout: float = 30.0) -> list[Span]:
        """Spans matching `predicate`, once their number stops growing (or at the timeout)."""
        deadline = time.monotonic() + timeout
        last, stable = -1, 0
        while time.monotonic() < deadline:
            with self.lock:
                got = [s for s in self.spans if predicate(s)]
            stable = stable + 1 if len(got) == last and got else 0
            if stable >= 3:
                return got
            last = len(got)
            time.sleep(0.5)
        return got


class GrpcReceiver(Collected):
    def __init__(self, port: int = 0):
        super().__init__()
        collected = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collected.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


class HttpReceiver(Collected):
    def __init__(self, port: int = 0):
        super().__init__()
        collected = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                collected.add(req)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
