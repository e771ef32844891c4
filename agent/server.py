"""HTTP(S) on the metrics port: /metrics, /healthz, /readyz, and finished hostPath
capture files under /captures/<uid>/<file>, for the download token in the
X-Fovea-Token header.

/metrics may ask for a Kubernetes token (agent/auth.py); the probes never do,
so the kubelet reaches them without credentials. Capture files carry their own
download token, only ever in a header: the API server's audit log and proxies
keep URLs, so a token in the URL is refused.
"""

from __future__ import annotations

import errno
import os
import gzip
import logging
import re
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.errors import FoveaError

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"
    timeout = 30  # a client that stalls (TLS handshake included) frees its thread

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path, _, query = self.path.partition("?")
        if path.startswith("/captures/"):
            self._capture(path[len("/captures/"):], query)
            return
        headers = {}
        if path == "/metrics":
            code, why = self.server.authorize(self.headers.get("Authorization")) if self.server.authorize else (200, "")
            if code != 200:
                body, ctype = (why + "\n").encode(), "text/plain"
                if code == 401:
                    headers["WWW-Authenticate"] = 'Bearer realm="fovea"'
            else:
                try:
                    body, ctype = generate_latest(self.server.registry), CONTENT_TYPE_LATEST
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
        for k, v in headers.items():
            self.send_header(k, v)
        if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)  # Prometheus asks for it; 8x smaller
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _capture(self, key: str, query: str) -> None:
        """A capture file, only for its download token. The key is looked up, never joined
        to a path, so nothing outside the registered files can be reached."""
        if "token" in parse_qs(query, keep_blank_values=True):
            self._plain(400, "the download token goes in the X-Fovea-Token header, never in the URL (audit logs "
                             "and proxies keep URLs): use kubectl fovea capture download")
            return
        token = self.headers.get(TOKEN_HEADER, "")
        lookup = self.server.captures
        path = lookup(key, token) if lookup is not None and _CAPTURE_KEY.fullmatch(key) else None
        if path is None:
            # One answer for "no such file" and "wrong token": nothing to probe.
            self._plain(404, "no capture file for this path and token (an expired file is gone: see the "
                             "capture's status)")
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}"')
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _plain(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("http: " + fmt, *args)


TOKEN_HEADER = "X-Fovea-Token"  # the download token of a capture file: a header, never a query parameter
_CAPTURE_KEY = re.compile(r"[0-9a-f-]{1,64}/[A-Za-z0-9][A-Za-z0-9._-]{0,250}")


class TlsFiles:
    """A server-side TLS context from PEM files, loaded again when the certificate
    file changes (cert-manager and kubelet replace Secret files in place)."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self._stamp = None
        self._context = None
        self.context()  # a bad certificate fails at start, not at the first scrape

    def context(self) -> ssl.SSLContext:
        try:
            st = os.stat(self.cert_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            if self._context is not None:
                return self._context
            raise FoveaError(f"cannot read TLS certificate {self.cert_file}: {e.strerror}", "check tls.certFile") from None
        if stamp != self._stamp:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                if self._context is not None:  # half-replaced files: keep serving with the old pair
                    log.warning("TLS files changed but do not load yet: %s", e)
                    return self._context
                raise FoveaError(f"cannot load TLS certificate {self.cert_file} with key {self.key_file}: {e}",
                                 "check tls.certFile and tls.keyFile (PEM)") from None
            self._context, self._stamp = ctx, stamp
        return self._context


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    # captures(key, token) -> Path | None: set by the agent when it runs captures
    captures = None

    def __init__(self, address: str, port: int, registry: CollectorRegistry, health, ready,
                 tls: TlsFiles | None = None, authorize=None):
        self.registry = registry
        self.health = health
        self.ready = ready
        self.tls = tls
        self.authorize = authorize  # Authorization header -> (HTTP status, why), or None: open
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

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake runs on the request's own thread (first read), not on the accept loop.
            sock = self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        # A client that went away mid-response (a timed-out probe, a failed handshake) is not an agent error.
        log.debug("http client %s went away", client_address, exc_info=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
