"""Naming addresses: local pods, cluster peers, services, nodes, the outside.

The pod source is the Kubernetes cache (agent/k8s/cache.py) or, standalone,
a static file (agent/k8s/static.py); both answer the same questions.
Rules (DESIGN.md):
- a hostNetwork pod's traffic is the node's: its IP names the node;
- a Service ClusterIP (seen before DNAT, on the pod's interface) names the Service;
- the API server's addresses (the default/kubernetes Service) are `apiserver`;
- anything else is `external`.
"""

from __future__ import annotations

from dataclasses import dataclass

EXTERNAL = "external"
APISERVER = "apiserver"


@dataclass(frozen=True)
class Peer:
    namespace: str
    workload: str
    is_pod: bool  # a (non-hostNetwork) pod of the cluster


class Resolver:
    def __init__(self, source, node_name: str, all_pods: bool = False):
        self.source = source
        self.node_name = node_name
        self.all_pods = all_pods

    def local_pod(self, ip: str):
        """The pod of this node that holds `ip`, or None."""
        pod = self.source.pod_by_ip(ip) if ip else None
        if pod is None or pod.host_network or (pod.node and pod.node != self.node_name):
            return None
        return pod

    def observed(self, pod) -> bool:
        return self.all_pods or self.source.pod_observed(pod)

    @staticmethod
    def pod_labels(pod) -> tuple[str, str, str, str]:
        return (pod.namespace, pod.name, pod.workload_kind, pod.workload_name)

    def local_pod_labels(self) -> set[tuple[str, str, str, str]]:
        """pod_labels() of every pod on this node now: their series are alive."""
        return {self.pod_labels(p) for p in self.source.local_pods()}

    def peer(self, ip: str) -> Peer:
        pod = self.source.pod_by_ip(ip)
        if pod is not None and not pod.host_network:
            return Peer(pod.namespace, pod.workload_name, True)
        svc = self.source.service_by_ip(ip)
        if svc is not None:
            if (svc.namespace, svc.name) == ("default", "kubernetes"):
                return Peer("", APISERVER, False)
            return Peer(svc.namespace, svc.name, False)
        node = self.source.node_by_ip(ip)
        if node is not None:
            return Peer("", node.name, False)
        if pod is not None:  # a hostNetwork pod whose node we do not know
            return Peer("", pod.node or self.node_name, False)
        return Peer("", EXTERNAL, False)
