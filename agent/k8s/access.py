"""Every Kubernetes API call the agent makes, declared once.

The ClusterRole in the manifests and the Helm chart is exactly this
declaration (scripts/manifests.py writes it into the chart; tests keep them
equal), and end-to-end tests check that every request the agent made is
covered by it. Add a line here when the agent starts calling something new;
never `*`, and Secrets only with `get` (credentials are read by name, never
listed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    group: str  # "" is the core API group
    resource: str  # plural, with "/subresource" where one is used
    verbs: tuple[str, ...]
    why: str


AGENT_ACCESS: tuple[Access, ...] = (
    Access("", "pods", ("get", "list", "watch"), "name pod traffic; find pods on this node"),
    Access("", "namespaces", ("get", "list", "watch"), "namespace opt-in annotation"),
    Access("", "services", ("get", "list", "watch"), "name ClusterIPs as Services"),
    Access("", "nodes", ("get", "list", "watch"), "name node addresses"),
    Access("", "secrets", ("get",), "object-storage credentials a capture names (by name, never listed)"),
    Access("fovea.dev", "captures", ("get", "list", "watch"), "run the part of each Capture on this node"),
    Access("fovea.dev", "clustercaptures", ("get", "list", "watch"), "the same for ClusterCaptures"),
    Access("fovea.dev", "captures/status", ("update",), "report this node's part; fix expectedNodes"),
    Access("fovea.dev", "clustercaptures/status", ("update",), "the same for ClusterCaptures"),
)

# Only with metricsAuth.enabled: /metrics asks the API server who a bearer
# token belongs to and whether that user may `get` /metrics (kube-rbac-proxy's way).
METRICS_AUTH_ACCESS: tuple[Access, ...] = (
    Access("authentication.k8s.io", "tokenreviews", ("create",), "who presents this token on /metrics"),
    Access("authorization.k8s.io", "subjectaccessreviews", ("create",), "may that user get /metrics"),
)


def agent_access(metrics_auth: bool = False) -> tuple[Access, ...]:
    """What the agent calls with these options on."""
    return AGENT_ACCESS + (METRICS_AUTH_ACCESS if metrics_auth else ())


def cluster_role_rules(access: tuple[Access, ...] = AGENT_ACCESS) -> list[dict]:
    """PolicyRules for the ClusterRole: one rule per API group and verb set, in declaration order."""
    rules: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for a in access:
        rules.setdefault((a.group, a.verbs), []).append(a.resource)
    return [{"apiGroups": [group], "resources": resources, "verbs": list(verbs)}
            for (group, verbs), resources in rules.items()]
