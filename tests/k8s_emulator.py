"""A small, faithful Kubernetes API server emulator for tests.

No real API server can run here, so tests talk HTTP to this one with the real
`kubernetes` Python client and the real `kubectl`. It keeps objects as plain
JSON dicts in memory and behaves like the API server where Fovea depends on
it: list and watch with label and field selectors, resourceVersion, watch
resume, 410 Expired after compaction, bookmarks, optimistic concurrency,
merge patches, the status subresource, Status errors, discovery, the pod
proxy, and an outage that cuts open watches.

    api = K8sEmulator().start()
    api.register("fovea.dev", "v1alpha1", "captures", "Capture", namespaced=True)
    api.create(make_namespace("shop"))
    api.create(make_pod("web-1", "shop", node="node-a", ip="10.1.1.2"))
    client = kubernetes.client.ApiClient(api.client_configuration())
    ...
    api.stop(); api.start()        # an outage: watches are cut, state is kept
    api.compact()                  # older resourceVersions now answer 410

Simplifications (each chosen because no Fovea code path depends on more):
- strategic-merge-patch is applied as a JSON merge patch (lists are replaced,
  not merged by key); server-side apply (apply-patch+yaml) answers 415;
- every object is deleted at once unless it has finalizers (then it gets a
  deletionTimestamp, and goes when the last finalizer is removed); pods have
  no grace period (use `terminate()` to show a terminating pod); deleting a
  namespace deletes what it holds at once;
- list always reads the newest state (resourceVersion and
  resourceVersionMatch are ignored), and a `continue` page reads the newest
  state after the last key returned, not a snapshot;
- a watch without resourceVersion (or "0") starts with synthetic ADDED events
  of the current objects, as the real server does; sendInitialEvents is not
  supported;
- one history of events for all types, with one compaction floor (etcd's);
- the pod proxy forwards to 127.0.0.1:<port> (tests run agents on loopback),
  not to the pod IP;
- no admission, defaulting or schema validation beyond names and a
  `validate` hook per registered type (updates ratchet: only errors the
  stored object did not have are refused); protobuf is never spoken
  (clients fall back to JSON).
"""

from __future__ import annotations

import base64
import bisect
import copy
import datetime
import http.client
import json
import random
import re
import socket
import ssl
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fovea-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


# --- resource types -----------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ("status",)
    # extra field selectors the real server accepts for this type (beyond metadata.*)
    field_labels: tuple[str, ...] = ()
    # validate(obj) -> list of messages; a non-empty list answers 422 Invalid
    validate: Callable[[dict], list[str]] | None = field(default=None, compare=False, hash=False)
    # a CRD's additionalPrinterColumns: what `kubectl get` shows (Name, then these)
    columns: tuple[dict, ...] = field(default=(), compare=False, hash=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


BUILTIN_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",),
                 ("status", "finalize"), ("status.phase",)),
    ResourceType("", "v1", "nodes", "Node", False, "node", ("no",), ("status", "proxy"), ("spec.unschedulable",)),
    ResourceType("", "v1", "pods", "Pod", True, "pod", ("po",), ("status", "proxy", "log"),
                 ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                  "spec.hostNetwork", "status.phase", "status.podIP", "status.podIPs", "status.nominatedNodeName")),
    ResourceType("", "v1", "services", "Service", True, "service", ("svc",), ("status", "proxy"),
                 ("spec.clusterIP", "spec.type")),
    ResourceType("", "v1", "secrets", "Secret", True, "secret", (), (), ("type",)),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",), ()),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, "endpointslice", (), ()),
    # create-only reviews, answered from add_user() and allow_url(), never stored
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, "tokenreview", (), ()),
    ResourceType("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", False,
                 "subjectaccessreview", (), ()),
)
REVIEWS = ("tokenreviews", "subjectaccessreviews")


class ApiError(Exception):
    """An API error, carried as the Status object the real server sends."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
             "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            s["details"] = self.details
        return s


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.group_resource} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def _conflict(rt: ResourceType, name: str, why: str = "") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.group_resource} "{name}": '
                    + (why or "the object has been modified; please apply your changes to the latest "
                       "version and try again"), {"name": name, "group": rt.group, "kind": rt.plural})


def _invalid(rt: ResourceType, name: str, causes: list[str]) -> ApiError:
    return ApiError(422, "Invalid", f'{rt.kind} "{name}" is invalid: {"; ".join(causes)}',
                    {"name": name, "group": rt.group, "kind": rt.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": c} for c in causes]})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


# --- selectors ----------------------------------------------------------------------------

def _split_outside_parens(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[tuple[str, str, frozenset[str]]]:
    """Requirements (key, op, values) with op in =, !=, in, notin, exists, !exists."""
    reqs = []
    for term in _split_outside_parens(text or ""):
        m = re.fullmatch(r"(\S+?)\s+(in|notin)\s*\((.*)\)", term)
        if m:
            key, op, values = m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(","))
        elif term.startswith("!"):
            key, op, values = term[1:].strip(), "!exists", frozenset()
        elif "!=" in term:
            key, _, v = term.partition("!=")
            op, values = "!=", frozenset([v.strip()])
        elif "==" in term or "=" in term:
            key, _, v = term.partition("==") if "==" in term else term.partition("=")
            op, values = "=", frozenset([v.strip()])
        else:
            key, op, values = term, "exists", frozenset()
        key = key.strip()
        if not _LABEL_KEY.fullmatch(key):
            raise _bad_request(f"unable to parse requirement: invalid label key {key!r} in selector {text!r}")
        reqs.append((key, op, values))
    return reqs


def labels_match(reqs, labels: dict | None) -> bool:
    labels = labels or {}
    for key, op, values in reqs:
        has = key in labels
        if op == "exists" and not has or op == "!exists" and has:
            return False
        if op in ("=", "in") and (not has or labels[key] not in values):
            return False
        if op in ("!=", "notin") and has and labels[key] in values:
            return False
    return True


def parse_field_selector(text: str | None, rt: ResourceType) -> list[tuple[str, str, str]]:
    reqs = []
    allowed = ("metadata.name", "metadata.namespace") + rt.field_labels
    for term in _split_outside_parens(text or ""):
        if "!=" in term:
            key, _, value = term.partition("!=")
            op = "!="
        elif "==" in term or "=" in term:
            key, _, value = term.partition("==") if "==" in term else term.partition("=")
            op = "="
        else:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        key = key.strip()
        if key not in allowed:
            raise _bad_request(f'field label not supported: {key}')
        reqs.append((key, op, value.strip()))
    return reqs


def field_value(obj: dict, path: str) -> str:
    """A field as the real server's field selectors see it: missing is "", bools are lowercase."""
    node = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if path == "status.podIPs":
        node = ",".join(p.get("ip", "") for p in node or [])
    if isinstance(node, bool):
        return "true" if node else "false"
    return "" if node is None else str(node)


def fields_match(reqs, obj: dict) -> bool:
    for key, op, value in reqs:
        if (field_value(obj, key) == value) != (op == "="):
            return False
    return True


# --- patches ------------------------------------------------------------------------------

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: a new object; null deletes a key, lists are replaced."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _bad_request(f"json patch: bad path {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc, ops: list) -> dict:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def walk(parts):
        node = doc
        for p in parts:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node

    def remove(parts):
        parent = walk(parts[:-1])
        return parent.pop(int(parts[-1]) if isinstance(parent, list) else parts[-1])

    def add(parts, value):
        nonlocal doc
        if not parts:
            doc = value
            return
        parent = walk(parts[:-1])
        if isinstance(parent, list):
            idx = len(parent) if parts[-1] == "-" else int(parts[-1])
            parent.insert(idx, value)
        else:
            parent[parts[-1]] = value

    if not isinstance(ops, list):
        raise _bad_request("json patch: the body must be a list of operations")
    try:
        for op in ops:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "add":
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(parts)
            elif kind == "replace":
                remove(parts)
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "move":
                add(parts, remove(_pointer(op["from"])))
            elif kind == "copy":
                add(parts, copy.deepcopy(walk(_pointer(op["from"]))))
            elif kind == "test":
                if walk(parts) != op["value"]:
                    raise ApiError(422, "Invalid", f"json patch: test failed at {op['path']}")
            else:
                raise _bad_request(f"json patch: unknown op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ApiError(422, "Invalid", f"json patch: cannot apply: {e!r}") from None
    return doc


# --- the store ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One API request, named as RBAC names it."""
    method: str
    path: str
    query: dict
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection; or the HTTP verb
    group: str
    resource: str  # "" for non-resource URLs (/api, /version, ...)
    subresource: str
    namespace: str
    name: str
    code: int
    user_agent: str = ""  # who asked (the agent, kubectl, the plugin...)


@dataclass(frozen=True)
class _Event:
    rv: int
    rtype: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _key(obj: dict) -> tuple[str, str]:
    m = _meta(obj)
    return m.get("namespace", ""), m.get("name", "")


def _spec_part(obj: dict) -> dict:
    """What a generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


class K8sEmulator:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", token: str | None = None,
                 bookmark_interval: float = 1.0, history_limit: int = 100_000,
                 watch_timeout: float = 1800.0):
        self.host = host
        self.port = port
        self.token = token
        self.bookmark_interval = bookmark_interval  # seconds between BOOKMARK events
        self.history_limit = history_limit  # events kept for watch resume (then compacted)
        self.watch_timeout = watch_timeout  # a watch without timeoutSeconds ends after this
        self._cond = threading.Condition()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._objects: dict[ResourceType, dict[tuple[str, str], dict]] = {}
        self._rv = 1
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._floor = self._rv  # watches from a resourceVersion below this get 410
        self._next_ip = 1
        self._requests: list[Request] = []
        self._rbac: tuple[list[dict], dict[str, list[dict]]] | None = None
        self._users: dict[str, dict] = {}  # bearer token -> TokenReview status.user
        self._url_grants: set[tuple[str, str, str]] = set()  # (user or group, verb, non-resource path)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._epoch = 0  # bumped by stop(): open watches of an older epoch end
        for rt in BUILTIN_TYPES:
            self._add_type(rt)

    # --- lifecycle

    def start(self) -> "K8sEmulator":
        """Listen (again, on the same port after stop(): the state is kept, like etcd's)."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"k8s-emulator-{self.port}",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """An outage: stop listening and cut every open connection, watches included."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        server.cut_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> "K8sEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    # --- clients

    def client_configuration(self, token: str | None = None):
        """A kubernetes.client.Configuration for this server (no retries: tests see failures at once)."""
        import kubernetes.client

        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.retries = 0
        tok = token if token is not None else self.token
        if tok:
            cfg.api_key = {"authorization": f"Bearer {tok}"}  # the prefix inline: client versions differ
        return cfg

    def write_kubeconfig(self, path: str | Path, token: str | None = None, namespace: str = "default",
                         context: str = "emulator") -> Path:
        user: dict = {}
        tok = token if token is not None else self.token
        if tok:
            user["token"] = tok
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": context, "preferences": {},
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context,
                                                       "namespace": namespace}}],
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(doc))
        return path

    # --- types

    def register(self, group: str, version: str, plural: str, kind: str, namespaced: bool, *,
                 singular: str = "", short_names: tuple[str, ...] = (), status: bool = True,
                 validate: Callable[[dict], list[str]] | None = None,
                 columns: tuple[dict, ...] = ()) -> ResourceType:
        """A custom resource type, e.g. register("fovea.dev", "v1alpha1", "captures", "Capture", True)."""
        rt = ResourceType(group, version, plural, kind, namespaced, singular or kind.lower(), tuple(short_names),
                          ("status",) if status else (), (), validate, tuple(columns))
        self._add_type(rt)
        return rt

    def register_crd(self, crd: dict, validate: Callable[[dict], list[str]] | None = None) -> ResourceType:
        """A type from a CustomResourceDefinition (the served version); validate(obj) stands in
        for the server's schema and CEL checks, which this emulator does not evaluate itself."""
        spec = crd["spec"]
        names, version = spec["names"], next(v for v in spec["versions"] if v.get("served", True))
        return self.register(spec["group"], version["name"], names["plural"], names["kind"],
                             spec["scope"] == "Namespaced", singular=names.get("singular", ""),
                             short_names=tuple(names.get("shortNames") or ()),
                             status="status" in (version.get("subresources") or {}), validate=validate,
                             columns=tuple(version.get("additionalPrinterColumns") or ()))

    def _add_type(self, rt: ResourceType) -> None:
        with self._cond:
            self._types[(rt.group, rt.version, rt.plural)] = rt
            self._objects.setdefault(rt, {})

    def resource_type(self, ref) -> ResourceType:
        """A type by ResourceType, plural ("pods"), plural.group ("captures.fovea.dev") or kind ("Pod")."""
        if isinstance(ref, ResourceType):
            return ref
        for rt in self._types.values():
            if ref in (rt.plural, rt.group_resource, rt.kind) or ref.lower() == rt.kind.lower():
                return rt
        raise KeyError(f"no resource type {ref!r} registered")

    def _type_of(self, obj: dict) -> ResourceType:
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        for rt in self._types.values():
            if rt.api_version == api_version and rt.kind == kind:
                return rt
        raise KeyError(f"no resource type for apiVersion {api_version!r} kind {kind!r}")

    # --- control from tests (these generate watch events like API writes do)

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def create(self, obj: dict) -> dict:
        """Create as a controller would: the status given is kept."""
        return copy.deepcopy(self._create(self._type_of(obj), copy.deepcopy(obj), keep_status=True))

    def update(self, obj: dict, check_resource_version: bool = False) -> dict:
        """Replace an object, status included (as the kubelet or a controller would)."""
        rt = self._type_of(obj)
        obj = copy.deepcopy(obj)
        if not check_resource_version:
            obj.setdefault("metadata", {}).pop("resourceVersion", None)
        ns, name = _key(obj)
        return copy.deepcopy(self._update(rt, ns, name, obj, part="all"))

    def patch(self, ref, name: str, patch: dict, namespace: str = "") -> dict:
        """Merge-patch an object, status included."""
        rt = self.resource_type(ref)
        return copy.deepcopy(self._patch(rt, namespace, name, patch, "application/merge-patch+json", part="all"))

    def delete(self, ref, name: str, namespace: str = "") -> dict:
        return copy.deepcopy(self._delete(self.resource_type(ref), namespace, name, {}))

    def terminate(self, name: str, namespace: str) -> dict:
        """Mark a pod terminating (deletionTimestamp set), as a graceful delete does first."""
        return self.patch("pods", name, {"metadata": {"deletionTimestamp": _now(),
                                                      "deletionGracePeriodSeconds": 30}}, namespace)

    def get(self, ref, name: str, namespace: str = "") -> dict | None:
        rt = self.resource_type(ref)
        with self._cond:
            obj = self._objects[rt].get((namespace if rt.namespaced else "", name))
            return copy.deepcopy(obj)

    def list(self, ref, namespace: str | None = None) -> list[dict]:
        rt = self.resource_type(ref)
        with self._cond:
            return [copy.deepcopy(o) for k, o in sorted(self._objects[rt].items())
                    if namespace is None or k[0] == namespace]

    def compact(self) -> None:
        """Forget the event history: watches and continue tokens from older versions get 410."""
        with self._cond:
            self._history.clear()
            self._history_rvs.clear()
            self._floor = self._rv

    # --- request log and RBAC

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def permissions_used(self, user_agent: str | None = None) -> set[tuple[str, str, str]]:
        """(verb, group, resource[/subresource]) of every resource request seen (from clients whose
        User-Agent starts with `user_agent`, if given): what RBAC must allow."""
        return {(r.verb, r.group, r.resource + (f"/{r.subresource}" if r.subresource else ""))
                for r in self.requests if r.resource
                and (user_agent is None or r.user_agent.startswith(user_agent))}

    def set_rbac(self, rules: list[dict] | None, namespace_rules: dict[str, list[dict]] | None = None) -> None:
        """Allow only these PolicyRules (a ClusterRole's, plus Roles' per namespace); None: allow all.

        Rules are Kubernetes PolicyRule dicts: apiGroups, resources ("pods/proxy" for a
        subresource), verbs, optional resourceNames; "*" matches anything.
        """
        with self._cond:
            self._rbac = None if rules is None else (list(rules), dict(namespace_rules or {}))

    def _allowed(self, req: Request) -> bool:
        with self._cond:
            rbac = self._rbac
        if rbac is None or not req.resource:
            return True  # discovery and /version are open to every authenticated user
        cluster_rules, ns_rules = rbac
        rules = cluster_rules + (ns_rules.get(req.namespace, []) if req.namespace else [])
        resource = req.resource + (f"/{req.subresource}" if req.subresource else "")
        for r in rules:
            if (_any(r.get("verbs"), req.verb) and _any(r.get("apiGroups"), req.group)
                    and _any(r.get("resources"), resource)
                    and (not r.get("resourceNames") or req.name in r["resourceNames"])):
                return True
        return False

    def add_user(self, token: str, username: str, groups: tuple[str, ...] = ()) -> None:
        """A token that TokenReviews authenticate as this user."""
        with self._cond:
            self._users[token] = {"username": username, "uid": f"uid-{username}", "groups": list(groups)}

    def allow_url(self, subject: str, verb: str, path: str) -> None:
        """SubjectAccessReviews allow this user (or group) `verb` on a non-resource URL."""
        with self._cond:
            self._url_grants.add((subject, verb, path))

    def _review(self, rt: ResourceType, body: dict) -> dict:
        spec = body.get("spec") or {}
        with self._cond:
            if rt.plural == "tokenreviews":
                user = self._users.get(spec.get("token", ""))
                status = {"authenticated": True, "user": user} if user else {"authenticated": False,
                                                                            "error": "invalid bearer token"}
            else:
                attrs = spec.get("nonResourceAttributes")
                subjects = [spec.get("user", "")] + list(spec.get("groups") or [])
                allowed = bool(attrs) and any((s, attrs.get("verb"), attrs.get("path")) in self._url_grants
                                              for s in subjects)
                status = {"allowed": allowed}
        return dict(body, status=status)

    def _log(self, req: Request) -> None:
        with self._cond:
            self._requests.append(req)

    # --- core operations (under the lock; raise ApiError)

    def _ns_check(self, rt: ResourceType, namespace: str) -> None:
        if rt.namespaced:
            if not namespace:
                raise _bad_request("the server could not find the requested resource: namespace is required")
            if ("", namespace) not in self._objects[self._types[("", "v1", "namespaces")]]:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})

    def _record(self, rt: ResourceType, type_: str, obj: dict, old: dict | None) -> None:
        self._history.append(_Event(self._rv, rt, type_, obj, old))
        self._history_rvs.append(self._rv)
        if len(self._history) > self.history_limit:
            drop = len(self._history) - self.history_limit
            self._floor = self._history_rvs[drop - 1]
            del self._history[:drop], self._history_rvs[:drop]
        self._cond.notify_all()

    def _create(self, rt: ResourceType, obj: dict, keep_status: bool, namespace: str | None = None) -> dict:
        with self._cond:
            if not isinstance(obj, dict):
                raise _bad_request("the body must be a JSON object")
            meta = obj.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise _bad_request("metadata must be an object")
            if rt.namespaced:
                if namespace is not None and meta.get("namespace") not in (None, "", namespace):
                    raise _bad_request("the namespace of the provided object does not match the namespace "
                                       "sent on the request")
                meta["namespace"] = namespace or meta.get("namespace") or "default"
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            name = meta.get("name", "")
            causes = self._validate(rt, obj)
            if causes:
                raise _invalid(rt, name, causes)
            self._ns_check(rt, meta.get("namespace", ""))
            key = (meta.get("namespace", ""), name)
            if key in self._objects[rt]:
                raise ApiError(409, "AlreadyExists", f'{rt.group_resource} "{name}" already exists',
                               {"name": name, "group": rt.group, "kind": rt.plural})
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            if not keep_status and "status" in rt.subresources:
                obj.pop("status", None)  # the real server resets status on create
            self._defaults(rt, obj)
            self._rv += 1
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                        resourceVersion=str(self._rv))
            for k in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(k, None)
            self._objects[rt][key] = obj
            self._record(rt, "ADDED", obj, None)
            return obj

    def _validate(self, rt: ResourceType, obj: dict) -> list[str]:
        name = _meta(obj).get("name", "")
        causes = []
        if not name:
            causes.append("metadata.name: Required value: name or generateName is required")
        elif len(name) > 253 or not _NAME.fullmatch(name):
            causes.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must "
                          "consist of lower case alphanumeric characters, '-' or '.'")
        for label_field in ("labels", "annotations"):
            value = _meta(obj).get(label_field)
            if value is not None and (not isinstance(value, dict)
                                      or not all(isinstance(v, str) for v in value.values())):
                causes.append(f"metadata.{label_field}: Invalid value: must be a map of strings")
        if rt.validate and not causes:
            causes += rt.validate(obj)
        return causes

    def _defaults(self, rt: ResourceType, obj: dict) -> None:
        if rt.kind == "Pod":
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif rt.kind == "Namespace":
            obj.setdefault("status", {}).setdefault("phase", "Active")
        elif rt.kind == "Service":
            spec = obj.setdefault("spec", {})
            if spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
                spec["clusterIP"] = f"10.96.{self._next_ip // 250}.{self._next_ip % 250 + 1}"
                self._next_ip += 1
            if spec.get("clusterIP") and "clusterIPs" not in spec:
                spec["clusterIPs"] = [spec["clusterIP"]]

    def _get(self, rt: ResourceType, namespace: str, name: str) -> dict:
        obj = self._objects[rt].get((namespace if rt.namespaced else "", name))
        if obj is None:
            raise _not_found(rt, name)
        return obj

    def _update(self, rt: ResourceType, namespace: str, name: str, new: dict, part: str) -> dict:
        """part: "main" (the status is kept), "status" (only the status changes) or "all"."""
        with self._cond:
            if not isinstance(new, dict):
                raise _bad_request("the body must be a JSON object")
            old = self._get(rt, namespace, name)
            meta = new.setdefault("metadata", {})
            if meta.get("name") not in (None, name):
                raise _bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the "
                                   f"URL ({name})")
            if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
                raise _bad_request("the namespace of the provided object does not match the namespace sent "
                                   "on the request")
            rv = meta.get("resourceVersion")
            if rv and rv != _meta(old)["resourceVersion"]:
                raise _conflict(rt, name)
            if part == "status":
                obj = dict(old)
                if "status" in new:
                    obj["status"] = new["status"]
                else:
                    obj.pop("status", None)
            else:
                obj = dict(new)
                if part == "main" and "status" in rt.subresources:
                    if "status" in old:
                        obj["status"] = old["status"]
                    else:
                        obj.pop("status", None)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            meta = dict(obj.get("metadata") or {})
            om = _meta(old)
            for k in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "resourceVersion"):
                if k in om:
                    meta[k] = om[k]
                else:
                    meta.pop(k, None)
            if part == "all":  # a test may mark an object terminating
                for k in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                    if k in _meta(new):
                        meta[k] = _meta(new)[k]
            obj["metadata"] = meta
            # Validation ratcheting (on by default since Kubernetes 1.30): an update is refused
            # only for errors the stored object did not already have.
            old_causes = self._validate(rt, copy.deepcopy(old))
            causes = [c for c in self._validate(rt, obj) if c not in old_causes]
            if causes:
                raise _invalid(rt, name, causes)
            if obj == old:
                return old  # a no-op write changes nothing, not even the resourceVersion
            if _spec_part(obj) != _spec_part(old) or ("deletionTimestamp" in meta) != ("deletionTimestamp" in om):
                meta["generation"] = om.get("generation", 1) + 1
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            key = (namespace if rt.namespaced else "", name)
            if meta.get("deletionTimestamp") and not meta.get("finalizers") and om.get("finalizers"):
                # the last finalizer is gone: the object goes
                del self._objects[rt][key]
                self._record(rt, "DELETED", obj, old)
                return obj
            self._objects[rt][key] = obj
            self._record(rt, "MODIFIED", obj, old)
            return obj

    def _patch(self, rt: ResourceType, namespace: str, name: str, patch, content_type: str, part: str) -> dict:
        with self._cond:
            old = self._get(rt, namespace, name)
            ctype = content_type.split(";")[0].strip().lower()
            if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                new = merge_patch(old, patch)
                want_rv = _meta(patch).get("resourceVersion") if isinstance(patch.get("metadata"), dict) else None
            elif ctype == "application/json-patch+json":
                new = json_patch(old, patch)
                want_rv = _meta(new).get("resourceVersion")
                if want_rv == _meta(old).get("resourceVersion"):
                    want_rv = None
            else:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types "
                               f"include: application/json-patch+json, application/merge-patch+json, "
                               f"application/strategic-merge-patch+json (got {content_type})")
            if want_rv and want_rv != _meta(old)["resourceVersion"]:
                raise _conflict(rt, name)
            new = copy.deepcopy(new)
            if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
                raise ApiError(422, "Invalid", "the patched object is not an object with metadata")
            new.setdefault("metadata", {})["resourceVersion"] = _meta(old)["resourceVersion"]
            return self._update(rt, namespace, name, new, part)

    def _delete(self, rt: ResourceType, namespace: str, name: str, options: dict) -> dict:
        with self._cond:
            old = self._get(rt, namespace, name)
            pre = (options or {}).get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != _meta(old).get("uid"):
                raise _conflict(rt, name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                          f"UID in object meta: {_meta(old).get('uid')}")
            if pre.get("resourceVersion") and pre["resourceVersion"] != _meta(old).get("resourceVersion"):
                raise _conflict(rt, name, "Precondition failed: resourceVersion in precondition: "
                                          f"{pre['resourceVersion']}, in object meta: "
                                          f"{_meta(old).get('resourceVersion')}")
            if _meta(old).get("finalizers"):
                if _meta(old).get("deletionTimestamp"):
                    return old
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                return self._update(rt, namespace, name, new, part="all")
            if rt.kind == "Namespace":  # its content goes first (the real one does it in the background)
                for other, objs in self._objects.items():
                    if other.namespaced:
                        for key in [k for k in objs if k[0] == name]:
                            self._delete(other, key[0], key[1], {})
            self._rv += 1
            obj = dict(old)
            obj["metadata"] = dict(_meta(old), resourceVersion=str(self._rv))
            del self._objects[rt][(namespace if rt.namespaced else "", name)]
            self._record(rt, "DELETED", obj, old)
            return obj

    def _list(self, rt: ResourceType, namespace: str | None, labels, fields, limit: int = 0,
              cont: str = "") -> tuple[list[dict], str, str, int]:
        """(items, resourceVersion, continue token, remaining)."""
        with self._cond:
            list_rv, start = self._rv, None
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    list_rv, start = int(token["rv"]), tuple(token["start"])
                except (ValueError, KeyError, TypeError):
                    raise _bad_request("continue key is not valid") from None
                if list_rv < self._floor:
                    raise _expired("The provided continue parameter is too old to display a consistent "
                                   "list result. You can start a new list without the continue parameter.")
            items = [o for k, o in sorted(self._objects[rt].items())
                     if (namespace is None or k[0] == namespace) and (start is None or k > start)
                     and labels_match(labels, _meta(o).get("labels")) and fields_match(fields, o)]
            token, remaining = "", 0
            if limit and len(items) > limit:
                remaining = len(items) - limit
                items = items[:limit]
                last = _key(items[-1])
                token = base64.urlsafe_b64encode(json.dumps({"rv": list_rv, "start": list(last)}).encode()).decode()
            return items, str(list_rv), token, remaining

    # --- watch

    def _watch_start(self, rt: ResourceType, namespace: str | None, labels, fields,
                     rv: str | None) -> tuple[int, list[dict], int]:
        """(position, initial events, epoch); raises 410 for a compacted resourceVersion."""
        with self._cond:
            if rv in (None, "", "0"):
                objs = [o for k, o in sorted(self._objects[rt].items())
                        if (namespace is None or k[0] == namespace)
                        and labels_match(labels, _meta(o).get("labels")) and fields_match(fields, o)]
                return self._rv, [{"type": "ADDED", "object": o} for o in objs], self._epoch
            try:
                pos = int(rv)
            except ValueError:
                raise _bad_request(f"invalid resource version: {rv!r}") from None
            if pos < self._floor:
                raise _expired(f"too old resource version: {pos} ({self._floor})")
            return pos, [], self._epoch

    def _watch_next(self, rt: ResourceType, namespace: str | None, labels, fields, pos: int, epoch: int,
                    deadline: float, bookmark_at: float | None) -> tuple[list[dict], int, str]:
        """Wait for events after pos: (events, new position, why: "events", "bookmark", "timeout", "stop")."""
        with self._cond:
            while True:
                if epoch != self._epoch:
                    return [], pos, "stop"
                if pos < self._floor:
                    # compacted under a watcher that fell behind: the real server ends it with 410
                    return [], pos, "expired"
                start = bisect.bisect_right(self._history_rvs, pos)
                events = []
                for ev in self._history[start:]:
                    if ev.rtype != rt:
                        continue
                    out = self._filter(ev, namespace, labels, fields)
                    if out:
                        events.append(out)
                pos = self._rv  # everything up to here has been looked at
                now = time.monotonic()
                if events:
                    return events, pos, "events"
                if now >= deadline:
                    return [], pos, "timeout"
                if bookmark_at is not None and now >= bookmark_at:
                    return [], pos, "bookmark"
                wake = deadline if bookmark_at is None else min(deadline, bookmark_at)
                self._cond.wait(max(0.0, wake - now))

    @staticmethod
    def _filter(ev: _Event, namespace, labels, fields) -> dict | None:
        def matches(o):
            return (o is not None and (namespace is None or _meta(o).get("namespace") == namespace)
                    and labels_match(labels, _meta(o).get("labels")) and fields_match(fields, o))

        now = matches(ev.obj)
        if ev.type == "MODIFIED":
            before = matches(ev.old)
            if before and not now:
                return {"type": "DELETED", "object": ev.obj}  # left the selection, as the real server says
            if now and not before:
                return {"type": "ADDED", "object": ev.obj}
        return {"type": ev.type, "object": ev.obj} if now else None


def _truthy(value: str | None) -> bool:
    """A boolean query parameter as Go's strconv.ParseBool reads it (the Python client sends "True")."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _any(allowed, value: str) -> bool:
    return bool(allowed) and ("*" in allowed or value in allowed)


# --- HTTP -----------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, api: K8sEmulator):
        self.api = api
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def cut_connections(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        pass  # a client that went away, or a cut connection: expected in tests


@dataclass
class _Route:
    rtype: ResourceType
    namespace: str | None
    name: str
    subresource: str
    rest: list[str]
    watch_path: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self):
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.conn_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    # --- plumbing

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return data

    def _body(self):
        data = self._raw_body
        if not data.strip():
            return None
        ctype = self.headers.get("Content-Type", "")
        if "protobuf" in ctype or "cbor" in ctype:
            # client-go then retries the request as JSON (and keeps to JSON afterwards)
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: application/json, application/yaml (got {ctype})")
        try:
            return json.loads(data)
        except ValueError:
            try:  # kubectl may send YAML for some content types
                return yaml.safe_load(data)
            except yaml.YAMLError:
                raise _bad_request("the body is not valid JSON") from None

    def _send(self, code: int, body, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, obj) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        path = url.path
        req = Request(method, path, query, method.lower(), "", "", "", "", "", 0, self.headers.get("User-Agent", ""))
        self._req, self._logged = req, False
        code = 500
        # read the body first: an error answered before reading it would break keep-alive
        self._raw_body = self._read_body() if method != "GET" else b""
        try:
            if api.token and self.headers.get("Authorization", "") != f"Bearer {api.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            route = self._route(path)
            if route is None:
                code = self._nonresource(path)
                return
            req = self._req = self._request(method, path, query, route, req.user_agent)
            if not api._allowed(req):
                scope = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
                res = req.resource + (f"/{req.subresource}" if req.subresource else "")
                raise ApiError(403, "Forbidden", f'{res} is forbidden: User "system:serviceaccount:test:test" '
                               f'cannot {req.verb} resource "{res}" in API group "{req.group}" {scope}',
                               {"name": req.name, "group": req.group, "kind": req.resource})
            code = self._resource(method, query, route, req)
        except ApiError as e:
            code = e.code
            self._send(e.code, e.status())
        except (BrokenPipeError, ConnectionError):
            code = 499
            self.close_connection = True
        except Exception as e:  # an emulator bug: say so loudly, as a 500 and on stderr
            traceback.print_exc()
            code = 500
            self.close_connection = True
            try:
                self._send(500, ApiError(500, "InternalError", f"emulator error: {e!r}").status())
            except OSError:
                pass
        finally:
            if not self._logged:
                api._log(Request(**{**req.__dict__, "code": code}))

    def _route(self, path: str) -> _Route | None:
        api = self.server.api
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if parts[:2] == ["api", "v1"] and len(parts) > 2:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) > 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        watch_path = False
        if rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            rt = api._types.get((group, version, rest[2]))
            if rt is not None and rt.namespaced:
                namespace, rest = rest[1], rest[2:]
        rt = api._types.get((group, version, rest[0])) if rest else None
        if rt is None or (rt.namespaced and namespace is None and len(rest) > 1) or (
                len(rest) > 3 and rest[2] != "proxy"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in rt.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _Route(rt, namespace, name, sub, rest[3:], watch_path)

    @staticmethod
    def _request(method: str, path: str, query: dict, route: _Route, user_agent: str = "") -> Request:
        watch = route.watch_path or _truthy(query.get("watch"))
        if route.subresource == "proxy":
            verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        elif method == "GET":
            verb = "watch" if watch else ("get" if route.name else "list")
        elif method == "DELETE":
            verb = "delete" if route.name else "deletecollection"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
        return Request(method, path, query, verb, route.rtype.group, route.rtype.plural, route.subresource,
                       route.namespace or "", route.name, 0, user_agent)

    # --- non-resource URLs: discovery, version, health

    def _nonresource(self, path: str) -> int:
        api = self.server.api
        p = path.rstrip("/") or "/"
        types = sorted(api._types.values(), key=lambda t: (t.group, t.version, t.plural))
        groups: dict[str, list[str]] = {}
        for t in types:
            if t.group and t.version not in groups.setdefault(t.group, []):
                groups[t.group].append(t.version)
        body = None
        if p == "/version":
            body = SERVER_VERSION
        elif p in ("/healthz", "/readyz", "/livez"):
            self._send(200, b"ok", "text/plain")
            return 200
        elif p == "/api":
            body = {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{api.host}:{api.port}"}]}
        elif p == "/api/v1":
            body = self._resource_list("", "v1", types)
        elif p == "/openapi/v3":
            gvs = ["api/v1"] + [f"apis/{g}/{v}" for g, vs in sorted(groups.items()) for v in vs]
            body = {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={api._epoch}"} for gv in gvs}}
        elif p.startswith("/openapi/v3/"):
            gv = p[len("/openapi/v3/"):]
            group, _, version = gv[len("apis/"):].partition("/") if gv.startswith("apis/") else ("", "", "v1")
            if gv == "api/v1" or version in groups.get(group, []):
                body = _openapi_v3(group, version, types)
        elif p == "/apis":
            body = {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [self._group(g, vs) for g, vs in sorted(groups.items())]}
        elif p.startswith("/apis/"):
            parts = p.split("/")[2:]
            if len(parts) == 1 and parts[0] in groups:
                body = dict(self._group(parts[0], groups[parts[0]]), kind="APIGroup", apiVersion="v1")
            elif len(parts) == 2 and parts[1] in groups.get(parts[0], []):
                body = self._resource_list(parts[0], parts[1], types)
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send(200, body)
        return 200

    @staticmethod
    def _group(group: str, versions: list[str]) -> dict:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}

    @staticmethod
    def _resource_list(group: str, version: str, types) -> dict:
        resources = []
        for t in types:
            if (t.group, t.version) != (group, version):
                continue
            entry = {"name": t.plural, "singularName": t.singular or t.kind.lower(), "namespaced": t.namespaced,
                     "kind": t.kind, "verbs": VERBS}
            if t.short_names:
                entry["shortNames"] = list(t.short_names)
            resources.append(entry)
            for sub in t.subresources:
                kind = {"proxy": f"{t.kind}ProxyOptions", "log": "Pod"}.get(sub, t.kind)
                verbs = ["create", "delete", "get", "patch", "update"] if sub == "proxy" else ["get", "patch", "update"]
                resources.append({"name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced,
                                  "kind": kind, "verbs": verbs})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    # --- resources

    def _resource(self, method: str, query: dict, route: _Route, req: Request) -> int:
        api = self.server.api
        rt, ns, name, sub = route.rtype, route.namespace, route.name, route.subresource
        if sub == "proxy":
            return self._proxy(method, route)
        if rt.plural in REVIEWS:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", f"{rt.plural} can only be created")
            self._send(201, api._review(rt, self._body() or {}))
            return 201
        if sub in ("log", "finalize") or (sub == "status" and method not in ("GET", "PUT", "PATCH")):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {rt.plural}/{sub} here")
        if req.verb == "watch":
            if name:  # the old /watch/namespaces/{ns}/pods/{name} form: one object
                query = dict(query, fieldSelector=",".join(filter(None, [query.get("fieldSelector"),
                                                                         f"metadata.name={name}"])))
            return self._watch(rt, ns, query)
        if req.verb in ("list", "deletecollection"):
            labels = parse_label_selector(query.get("labelSelector"))
            fields = parse_field_selector(query.get("fieldSelector"), rt)
            if method == "DELETE":
                items, _, _, _ = api._list(rt, ns, labels, fields)
                gone = [api._delete(rt, _meta(o).get("namespace", ""), _meta(o)["name"], {}) for o in items]
                self._send(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                                 "metadata": {"resourceVersion": api.resource_version}, "items": gone})
                return 200
            try:
                limit = int(query.get("limit") or 0)
            except ValueError:
                raise _bad_request("limit must be an integer") from None
            items, rv, token, remaining = api._list(rt, ns, labels, fields, limit, query.get("continue", ""))
            meta = {"resourceVersion": rv}
            if token:
                meta.update({"continue": token, "remainingItemCount": remaining})
            if "as=Table" in self.headers.get("Accept", ""):
                self._send(200, _table(rt, items, meta))
            else:
                self._send(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta,
                                 "items": items})
            return 200
        ns = ns or ""
        if method == "GET":
            with api._cond:
                obj = api._get(rt, ns, name)
            if "as=Table" in self.headers.get("Accept", ""):
                self._send(200, _table(rt, [obj], {"resourceVersion": _meta(obj).get("resourceVersion")}))
            else:
                self._send(200, obj)
            return 200
        body = self._body()
        if query.get("dryRun"):
            raise ApiError(400, "BadRequest", "dryRun is not supported by this emulator")
        if method == "POST":
            if body is not None and isinstance(body, dict) and (body.get("kind"), body.get("apiVersion")) not in (
                    (rt.kind, rt.api_version), (None, None)):
                raise _bad_request(f"the kind {body.get('kind')!r} of {body.get('apiVersion')!r} does not belong "
                                   f"at {rt.api_version}/{rt.plural}")
            obj = api._create(rt, body or {}, keep_status=False, namespace=ns if rt.namespaced else None)
            self._send(201, obj)
            return 201
        if method == "PUT":
            obj = api._update(rt, ns, name, body or {}, part="status" if sub == "status" else "main")
        elif method == "PATCH":
            obj = api._patch(rt, ns, name, body, self.headers.get("Content-Type", ""),
                             part="status" if sub == "status" else "main")
        else:
            obj = api._delete(rt, ns, name, body or {})
        self._send(200, obj)
        return 200

    def _watch(self, rt: ResourceType, ns: str | None, query: dict) -> int:
        api = self.server.api
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"), rt)
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else api.watch_timeout
        except ValueError:
            raise _bad_request("timeoutSeconds must be a number") from None
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        as_table = "as=Table" in self.headers.get("Accept", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        api._log(Request(**{**self._req.__dict__, "code": 200}))  # now: a watch may last long
        self._logged = True
        try:
            pos, initial, epoch = api._watch_start(rt, ns, labels, fields, query.get("resourceVersion"))
        except ApiError as e:
            # the real server answers 200 and sends the 410 as an ERROR event, then ends the watch
            self._chunk({"type": "ERROR", "object": e.status()})
            self.wfile.write(b"0\r\n\r\n")
            return 200
        def send(ev):
            if as_table:  # kubectl get -w: every object as a one-row Table
                ev = {"type": ev["type"], "object": _table(rt, [ev["object"]], {
                    "resourceVersion": _meta(ev["object"]).get("resourceVersion")})}
            self._chunk(ev)

        for ev in initial:
            send(ev)
        deadline = time.monotonic() + timeout
        interval = api.bookmark_interval
        bookmark_at = time.monotonic() + interval if bookmarks else None
        while True:
            events, pos, why = api._watch_next(rt, ns, labels, fields, pos, epoch, deadline, bookmark_at)
            if why == "stop":
                self.close_connection = True  # cut: no final chunk, as when a server dies
                return 200
            if why == "expired":
                self._chunk({"type": "ERROR", "object": _expired(f"too old resource version: {pos}").status()})
                break
            for ev in events:
                send(ev)
            if why == "timeout":
                break
            if why == "bookmark":
                self._chunk({"type": "BOOKMARK", "object": {
                    "kind": rt.kind, "apiVersion": rt.api_version, "metadata": {"resourceVersion": str(pos)}}})
                bookmark_at = time.monotonic() + interval
        self.wfile.write(b"0\r\n\r\n")
        return 200

    def _proxy(self, method: str, route: _Route) -> int:
        api = self.server.api
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", "only GET is proxied by this emulator")
        target = route.name.split(":")
        scheme = target.pop(0) if target[0] in ("http", "https") else "http"
        name, port = target[0], target[1] if len(target) > 1 else ""
        with api._cond:
            api._get(route.rtype, route.namespace or "", name)
        if not port.isdigit():
            raise ApiError(503, "ServiceUnavailable", f"no port given for {route.rtype.plural}/{name}: use "
                           f"{name}:<port> (this emulator proxies to 127.0.0.1:<port>)")
        query = urlsplit(self.path).query
        path = "/" + "/".join(route.rest) + (f"?{query}" if query else "")
        if scheme == "https":  # like the API server, the proxy does not verify the pod's certificate
            conn = http.client.HTTPSConnection("127.0.0.1", int(port), timeout=30,
                                               context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "connection", "keep-alive", "transfer-encoding")}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: {e}") from None
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return resp.status


# --- OpenAPI v3 (kubectl asks it whether the server validates fields itself) -----------------

def _openapi_v3(group: str, version: str, types) -> dict:
    """Paths only, no schemas: enough for kubectl to send fieldValidation=Strict to the server
    instead of validating on the client (which would need the full schemas)."""
    paths = {}
    prefix = f"/apis/{group}/{version}" if group else "/api/v1"
    for t in types:
        if (t.group, t.version) != (group, version):
            continue
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        ns = "/namespaces/{namespace}" if t.namespaced else ""
        params = [{"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                  for n in ("dryRun", "fieldManager", "fieldValidation")]
        op = {"x-kubernetes-group-version-kind": gvk, "parameters": params,
              "responses": {"200": {"description": "OK"}}}
        paths[f"{prefix}{ns}/{t.plural}/{{name}}"] = {
            verb: dict(op, operationId=f"{verb}{t.kind}", **{"x-kubernetes-action": action})
            for verb, action in (("get", "get"), ("put", "put"), ("patch", "patch"), ("delete", "delete"))}
        paths[f"{prefix}{ns}/{t.plural}"] = {
            verb: dict(op, operationId=f"{verb}{t.kind}List", **{"x-kubernetes-action": action})
            for verb, action in (("get", "list"), ("post", "post"))}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


# --- Table output (what kubectl get asks for) ------------------------------------------------

def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    s = max(0, int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _json_path(obj: dict, path: str):
    """A printer column's value: only the `.a.b.c` paths Kubernetes allows there; missing is None."""
    node = obj
    for part in path.strip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _table(rt: ResourceType, items: list[dict], meta: dict) -> dict:
    cols = [("Name", "string", "name", 0)]
    if rt.kind == "Pod":
        cols += [("Ready", "string", "", 0), ("Status", "string", "", 0), ("Restarts", "string", "", 0),
                 ("Age", "string", "", 0), ("IP", "string", "", 1), ("Node", "string", "", 1)]
    elif rt.columns:  # a CRD's printer columns (simple .a.b jsonPaths; a date column shows as an age)
        cols += [(c["name"], "string" if c.get("type") == "date" else c.get("type", "string"), c.get("format", ""),
                  c.get("priority", 0)) for c in rt.columns]
    else:
        cols += [("Age", "string", "", 0)]
    rows = []
    for o in items:
        m = _meta(o)
        if rt.kind == "Pod":
            statuses = (o.get("status") or {}).get("containerStatuses") or []
            containers = (o.get("spec") or {}).get("containers") or []
            phase = "Terminating" if m.get("deletionTimestamp") else (o.get("status") or {}).get("phase", "")
            cells = [m.get("name"), f"{sum(1 for s in statuses if s.get('ready'))}/{len(containers)}", phase,
                     str(sum(s.get("restartCount", 0) for s in statuses)), _age(m.get("creationTimestamp")),
                     (o.get("status") or {}).get("podIP", "<none>"), (o.get("spec") or {}).get("nodeName", "<none>")]
        elif rt.columns:
            cells = [m.get("name")]
            for c in rt.columns:
                value = _json_path(o, c["jsonPath"])
                cells.append(_age(value) if c.get("type") == "date" else value)
        else:
            cells = [m.get("name"), _age(m.get("creationTimestamp"))]
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": m}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n, "priority": p}
                                  for n, t, f, p in cols],
            "rows": rows}


# --- object builders for tests ----------------------------------------------------------------

def make_namespace(name: str, labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
                         "annotations": dict(annotations or {})}}


def make_pod(name: str, namespace: str = "default", node: str = "", ip: str | tuple[str, ...] = "",
             labels: dict | None = None, annotations: dict | None = None, phase: str = "Running",
             owner: tuple[str, str] | None = None, host_network: bool = False) -> dict:
    """A pod as the kubelet reports it; owner is (kind, name) of its controller."""
    ips = [ip] if isinstance(ip, str) and ip else list(ip or ())
    meta: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                  "annotations": dict(annotations or {})}
    if owner:
        api_version = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
                       "Job": "batch/v1"}.get(owner[0], "v1")
        meta["ownerReferences"] = [{"apiVersion": api_version, "kind": owner[0], "name": owner[1],
                                    "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]
    spec: dict = {"containers": [{"name": "main", "image": "registry.example/app:1"}]}
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": i} for i in ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def make_node(name: str, ips: tuple[str, ...] | str = (), labels: dict | None = None) -> dict:
    ips = (ips,) if isinstance(ips, str) else tuple(ips)
    addresses = [{"type": "InternalIP", "address": i} for i in ips] + [{"type": "Hostname", "address": name}]
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": {}, "status": {"addresses": addresses}}


def make_service(name: str, namespace: str = "default", cluster_ip: str | tuple[str, ...] = "",
                 selector: dict | None = None, port: int = 80) -> dict:
    ips = [cluster_ip] if isinstance(cluster_ip, str) and cluster_ip else list(cluster_ip or ())
    spec: dict = {"selector": dict(selector or {}), "ports": [{"port": port, "protocol": "TCP"}], "type": "ClusterIP"}
    if ips:
        spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def make_secret(name: str, namespace: str = "default", data: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in (data or {}).items()}}

