"""What captures may take of a node: disk (captures.nodeQuota, and a namespace's
share of it), running captures at once (captures.maxConcurrent) and how long
finished files stay (captures.retention).

The quota counts what running captures may still write plus what finished
captures keep on the node. A running capture holds twice its maxBytes: while
its file is merged (and bundled), the per-interface files and the merged file
are on disk together. A finished capture holds the bytes its directory really
takes. The controller asks `refusal()` before a capture starts; the engine
then stops the capture at its maxBytes, so it never writes past its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QUOTA_CAP = 5 << 30  # 5Gi ...
DEFAULT_QUOTA_SHARE = 10  # ... or 10% of the base directory's filesystem, the smaller
NAMESPACE_QUOTA = "fovea.dev/capture-quota"  # namespace annotation: its captures' share of each node's quota
PEAK_FACTOR = 2  # a running capture's files at their peak, in maxBytes


def default_quota(base: Path) -> int:
    """The smaller of 5Gi and 10% of the filesystem that holds `base`."""
    fs = os.statvfs(base)
    return min(DEFAULT_QUOTA_CAP, fs.f_blocks * fs.f_frsize // DEFAULT_QUOTA_SHARE)


def du(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed meanwhile
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def size(text: str) -> int | None:
    """Bytes of a quantity (500Mi, 2Gi, 1000000), None if it is not one."""
    from capture.spec import SpecError, parse_bytes

    try:
        value = parse_bytes(text.strip() if isinstance(text, str) else text)
    except SpecError:
        return None
    return value if value >= 0 else None


def show(n: int) -> str:
    """A size for people: 512Mi, 1.5Gi, 800 bytes."""
    for unit, scale in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class NodeLimits:
    """The captures.* settings that protect the node."""

    quota: int = 0  # bytes; 0: default_quota(base directory)
    max_concurrent: int = 2
    retention: float = 86400.0  # seconds a finished node-local file stays


@dataclass(frozen=True)
class Usage:
    """One capture's hold on the node."""

    namespace: str  # "" for a ClusterCapture (never limited by a namespace share)
    bytes: int
    running: bool


def refusal(need: int, namespace: str, node: str, quota: int, usage: list[Usage],
            namespace_quota: int | None) -> tuple[str, str]:
    """(reason, message) why a capture that needs `need` bytes cannot start now; ("", "") if it can.
    The reason labels fovea_capture_refused_total."""
    held = sum(u.bytes for u in usage)
    kept = sum(u.bytes for u in usage if not u.running)
    needs = f"the capture needs {show(need)} of node {node}'s capture quota (twice its maxBytes while it is written)"
    if held + need > quota:
        return "node_quota", (f"{needs}; {show(max(0, quota - held))} of captures.nodeQuota {show(quota)} is free "
                              f"({show(held - kept)} held by running captures, {show(kept)} kept by finished ones)")
    if namespace and namespace_quota is not None:
        mine = sum(u.bytes for u in usage if u.namespace == namespace)
        if mine + need > namespace_quota:
            return "namespace_quota", (f"{needs}; namespace {namespace} has {show(max(0, namespace_quota - mine))} "
                                       f"free of its share {show(namespace_quota)} (annotation {NAMESPACE_QUOTA})")
    return "", ""


REFUSALS = ("node_quota", "namespace_quota", "concurrency")


def metric_families(stats: dict) -> list:
    """fovea_capture_* from CaptureController.stats()."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    kept = GaugeMetricFamily("fovea_capture_node_bytes", "Bytes of capture files on this node (running and kept)")
    kept.add_metric([], stats["node_bytes"])
    quota = GaugeMetricFamily("fovea_capture_quota_bytes", "captures.nodeQuota in effect on this node")
    quota.add_metric([], stats["quota_bytes"])
    running = GaugeMetricFamily("fovea_capture_running", "Captures running on this node")
    running.add_metric([], stats["running"])
    waiting = GaugeMetricFamily("fovea_capture_waiting", "Captures waiting for a slot on this node "
                                "(captures.maxConcurrent)")
    waiting.add_metric([], stats["waiting"])
    refused = CounterMetricFamily("fovea_capture_refused", "Captures this node refused, by why", labels=["reason"])
    for reason in REFUSALS:
        refused.add_metric([reason], stats["refused"].get(reason, 0))
    return [kept, quota, running, waiting, refused]
