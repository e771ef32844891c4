"""Kubernetes metadata for attribution: who owns an IP, which pods are observed.

- `agent.k8s.cache.KubeCache`: list+watch of the API server (the DaemonSet);
- `agent.k8s.static.StaticPods`: a YAML file of IP -> pod (standalone mode).

Both offer the lookups of `PodDirectory`. This module imports no
`kubernetes` code, so standalone mode does not pay for it.
"""

from agent.k8s.records import (
    OBSERVE_ANNOTATION,
    NamespaceRecord,
    NodeRecord,
    PodDirectory,
    PodRecord,
    ServiceRecord,
)

__all__ = [
    "OBSERVE_ANNOTATION",
    "NamespaceRecord",
    "NodeRecord",
    "PodDirectory",
    "PodRecord",
    "ServiceRecord",
]
