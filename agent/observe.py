"""The live flow stream behind `fovea observe`: flows, drops, DNS transactions and HTTP requests.

The agent keeps the most recent records (named with pods and workloads) and
serves them on a Unix socket and on 127.0.0.1 only (DESIGN.md), as
newline-delimited JSON. Protocol: the client sends one JSON line

    {"last": 20, "follow": false, "filter": {"namespace": "shop", "port": 443}}

and reads one JSON record per line; without "follow" the server closes after
the last record. A follower that cannot keep up loses records (counted, and
told with a {"type": "lost"} line), never slows the agent down. A request that
is not valid (not JSON, a wrong type, an unknown key, longer than 64 KiB), or a
follower past `observe.maxFollowers`, gets one {"type": "error"} line and the
connection closes; nothing a client sends stops the stream for the others. The
client is agent/cli/observe.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import select
import socket
import socketserver
import threading
from datetime import datetime, timezone

from agent.events import DnsTransaction, DropEvent, FlowRecord, HttpRequest
from agent.supervise import Supervisor, fault

log = logging.getLogger(__name__)

FILTER_TYPES = {"namespace": str, "pod": str, "protocol": str, "port": int, "verdict": str, "dns": bool,
                "http": bool}
FILTER_KEYS = tuple(FILTER_TYPES)
REQUEST_TYPES = {"last": int, "follow": bool, "filter": dict}
MAX_REQUEST = 65536  # bytes of the request line
FOLLOWER_QUEUE = 10_000
CLIENT_TIMEOUT = 30  # seconds a client may take to send its request, or to take a line


_KIND = {int: "an integer", str: "a string", bool: "a boolean", dict: "an object"}


class BadRequest(ValueError):
    pass


def parse_request(line: bytes) -> tuple[dict, int, bool]:
    """(filter, last, follow) from a request line; BadRequest says what is wrong, in one line."""
    if len(line) >= MAX_REQUEST and not line.endswith(b"\n"):
        raise BadRequest(f"request longer than {MAX_REQUEST} bytes: send one JSON object on one line")
    try:
        req = json.loads(line or b"{}")
    except ValueError as e:
        raise BadRequest(f"request is not JSON ({e}): send one JSON object on one line") from None
    if not isinstance(req, dict):
        raise BadRequest(f"request is a JSON {type(req).__name__}, not an object: "
                         '{"last": 20, "follow": true, "filter": {...}}')
    _check_types(req, REQUEST_TYPES, "")
    filt = req.get("filter") or {}
    _check_types(filt, FILTER_TYPES, "filter.")
    if "port" in filt and not 0 <= filt["port"] <= 65535:
        raise BadRequest(f"filter.port {filt['port']} is not a port number (0-65535)")
    last = req.get("last") or 0
    if last < 0:
        raise BadRequest(f"last {last} is negative: the number of recent records to send, 0 for none")
    return {k: v for k, v in filt.items() if v not in (None, "", 0, False)}, last, bool(req.get("follow"))


def _check_types(obj: dict, types: dict, prefix: str) -> None:
    for key, value in obj.items():
        want = types.get(key)
        if want is None:
            raise BadRequest(f"unknown key {prefix}{key!r}: known keys are {', '.join(prefix + k for k in types)}")
        # bool is an int in Python; JSON true is no port number
        if value is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise BadRequest(f"{prefix}{key} is {json.dumps(value)[:40]}, not {_KIND[want]}")


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_address(attribution, address: str, port: int) -> dict:
    """An end of a flow: address, port, and what the attribution stage names it."""
    out: dict = {"address": address, "port": port}
    if attribution is None:
        return out
    e = attribution.endpoint(address)
    if e.namespace:
        out["namespace"] = e.namespace
    if e.pod:
        out["pod"] = e.pod
    out["workload"] = e.workload
    return out


def record_dict(record, attribution=None, node: str = "") -> dict | None:
    """A hub record as the JSON object `fovea observe -o json` prints."""
    if isinstance(record, FlowRecord):
        return {
            "type": "flow", "time": _time(record.end), "start": _time(record.start), "node": node,
            "verdict": _verdict(record), "protocol": record.transport,
            "source": describe_address(attribution, record.source, record.source_port),
            "destination": describe_address(attribution, record.destination, record.destination_port),
            "packets": record.packets, "bytes": record.bytes,
            "reply_packets": record.reply_packets, "reply_bytes": record.reply_bytes,
            "tcp_flags": _flags(record), "observer": record.observer,
            "final": record.final, "end_reason": record.end_reason, "flow_id": record.flow_id,
            "window": record.window, "connection": record.connection or None,
        }
    if isinstance(record, DropEvent):
        return {
            "type": "drop", "time": _time(record.time), "node": node, "verdict": "dropped",
            "protocol": record.transport, "reason": record.reason,
            "source": describe_address(attribution, record.source, record.source_port),
            "destination": describe_address(attribution, record.destination, record.destination_port),
            "packets": record.packets, "bytes": record.bytes,
        }
    if isinstance(record, DnsTransaction):
        return {
            "type": "dns", "time": _time(record.start), "node": node, "verdict": "forwarded",
            "protocol": record.transport,
            "source": describe_address(attribution, record.client, record.client_port),
            "destination": describe_address(attribution, record.server, record.server_port),
            "id": record.id, "qtype": record.qtype, "rcode": record.rcode, "name": record.name,
            "latency": record.duration, "answers": list(record.answers), "observer": record.observer,
        }
    if isinstance(record, HttpRequest):
        return {
            "type": "http", "time": _time(record.start), "node": node, "verdict": "forwarded", "protocol": "tcp",
            "source": describe_address(attribution, record.client, record.client_port),
            "destination": describe_address(attribution, record.server, record.server_port),
            "method": record.method, "path": record.path, "status_code": record.status_code,
            "latency": record.duration, "observer": record.observer,
        }
    return None


def _verdict(record: FlowRecord) -> str:
    """A connection attempt that failed is `refused` or `timeout` (`fovea observe --verdict`)."""
    return record.connection if record.connection in ("refused", "timeout") else "forwarded"


def _flags(record: FlowRecord) -> str:
    from agent.flows import tcp_flag_names  # not agent.traces: that imports the OpenTelemetry SDK

    return tcp_flag_names(record.tcp_flags) if record.transport == "tcp" else ""


def matches(d: dict, f: dict) -> bool:
    """Does record `d` pass filter `f` (the `fovea observe` flags)?"""
    ends = (d.get("source", {}), d.get("destination", {}))
    if f.get("namespace") and not any(e.get("namespace") == f["namespace"] for e in ends):
        return False
    if f.get("pod"):
        want = f["pod"]
        ns, _, name = want.rpartition("/")
        if not any(e.get("pod") == name and (not ns or e.get("namespace") == ns) for e in ends):
            return False
    if f.get("protocol") and d.get("protocol") != f["protocol"].lower():
        return False
    if f.get("port") and not any(e.get("port") == f["port"] for e in ends):
        return False
    if f.get("verdict") and d.get("verdict") != f["verdict"]:
        return False
    kinds = [kind for kind in ("dns", "http") if f.get(kind)]  # --dns --http: either
    if kinds and d.get("type") not in kinds:
        return False
    return True


class _Follower:
    def __init__(self, filt: dict):
        self.filter = filt
        self.queue: queue.Queue = queue.Queue(FOLLOWER_QUEUE)
        self.lost = 0


class ObserveServer:
    def __init__(self, cfg, hub, attribution=None, node: str = "", supervisor: Supervisor | None = None):
        self.cfg = cfg.observe
        self.supervisor = supervisor or Supervisor()
        self.attribution = attribution
        self.node = node
        self.recent: collections.deque = collections.deque(maxlen=self.cfg.buffer)
        self.lock = threading.Lock()
        self.followers: list[_Follower] = []
        self.hub = hub
        self.sub = hub.subscribe("observe", maxsize=self.cfg.buffer)
        self.servers: list[socketserver.BaseServer] = []
        self.errors: list[str] = []
        self.lost = 0  # records followers could not take
        self.refused = 0  # requests answered with an error
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listen()
        for t in self._threads:
            t.start()
        self._feeder = self.supervisor.thread("observe-feed", self._feed, self._stop)

    # -- listening ----------------------------------------------------------------

    def _listen(self) -> None:
        handler = self._handler_class()
        if self.cfg.socket:
            try:
                self.servers.append(_unix_server(self.cfg.socket, handler))
                log.info("flow stream on unix socket %s", self.cfg.socket)
            except OSError as e:
                self.errors.append(f"unix socket {self.cfg.socket}: {e.strerror or e}")
        if self.cfg.port:
            try:
                srv = _TcpServer(("127.0.0.1", self.cfg.port), handler)
                self.servers.append(srv)
                log.info("flow stream on 127.0.0.1:%d", self.cfg.port)
            except OSError as e:
                self.errors.append(f"127.0.0.1:{self.cfg.port}: {e.strerror or e}")
        for e in self.errors:  # the stream is optional: the agent goes on without it
            log.error("flow stream not served on %s", e)
        for srv in self.servers:
            self._threads.append(threading.Thread(target=srv.serve_forever, name="observe-listen", daemon=True))

    def _handler_class(self):
        server = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = CLIENT_TIMEOUT

            def handle(self):
                try:
                    server._serve(self.rfile, self.wfile, self.request)
                    self.wfile.flush()
                    _close_gently(self.request)
                except (OSError, ValueError):
                    pass  # the client went away or stalled (ValueError: its file was closed)
                except Exception as e:  # one client request never takes the stream down
                    server.supervisor.failed("observe-request", e)

        return Handler

    # -- records ------------------------------------------------------------------

    def _feed(self) -> None:
        while not self._stop.is_set():
            fault("observe-feed")  # tests only
            record = self.sub.get(timeout=0.5)
            if record is None:
                continue
            try:
                d = record_dict(record, self.attribution, self.node)
            except Exception as e:  # one bad record is skipped, and counted
                self.supervisor.failed("observe-record", e)
                continue
            if d is None:
                continue
            line = _line(d)
            with self.lock:
                self.recent.append(line)  # serialized: a few hundred bytes instead of nested dicts
                followers = list(self.followers)
            for f in followers:
                if matches(d, f.filter):
                    try:
                        f.queue.put_nowait(line)
                    except queue.Full:
                        f.lost += 1
                        self.lost += 1

    def _refuse(self, wfile, message: str) -> None:
        with self.lock:
            self.refused += 1
        _write(wfile, {"type": "error", "message": message})
        wfile.flush()

    def _serve(self, rfile, wfile, sock=None) -> None:
        fault("observe-request")  # tests only
        try:
            filt, last, follow = parse_request(rfile.readline(MAX_REQUEST))
        except BadRequest as e:
            self._refuse(wfile, f"bad request: {e}")
            return
        follower = _Follower(filt) if follow else None
        with self.lock:
            full = follower is not None and len(self.followers) >= self.cfg.maxFollowers
            if follower and not full:
                self.followers.append(follower)
            past = [line for line in self.recent if matches(json.loads(line), filt)][-last:] if last > 0 else []
        if full:
            self._refuse(wfile, f"too many followers ({self.cfg.maxFollowers}, observe.maxFollowers): "
                         "try again later, or ask without follow")
            return
        try:
            for line in past:
                wfile.write(line)
            wfile.flush()
            reported = 0
            while follower and not self._stop.is_set():
                try:
                    line = follower.queue.get(timeout=1.0)
                except queue.Empty:
                    if sock is not None and _hung_up(sock):
                        break  # a quiet stream: let go of a follower that left without a write failing
                    continue
                if follower.lost > reported:
                    _write(wfile, {"type": "lost", "records": follower.lost - reported})
                    reported = follower.lost
                wfile.write(line)
                wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client went away
        finally:
            if follower:
                with self.lock:
                    self.followers.remove(follower)

    def close(self) -> None:
        self._stop.set()
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()
        if self.cfg.socket and any(isinstance(s, _UnixServer) for s in self.servers):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.socket)
        self.hub.unsubscribe(self.sub)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"followers": len(self.followers), "lost": self.lost, "hub_full": self.sub.dropped,
                    "refused": self.refused}


def _hung_up(sock) -> bool:
    """Has the client closed its end? (Without waiting: the socket's timeout would apply to recv.)"""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _close_gently(sock) -> None:
    """End our side, and read what the client still sends (a bounded amount): closing
    with unread input would reset the connection before the client reads our error."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(1)
    left = 4 * MAX_REQUEST
    while left > 0 and (chunk := sock.recv(65536)):
        left -= len(chunk)


def _line(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode() + b"\n"


def _write(wfile, d: dict) -> None:
    wfile.write(_line(d))


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of clients waits in the backlog instead of being refused
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def _unix_server(path: str, handler) -> _UnixServer:
    """Bind the socket; a file left by an agent that died is replaced, a live one is not."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise OSError(98, "another agent is serving this socket")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    old = os.umask(0o077)  # flows name pods and peers: root only
    try:
        return _UnixServer(path, handler)
    finally:
        os.umask(old)
