"""What the agent keeps of Kubernetes objects: slim, frozen records.

A `kubernetes` client model object of a pod holds ~49 KiB; a record holds the
few fields attribution needs, in __slots__ (no per-record dict). Records are
built straight from the API's JSON and never from model objects. The strings
that repeat across records (namespace, node, workload, phase) are interned:
150,000 pods share one copy of each, and a pod costs about 520 bytes of objects
(docs/performance.md, "Kubernetes cache at cluster scale").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.addresses import canonical_ip
from agent.k8s.workload import workload_of

OBSERVE_ANNOTATION = "fovea.dev/observe"

# Which pod wins an IP that two pods claim (the old one still terminating):
# a live pod over a terminating one, then by phase, then the newest.
_PHASE_RANK = {"Running": 3, "Pending": 2, "Unknown": 1}


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    node: str
    ips: tuple[str, ...]
    host_network: bool
    observe: bool  # the pod's own fovea.dev/observe annotation is "true"
    workload_kind: str
    workload_name: str
    phase: str
    created: int = 0  # creationTimestamp in seconds since the epoch (0: unknown); an int is half a string
    terminating: bool = False  # deletionTimestamp is set

    def claim_rank(self) -> tuple:
        return (not self.terminating, _PHASE_RANK.get(self.phase, 0), self.created, self.uid)


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    observe: bool


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    ips: tuple[str, ...]
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs: where its pods' addresses come from (when the CNI uses them)


class PodDirectory(Protocol):
    """The lookups attribution uses: KubeCache (from the API) and StaticPods (from a file)."""

    @property
    def synced(self) -> bool: ...
    def pod_by_ip(self, ip: str) -> PodRecord | None: ...
    def local_pods(self) -> tuple[PodRecord, ...]: ...
    def namespace(self, name: str) -> NamespaceRecord | None: ...
    def pod_observed(self, pod: PodRecord) -> bool: ...
    def service_by_ip(self, ip: str) -> ServiceRecord | None: ...
    def node_by_ip(self, ip: str) -> NodeRecord | None: ...
    def in_pod_network(self, ip: str) -> bool: ...
    def stats(self) -> dict[str, int]: ...


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _shared(value) -> str:
    """A string many records repeat, as the one interned copy ("" for anything else: API
    objects are untrusted input)."""
    return sys.intern(value) if type(value) is str else ""


def _observe(meta: dict) -> bool:
    return (meta.get("annotations") or {}).get(OBSERVE_ANNOTATION) == "true"


def _seconds(timestamp) -> int:
    """An RFC 3339 time ("2025-01-01T00:00:00Z") in seconds since the epoch; 0 if it is not one."""
    try:
        return int(datetime.fromisoformat(timestamp).timestamp())
    except (TypeError, ValueError):
        return 0


def pod_record(obj: dict) -> PodRecord:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    kind, name = workload_of(meta)
    return PodRecord(
        namespace=_shared(meta.get("namespace")),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        node=_shared(spec.get("nodeName")),
        ips=tuple(dict.fromkeys(canonical_ip(i) for i in ips)),
        host_network=bool(spec.get("hostNetwork")),
        observe=_observe(meta),
        workload_kind=_shared(kind),
        workload_name=_shared(name),
        phase=_shared(status.get("phase")),
        created=_seconds(meta.get("creationTimestamp")),
        terminating=bool(meta.get("deletionTimestamp")),
    )


def namespace_record(obj: dict) -> NamespaceRecord:
    meta = _meta(obj)
    return NamespaceRecord(meta.get("name", ""), _observe(meta))


def service_record(obj: dict) -> ServiceRecord:
    meta, spec = _meta(obj), obj.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    # "None" is a headless Service: it has no address of its own
    ips = [canonical_ip(i) for i in ips if i and i != "None"]
    return ServiceRecord(_shared(meta.get("namespace")), meta.get("name", ""), tuple(dict.fromkeys(ips)))


def node_record(obj: dict) -> NodeRecord:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    ips = [canonical_ip(a["address"]) for a in status.get("addresses") or []
           if a.get("type") in ("InternalIP", "ExternalIP") and a.get("address")]
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    return NodeRecord(meta.get("name", ""), tuple(dict.fromkeys(ips)),
                      tuple(dict.fromkeys(c for c in cidrs if isinstance(c, str))))
