"""A Kubernetes API that stores nothing: list pages and watch events generated on demand.

tests/k8s_emulator.py keeps every object (about 15 KB of Python a pod), so a
150,000-pod cluster would cost it ~2.3 GB and minutes to build. This server
makes object i of a kind from its index (`make(i) -> dict`) only when a page
asks for it, so a cluster of any size costs nothing until listed. It serves
what the agent's cache uses (agent/k8s/listwatch.py):

- GET /api/v1/{plural}?limit=&continue= : pages (the continue token is the next
  index), one resourceVersion for the whole list;
- the same with fieldSelector=spec.nodeName=X for pods (`node_of(i)` decides);
- watch=true : a stream that stays open for timeoutSeconds; for pods it carries
  the events that POST /bench/events {"n", "seed"} asks `events(n, seed)` to make
  (here, so that the process under measurement never holds them).

It runs in a process of its own (start() forks), so that the process under
measurement holds only what it keeps.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import requests
import yaml

RESOURCE_VERSION = "1000"


class Kind:
    def __init__(self, plural: str, list_kind: str, count: int, make: Callable[[int], dict],
                 node_of: Callable[[int], str] | None = None):
        self.plural, self.list_kind, self.count, self.make, self.node_of = plural, list_kind, count, make, node_of


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, kinds: dict[str, Kind], events: Callable[[int, int], tuple[list[dict], str]]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kinds, self.events = kinds, events
        self.cond = threading.Condition()
        self.batches: list[list[bytes]] = []  # pod watch events, each a JSON line


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # a watch is chunked, as the API server's: the client reads it chunk by chunk

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        kind = self.server.kinds.get(url.path.rsplit("/", 1)[-1])
        if kind is None or not url.path.startswith("/api/v1/"):
            return self._send(404, {"kind": "Status", "code": 404, "message": f"no {url.path} here"})
        node = q.get("fieldSelector", "").removeprefix("spec.nodeName=") or None
        if q.get("watch", "").lower() == "true":  # the Python client sends "True"
            return self._watch(kind, float(q.get("timeoutSeconds", "60")))
        indexes = range(kind.count) if node is None else [i for i in range(kind.count) if kind.node_of(i) == node]
        start, limit = int(q.get("continue") or 0), int(q.get("limit") or 0) or kind.count
        page = indexes[start:start + limit]
        items = [json.dumps(kind.make(i), separators=(",", ":")).encode() for i in page]
        nxt = start + limit if start + limit < len(indexes) else None
        meta = {"resourceVersion": RESOURCE_VERSION}
        if nxt is not None:
            meta["continue"] = str(nxt)
        head = json.dumps({"kind": kind.list_kind, "apiVersion": "v1", "metadata": meta})[:-1].encode()
        self._send_bytes(200, head + b',"items":[' + b",".join(items) + b"]}")

    def _watch(self, kind: Kind, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        deadline = time.monotonic() + timeout
        seen = len(self.server.batches)
        cond = self.server.cond
        try:
            while time.monotonic() < deadline:
                with cond:
                    cond.wait_for(lambda: len(self.server.batches) > seen, deadline - time.monotonic())
                    new = self.server.batches[seen:] if kind.plural == "pods" else []
                    seen = len(self.server.batches)
                for batch in new:
                    for line in batch:  # a chunk an event, as the API server sends them
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        if self.path != "/bench/events":
            return self._send(404, {"message": "POST /bench/events only"})
        ask = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        events, last_ip = self.server.events(ask["n"], ask["seed"])
        batch = [json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events]
        with self.server.cond:
            self.server.batches.append(batch)
            self.server.cond.notify_all()
        self._send(200, {"events": len(events), "bytes": sum(map(len, batch)), "last_ip": last_ip})

    def _send(self, code: int, doc: dict) -> None:
        self._send_bytes(code, json.dumps(doc).encode())

    def _send_bytes(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(kinds: dict[str, Kind], events, port_out) -> None:
    server = _Server(kinds, events)
    port_out.send(server.server_address[1])
    server.serve_forever()


class SyntheticApi:
    """start() forks the server; url, write_kubeconfig(), post_events(), stop()."""

    def __init__(self, kinds: list[Kind], events: Callable[[int, int], tuple[list[dict], str]]):
        self.kinds = {k.plural: k for k in kinds}
        self.events = events
        self.url = ""
        self._proc: multiprocessing.Process | None = None

    def start(self) -> "SyntheticApi":
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.kinds, self.events, child), daemon=True, name="k8s-synthetic")
        self._proc.start()
        if not parent.poll(30):
            raise RuntimeError("the synthetic API server did not start")
        self.url = f"http://127.0.0.1:{parent.recv()}"
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(10)

    def write_kubeconfig(self, path: Path) -> Path:
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "synthetic",
               "clusters": [{"name": "synthetic", "cluster": {"server": self.url}}],
               "users": [{"name": "synthetic", "user": {}}],
               "contexts": [{"name": "synthetic", "context": {"cluster": "synthetic", "user": "synthetic"}}]}
        path.write_text(yaml.safe_dump(doc))
        return path

    def post_events(self, n: int, seed: int) -> dict:
        """n pod watch events, made and sent by the server: {"events", "bytes", "last_ip"}."""
        r = requests.post(f"{self.url}/bench/events", data=json.dumps({"n": n, "seed": seed}), timeout=600)
        r.raise_for_status()
        return r.json()
