"""/metrics behind a Kubernetes bearer token, the kube-rbac-proxy way.

A TokenReview asks the API server whose token it is; a SubjectAccessReview
asks whether that user may `get` the non-resource URL /metrics (what
Prometheus' usual ClusterRole grants). Answers are cached for a while,
keyed by a hash of the token, so a scrape every few seconds costs the API
server two requests per TTL; an unreachable API server is never cached.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from kubernetes import client as k8s_client

log = logging.getLogger(__name__)


class TokenAccess:
    def __init__(self, api: k8s_client.ApiClient, ttl: float = 60.0, path: str = "/metrics",
                 max_entries: int = 1024, clock=time.monotonic):
        self.authn = k8s_client.AuthenticationV1Api(api)
        self.authz = k8s_client.AuthorizationV1Api(api)
        self.ttl = ttl
        self.path = path
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, int, str]] = {}

    def check(self, authorization: str | None) -> tuple[int, str]:
        """(HTTP status, why) for a request with this Authorization header: 200 lets it through."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401, "a bearer token is needed: Authorization: Bearer <Kubernetes token>"
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1], hit[2]
        try:
            code, why = self._review(token)
        except Exception as e:  # the API server is down or refuses us: say so, cache nothing
            log.warning("cannot review a /metrics token: %s", e)
            return 503, "cannot check the token with the Kubernetes API now; try again"
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                while len(self._cache) >= self.max_entries:
                    self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (now + self.ttl, code, why)
        return code, why

    def _review(self, token: str) -> tuple[int, str]:
        review = self.authn.create_token_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
            _request_timeout=10)
        status = review.status
        if not status or not status.authenticated or not status.user:
            return 401, "the token is not valid"
        user = status.user
        spec = {"user": user.username, "groups": user.groups or [], "uid": user.uid or "",
                "nonResourceAttributes": {"path": self.path, "verb": "get"}}
        if user.extra:
            spec["extra"] = user.extra
        sar = self.authz.create_subject_access_review(
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec},
            _request_timeout=10)
        if sar.status and sar.status.allowed:
            return 200, "ok"
        return 403, f"{user.username} may not get {self.path}"
