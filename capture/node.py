"""This node's part of a capture: which interfaces, then engine -> bundle -> output.

The controller (capture/controller.py) decides what runs; this module runs it
with the engine (capture/engine.py), the metadata bundle (capture/metadata.py)
and the outputs (capture/outputs.py), and turns the result into the node's
report for `status.nodes.<node>`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
import shutil
from pathlib import Path

from capture import status as st
from capture.controller import Job, LocalTarget
from capture.spec import CaptureSpec, SpecError

log = logging.getLogger(__name__)


def local_target(pods: list[dict], spec: CaptureSpec, scan, uplinks: list[str]) -> LocalTarget:
    """Interfaces of the target pods on this node (scan() -> {ifindex: PodInterface}), or the
    node's uplinks for a node target or a hostNetwork pod (ClusterCapture only: the
    controller refuses hostNetwork pods for a Capture before this)."""
    if spec.target.nodes:
        return LocalTarget([(u, "node uplink") for u in uplinks], [], True)
    by_ip = {}
    for iface in scan().values():
        for ip in iface.ips:
            by_ip[ip] = iface
    interfaces, bundle_pods, node_wide, missing = [], [], spec.cluster, []
    for pod in pods:
        meta, ips = pod["metadata"], [p.get("ip") for p in (pod.get("status") or {}).get("podIPs") or []]
        ips = ips or [(pod.get("status") or {}).get("podIP")]
        ref = f"{meta.get('namespace')}/{meta['name']}"
        if (pod.get("spec") or {}).get("hostNetwork"):
            interfaces += [(u, f"node uplink (hostNetwork pod {ref})") for u in uplinks
                           if (u, f"node uplink (hostNetwork pod {ref})") not in interfaces]
            node_wide = True
            continue
        iface = next((by_ip[ip] for ip in ips if ip in by_ip), None)
        if iface is None:
            missing.append(ref)
            continue
        if iface.ifname not in [i for i, _ in interfaces]:
            interfaces.append((iface.ifname, f"pod {ref}"))
        bundle_pods.append((meta.get("namespace", ""), meta["name"], iface.netns, tuple(i for i in ips if i)))
    if missing and not interfaces:
        raise SpecError(f"no interface found on this node for pod(s) {', '.join(missing)}",
                        "the pod may not have started yet")
    if not interfaces:
        raise SpecError("no target pod runs on this node any more", "")
    return LocalTarget(interfaces, bundle_pods, node_wide)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_job(job: Job, target: LocalTarget, secret: dict, directory: Path, started, node: str,
            allowlist: tuple[str, ...], ring_memory: int | None = None) -> dict:
    """Capture, bundle, deliver; returns the node report. A stopped job (resource deleted,
    agent stopping) leaves its files for the controller to remove."""
    from capture.engine import RING_BUDGET_BYTES, CaptureRun, Interface, Limits, clean_partials

    spec = job.spec
    endpoint = _endpoint(spec, secret)
    if endpoint:
        from capture.outputs import check_endpoint

        check_endpoint(endpoint, list(allowlist))  # before anything is captured: nothing is sent
    from capture.outputs import host_path

    # Only the capture's uid names the directory, and host_path refuses anything that would leave the base.
    directory = host_path(directory.parent, directory.name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    clean_partials(directory)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{spec.name}-{node}-{stamp}"
    pcap = directory / f"{base}.pcap"  # pcapng inside (one block per interface); readers go by content
    run = CaptureRun([Interface(name, comment) for name, comment in target.interfaces], spec.filter,
                     Limits(spec.duration, spec.max_bytes, spec.max_packets or None, spec.snap_length), pcap,
                     ring_budget=ring_memory or RING_BUDGET_BYTES)
    start_time = st.now()
    run.start()
    started()
    while (result := run.wait(0.2)) is None:
        if job.stop.is_set():
            run.stop()
    if job.stop.is_set():
        return {"phase": st.FAILED, "message": "stopped before the end"}
    report = {"phase": st.SUCCEEDED, "startTime": start_time, "packets": result.packets, "bytes": result.bytes,
              "droppedPackets": result.dropped_packets,
              "message": f"stopped by {result.stop_reason}" + (f": {result.message}" if result.message else "")}
    if result.stop_reason == "error":
        report["phase"] = st.FAILED
    artifact = pcap
    if spec.include_metadata:
        from agent import __version__
        from capture.metadata import PodNetns, collect_bundle

        artifact = collect_bundle(
            directory / f"{base}.tar.gz", pcap, _spec_dict(spec), result,
            [PodNetns(ns, name, path, ips) for ns, name, path, ips in target.pods],
            target.node_wide, {"fovea": __version__})
        pcap.unlink(missing_ok=True)
    report["artifact"] = _deliver(job, artifact, node, secret, allowlist)
    return report


def _endpoint(spec: CaptureSpec, secret: dict) -> str:
    if spec.output.kind == "s3":
        return spec.output.s3.endpoint
    if spec.output.kind == "azureBlob":
        url = secret.get("sasUrl", "")
        if not url:
            raise SpecError(f"Secret {spec.output.secret} has no sasUrl", "put a container SAS URL under sasUrl")
        return url
    return ""


def _deliver(job: Job, path: Path, node: str, secret: dict, allowlist: tuple[str, ...]) -> dict:
    spec = job.spec
    if spec.output.kind == "hostPath":
        # Served by the agent (/captures/) only to a request with this token.
        return {"location": f"hostpath://{node}/{job.uid}/{path.name}", "size": path.stat().st_size,
                "sha256": sha256_of(path), "downloadToken": secrets.token_urlsafe(24)}
    from capture import outputs

    if spec.output.kind == "s3":
        s3 = spec.output.s3
        for key in ("accessKeyId", "secretAccessKey"):
            if not secret.get(key):
                raise SpecError(f"Secret {spec.output.secret} has no {key}", "see docs/captures.md")
        art = outputs.upload_s3(path, endpoint=s3.endpoint, bucket=s3.bucket, key=s3.prefix + path.name,
                                region=s3.region, access_key=secret["accessKeyId"],
                                secret_key=secret["secretAccessKey"], allowlist=list(allowlist))
    else:
        art = outputs.upload_azure_blob(path, sas_url=secret["sasUrl"], blob_name=path.name,
                                        allowlist=list(allowlist))
    shutil.rmtree(path.parent, ignore_errors=True)  # uploaded: nothing stays on the node
    return {"location": art.location, "size": art.size, "sha256": art.sha256}


def _spec_dict(spec: CaptureSpec) -> dict:
    return {"kind": spec.kind, "namespace": spec.namespace, "name": spec.name, "filter": spec.filter,
            "duration": spec.duration, "maxBytes": spec.max_bytes, "maxPackets": spec.max_packets,
            "snapLength": spec.snap_length, "output": spec.output.kind}
