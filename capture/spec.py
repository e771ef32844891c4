"""Capture and ClusterCapture specs: parsed and validated by the agent itself.

The CRD's schema and CEL rules (deploy/crds/) say the same things, but the API
server's validation may be off, old or bypassed: every spec the agent acts on
is checked again here, and a bad one ends in `phase: Failed` with the reason.
The limits below are the CRD's limits; tests keep the two in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from agent.errors import FoveaError

GROUP = "fovea.dev"
VERSION = "v1alpha1"
KINDS = {"Capture": "captures", "ClusterCapture": "clustercaptures"}

MAX_DURATION = 3600.0  # seconds (1h)
MAX_BYTES = 1 << 30  # 1Gi per node
DEFAULT_MAX_BYTES = 100 << 20  # 100Mi
MAX_PACKETS = 10_000_000
MIN_SNAP, MAX_SNAP, DEFAULT_SNAP = 64, 262144, 262144
MAX_FILTER = 1024  # characters
MAX_POD_NAMES = 64
MAX_NODE_NAMES = 256

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_SUFFIX = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
# An RFC 1123 subdomain, as Kubernetes object names are.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SpecError(FoveaError):
    """A spec the agent will not run; str() is the reason shown in status."""


def parse_duration(text) -> float:
    """Seconds of a Kubernetes duration string: "30s", "1m30s", "1.5h", "500ms"."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise SpecError(f"spec.duration {text!r} is not a duration", "write it like 30s, 5m or 1h30m")
    return sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))


def parse_bytes(value) -> int:
    """Bytes of an integer or a quantity string: 100Mi, 1Gi, 500k, 1048576."""
    if isinstance(value, bool):
        raise SpecError(f"spec.maxBytes {value!r} is not a size", "write it like 100Mi or 1Gi")
    if isinstance(value, int):
        return value
    m = _QUANTITY.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise SpecError(f"spec.maxBytes {value!r} is not a size", "write it like 100Mi or 1Gi")
    return int(Decimal(m.group(1)) * _SUFFIX[m.group(2)])


def _require(ok: bool, problem: str, hint: str) -> None:
    if not ok:
        raise SpecError(problem, hint)


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def to_query(self) -> str:
        """The selector as the API's labelSelector parameter."""
        terms = [f"{k}={v}" for k, v in self.match_labels]
        for key, op, values in self.match_expressions:
            if op == "Exists":
                terms.append(key)
            elif op == "DoesNotExist":
                terms.append(f"!{key}")
            else:
                terms.append(f"{key} {'in' if op == 'In' else 'notin'} ({','.join(values)})")
        return ",".join(terms)


def parse_selector(obj, where: str) -> LabelSelector:
    _require(isinstance(obj, dict), f"{where} must be a label selector", "e.g. {matchLabels: {app: web}}")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    _require(not unknown, f"{where} has unknown field(s) {', '.join(sorted(unknown))}",
             "a label selector has matchLabels and matchExpressions")
    labels = obj.get("matchLabels") or {}
    _require(isinstance(labels, dict), f"{where}.matchLabels must be a map", "e.g. {app: web}")
    for k, v in labels.items():
        _require(isinstance(k, str) and len(k) <= 317 and bool(_LABEL_KEY.fullmatch(k)),
                 f"{where}.matchLabels: {k!r} is not a label key", "e.g. app or app.kubernetes.io/name")
        _require(isinstance(v, str) and len(v) <= 63 and bool(_LABEL_VALUE.fullmatch(v)),
                 f"{where}.matchLabels.{k}: {v!r} is not a label value", "letters, digits, '-', '_', '.'")
    exprs = []
    for i, e in enumerate(obj.get("matchExpressions") or []):
        w = f"{where}.matchExpressions[{i}]"
        _require(isinstance(e, dict), f"{w} must be an object", "with key, operator and values")
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        _require(isinstance(key, str) and bool(_LABEL_KEY.fullmatch(key)), f"{w}.key {key!r} is not a label key",
                 "e.g. app")
        _require(op in _OPERATORS, f"{w}.operator {op!r} is unknown", f"use one of {', '.join(_OPERATORS)}")
        _require(isinstance(values, list) and all(isinstance(v, str) and _LABEL_VALUE.fullmatch(v)
                                                  for v in values),
                 f"{w}.values must be a list of label values", "e.g. [web, api]")
        _require(bool(values) == (op in ("In", "NotIn")), f"{w}: {op} {'needs' if op in ('In', 'NotIn') else 'takes no'}"
                 " values", "In and NotIn take values; Exists and DoesNotExist none")
        exprs.append((key, op, tuple(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(exprs))


@dataclass(frozen=True)
class Target:
    pod_selector: LabelSelector | None = None
    pod_names: tuple[str, ...] = ()
    namespace_selector: LabelSelector | None = None  # ClusterCapture only
    node_selector: LabelSelector | None = None  # ClusterCapture only
    node_names: tuple[str, ...] = ()  # ClusterCapture only

    @property
    def nodes(self) -> bool:
        """The target is nodes (their host interfaces), not pods."""
        return self.node_selector is not None or bool(self.node_names)


@dataclass(frozen=True)
class S3Output:
    endpoint: str
    bucket: str
    prefix: str
    region: str
    secret: str


@dataclass(frozen=True)
class AzureBlobOutput:
    secret: str


@dataclass(frozen=True)
class Output:
    kind: str  # hostPath, s3, azureBlob
    s3: S3Output | None = None
    azure_blob: AzureBlobOutput | None = None

    @property
    def secret(self) -> str:
        return self.s3.secret if self.s3 else self.azure_blob.secret if self.azure_blob else ""


@dataclass(frozen=True)
class CaptureSpec:
    kind: str  # Capture or ClusterCapture
    namespace: str  # "" for a ClusterCapture
    name: str
    target: Target
    duration: float  # seconds
    filter: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_packets: int = 0  # 0: no packet limit
    snap_length: int = DEFAULT_SNAP
    include_metadata: bool = True
    output: Output = field(default_factory=lambda: Output("hostPath"))

    @property
    def cluster(self) -> bool:
        return self.kind == "ClusterCapture"


def _only(obj: dict, allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise SpecError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}",
                        f"allowed here: {', '.join(sorted(allowed))}" if allowed else "it takes no fields")


def _names(value, where: str, cap: int) -> tuple[str, ...]:
    _require(isinstance(value, list) and 1 <= len(value) <= cap, f"{where} must be a list of 1 to {cap} names",
             "e.g. [web-7d9c-abcde]")
    for n in value:
        _require(isinstance(n, str) and len(n) <= 253 and bool(_NAME.fullmatch(n)),
                 f"{where}: {n!r} is not an object name",
                 "names only, no namespace: a Capture reaches the pods of its own namespace")
    return tuple(value)


def _target(obj, cluster: bool) -> Target:
    _require(isinstance(obj, dict), "spec.target is required", "give podSelector or podNames")
    if not cluster:
        for key in ("namespaceSelector", "nodeSelector", "nodeNames"):
            _require(key not in obj, f"spec.target.{key} needs a ClusterCapture",
                     "a namespaced Capture reaches only the pods of its own namespace")
        _only(obj, {"podSelector", "podNames"}, "spec.target")
        _require(("podSelector" in obj) != ("podNames" in obj), "spec.target must have exactly one of "
                 "podSelector and podNames", "pick pods by labels or by name")
        if "podSelector" in obj:
            return Target(pod_selector=parse_selector(obj["podSelector"], "spec.target.podSelector"))
        return Target(pod_names=_names(obj["podNames"], "spec.target.podNames", MAX_POD_NAMES))
    _only(obj, {"namespaceSelector", "podSelector", "nodeSelector", "nodeNames"}, "spec.target")
    kinds = [k for k in ("namespaceSelector", "nodeSelector", "nodeNames") if k in obj]
    _require(len(kinds) == 1, "spec.target of a ClusterCapture must have exactly one of namespaceSelector, "
             "nodeSelector and nodeNames", "pods by namespace (and podSelector), or nodes")
    _require("podSelector" not in obj or "namespaceSelector" in obj, "spec.target.podSelector of a ClusterCapture "
             "goes with namespaceSelector", "add namespaceSelector: {} for every namespace")
    if "namespaceSelector" in obj:
        pods = obj.get("podSelector")
        return Target(namespace_selector=parse_selector(obj["namespaceSelector"], "spec.target.namespaceSelector"),
                      pod_selector=parse_selector(pods, "spec.target.podSelector") if pods is not None else None)
    if "nodeSelector" in obj:
        return Target(node_selector=parse_selector(obj["nodeSelector"], "spec.target.nodeSelector"))
    return Target(node_names=_names(obj["nodeNames"], "spec.target.nodeNames", MAX_NODE_NAMES))


def _secret_name(obj, where: str) -> str:
    _require(isinstance(obj, dict) and isinstance(obj.get("name"), str) and bool(_NAME.fullmatch(obj["name"]))
             and len(obj["name"]) <= 253, f"{where}.name must name a Secret", "e.g. secretRef: {name: s3-creds}")
    _only(obj, {"name"}, where)
    return obj["name"]


def _output(obj) -> Output:
    obj = {"hostPath": {}} if obj is None else obj
    _require(isinstance(obj, dict), "spec.output must be an object", "one of hostPath, s3, azureBlob")
    _only(obj, {"hostPath", "s3", "azureBlob"}, "spec.output")
    _require(len(obj) == 1, "spec.output must have exactly one of hostPath, s3 and azureBlob",
             "pick one place for the capture")
    kind, value = next(iter(obj.items()))
    _require(isinstance(value, dict), f"spec.output.{kind} must be an object", "e.g. hostPath: {}")
    if kind == "hostPath":
        # Nothing in the spec names a path: files go under the agent's base directory only.
        _only(value, set(), "spec.output.hostPath")
        return Output("hostPath")
    if kind == "azureBlob":
        _only(value, {"secretRef"}, "spec.output.azureBlob")
        return Output("azureBlob", azure_blob=AzureBlobOutput(_secret_name(value.get("secretRef"),
                                                                          "spec.output.azureBlob.secretRef")))
    _only(value, {"endpoint", "bucket", "prefix", "region", "secretRef"}, "spec.output.s3")
    endpoint, bucket = value.get("endpoint"), value.get("bucket")
    prefix, region = value.get("prefix", ""), value.get("region", "")
    _require(isinstance(endpoint, str) and re.fullmatch(r"https?://[^\s/?#]+/?", endpoint or "") is not None,
             f"spec.output.s3.endpoint {endpoint!r} is not an http(s) URL", "e.g. https://s3.eu-west-1.amazonaws.com")
    _require(isinstance(bucket, str) and re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or "") is not None,
             f"spec.output.s3.bucket {bucket!r} is not a bucket name", "3-63 lowercase letters, digits, '.', '-'")
    _require(isinstance(prefix, str) and len(prefix) <= 512 and ".." not in prefix.split("/")
             and not prefix.startswith("/"), f"spec.output.s3.prefix {prefix!r} is not a key prefix",
             "e.g. captures/ (no leading '/', no '..')")
    _require(isinstance(region, str) and len(region) <= 64, "spec.output.s3.region must be a string", "e.g. us-east-1")
    return Output("s3", s3=S3Output(endpoint.rstrip("/"), bucket, prefix, region,
                                     _secret_name(value.get("secretRef"), "spec.output.s3.secretRef")))


def _int(spec: dict, key: str, default: int, low: int, high: int) -> int:
    value = spec.get(key, default)
    _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
             f"spec.{key} {value!r} is out of range", f"it must be a whole number from {low} to {high}")
    return value


def parse(obj: dict, check_filter=None) -> CaptureSpec:
    """A Capture or ClusterCapture object (as the API returns it) -> CaptureSpec, or SpecError.

    check_filter(expr) compiles a pcap-filter expression and raises on a bad one
    (the engine's); the filter is never parsed here.
    """
    kind = obj.get("kind")
    _require(kind in KINDS, f"kind {kind!r} is not a capture", "Capture or ClusterCapture")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    _require(isinstance(spec, dict), "spec is missing", "see docs/captures.md for the shape")
    _only(spec, {"target", "filter", "duration", "maxBytes", "maxPackets", "snapLength", "includeMetadata", "output"},
          "spec")
    cluster = kind == "ClusterCapture"
    target = _target(spec.get("target"), cluster)
    _require("duration" in spec, "spec.duration is required", "e.g. duration: 30s (at most 1h)")
    duration = parse_duration(spec["duration"])
    _require(0 < duration <= MAX_DURATION, f"spec.duration {spec['duration']} is out of range",
             "it must be more than 0 and at most 1h")
    flt = spec.get("filter", "")
    _require(isinstance(flt, str) and len(flt) <= MAX_FILTER, f"spec.filter must be a string of at most "
             f"{MAX_FILTER} characters", "a pcap-filter expression like 'tcp port 80'")
    if flt and check_filter is not None:
        try:
            check_filter(flt)
        except Exception as e:  # noqa: BLE001 (any compile failure is the spec's fault)
            raise SpecError(f"spec.filter {flt!r} does not compile: {getattr(e, 'problem', None) or e}",
                            "write a pcap-filter expression, see 'man pcap-filter'") from None
    max_bytes = parse_bytes(spec.get("maxBytes", DEFAULT_MAX_BYTES))
    _require(1 <= max_bytes <= MAX_BYTES, f"spec.maxBytes {spec.get('maxBytes')} is out of range",
             "it must be at least 1 byte and at most 1Gi")
    include = spec.get("includeMetadata", True)
    _require(isinstance(include, bool), "spec.includeMetadata must be true or false", "")
    return CaptureSpec(
        kind=kind, namespace=meta.get("namespace", "") if not cluster else "", name=meta.get("name", ""),
        target=target, duration=duration, filter=flt, max_bytes=max_bytes,
        max_packets=_int(spec, "maxPackets", 0, 1, MAX_PACKETS) if "maxPackets" in spec else 0,
        snap_length=_int(spec, "snapLength", DEFAULT_SNAP, MIN_SNAP, MAX_SNAP),
        include_metadata=include, output=_output(spec.get("output")),
    )
