"""HTTP on the metrics port: /metrics, /healthz, /readyz, and finished hostPath
capture files under /captures/<uid>/<file>?token=<download token>."""

from __future__ import annotations

import errno
import os
import gzip
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.errors import FoveaError

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path, _, query = self.path.partition("?")
        if path.startswith("/captures/"):
            self._capture(path[len("/captures/"):], query)
            return
        if path == "/metrics":
            try:
                body, ctype, code = generate_latest(self.server.registry), CONTENT_TYPE_LATEST, 200
            except Exception:
                log.exception("scrape failed")
                body, ctype, code = b"scrape failed, see the agent log\n", "text/plain", 500
        elif path == "/healthz":
            ok, why = self.server.health()
            body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
        elif path == "/readyz":
            ok, why = self.server.ready()
            body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
        else:
            body, ctype, code = b"not found: try /metrics, /healthz or /readyz\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)  # Prometheus asks for it; 8x smaller
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _capture(self, key: str, query: str) -> None:
        """A capture file, only for its download token. The key is looked up, never joined
        to a path, so nothing outside the registered files can be reached."""
        token = parse_qs(query).get("token", [""])[0] or self.headers.get("X-Fovea-Token", "")
        lookup = self.server.captures
        path = lookup(key, token) if lookup is not None and _CAPTURE_KEY.fullmatch(key) else None
        if path is None:
            # One answer for "no such file" and "wrong token": nothing to probe.
            body = b"no capture file for this path and token\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def log_message(self, fmt, *args):
        log.debug("http: " + fmt, *args)


_CAPTURE_KEY = re.compile(r"[0-9a-f-]{1,64}/[A-Za-z0-9][A-Za-z0-9._-]{0,250}")


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    # captures(key, token) -> Path | None: set by the agent when it runs captures
    captures = None

    def __init__(self, address: str, port: int, registry: CollectorRegistry, health, ready):
        self.registry = registry
        self.health = health
        self.ready = ready
        try:
            super().__init__((address, port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FoveaError(
                    f"port {port} is already in use on {address}",
                    "stop the other process or pick another port with --port",
                ) from None
            raise FoveaError(f"cannot listen on {address}:{port}: {e.strerror}", "check --port and bindAddress") from None
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)

    def handle_error(self, request, client_address):
        # A client that went away mid-response (a timed-out probe) is not an agent error.
        log.debug("http client %s went away", client_address, exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
