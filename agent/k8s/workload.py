"""A pod's workload: the top owner a person would name (Deployment, CronJob, ...).

A pod's ownerReferences name only its direct controller. The usual chains are
recovered from names and labels, without extra API calls (and so without
RBAC to read ReplicaSets or Jobs):

- ReplicaSet -> Deployment: a Deployment names its ReplicaSets
  "<deployment>-<pod-template-hash>", and the pods carry the
  `pod-template-hash` label. Without that label (a ReplicaSet made by hand)
  the ReplicaSet itself is the workload.
- Job -> CronJob: a CronJob names its Jobs "<cronjob>-<scheduled time in
  minutes since the epoch>"; pods reference only the Job. So a Job name ending
  in "-" and 8 or more digits (minutes since 1970 have 8 digits from 1973 to
  2160) is taken as a CronJob's; "migrate-2" stays a Job. A hand-made Job named
  like "backup-28930000" would be misread: the price of needing no Job lookup.
- ReplicationController -> DeploymentConfig (OpenShift) when the pod carries
  the `deploymentconfig` label.
- StatefulSet, DaemonSet and any other kind: the owner itself.
- No controller: the pod is its own workload, kind "Pod".
"""

from __future__ import annotations

import re

_CRONJOB_JOB = re.compile(r"(?P<cronjob>.+)-\d{8,}")


def workload_of(meta: dict) -> tuple[str, str]:
    """(kind, name) of the top owner of a pod, from its metadata."""
    refs = meta.get("ownerReferences") or []
    owner = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not owner or not owner.get("kind") or not owner.get("name"):
        return "Pod", meta.get("name", "")
    kind, name = owner["kind"], owner["name"]
    labels = meta.get("labels") or {}
    if kind == "ReplicaSet":
        hash_ = labels.get("pod-template-hash")
        if hash_ and name.endswith("-" + hash_) and len(name) > len(hash_) + 1:
            return "Deployment", name[: -len(hash_) - 1]
    elif kind == "Job":
        m = _CRONJOB_JOB.fullmatch(name)
        if m:
            return "CronJob", m.group("cronjob")
    elif kind == "ReplicationController" and labels.get("deploymentconfig"):
        return "DeploymentConfig", labels["deploymentconfig"]
    return kind, name
