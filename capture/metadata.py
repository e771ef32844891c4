"""The metadata bundle: the capture file plus the network state it was taken in.

One `.tar.gz` per node:

    <name>/<capture file>
    <name>/capture.json                      spec, counts, versions, what was collected
    <name>/node/...                           only for node-wide captures (ClusterCapture)
    <name>/pods/<namespace>_<pod>/...         each target pod's network namespace

Per network namespace: addresses, links, routes (all tables), rules and
neighbours (pyroute2), iptables/ip6tables and nftables rules, conntrack entries
of the target pods' addresses, and a socket summary (the standard tools run
inside the namespace with nsenter). A namespaced capture's bundle holds only
its pods' namespaces: `node_wide=False` collects nothing from the host's.
Something that cannot be collected is noted in capture.json, never fatal.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.nsenter import run_in_netns
from capture.engine import PARTIAL, CaptureResult

MAX_TEXT = 16 << 20  # per collected file
MAX_CONNTRACK_LINES = 50_000
COMMAND_TIMEOUT = 30


@dataclass(frozen=True)
class PodNetns:
    namespace: str
    name: str
    netns: str  # path: /proc/<pid>/ns/net or /run/netns/<name>
    ips: tuple[str, ...] = ()


def _plain(msg) -> dict:
    d = msg.dump()
    d.pop("header", None)
    return d


def _netlink_state() -> dict[str, list]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {
            "links": [_plain(m) for m in ipr.get_links()],
            "addresses": [_plain(m) for m in ipr.get_addr()],
            "routes": [_plain(m) for m in ipr.get_routes()],  # every family and table
            "rules": [_plain(m) for m in ipr.get_rules()],
            "neighbours": [_plain(m) for m in ipr.get_neighbours()],
        }


def _command(netns: str | None, *argv: str) -> str:
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip() or done.returncode}")
    return done.stdout[:MAX_TEXT]


def _conntrack(netns: str | None, ips: tuple[str, ...] | None) -> str:
    """Entries that involve one of `ips` in either direction (None: all entries)."""
    text = "".join(_command(netns, "conntrack", "-L", "-f", fam) for fam in ("ipv4", "ipv6"))
    lines = text.splitlines()
    if ips is not None:
        pattern = re.compile(r"(?:src|dst)=(" + "|".join(re.escape(ip) for ip in ips) + r")(?:\s|$)")
        lines = [ln for ln in lines if pattern.search(ln)] if ips else []
    return "\n".join(lines[:MAX_CONNTRACK_LINES]) + ("\n" if lines else "")


def _collect_netns(netns: str | None, conntrack_ips: tuple[str, ...] | None) -> tuple[dict[str, bytes], dict]:
    """Files for one network namespace, and what could not be collected."""
    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    try:
        state = run_in_netns(netns, _netlink_state)
        for key, value in state.items():
            files[f"{key}.json"] = json.dumps(value, indent=1, default=str).encode()
    except Exception as e:
        errors["netlink"] = str(e)
    commands = {
        "iptables.txt": lambda: _command(netns, "iptables-save"),
        "ip6tables.txt": lambda: _command(netns, "ip6tables-save"),
        "nftables.txt": lambda: _command(netns, "nft", "list", "ruleset"),
        "conntrack.txt": lambda: _conntrack(netns, conntrack_ips),
        "sockets.txt": lambda: _command(netns, "ss", "-s"),
    }
    for name, run in commands.items():
        try:
            files[name] = run().encode()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors[name] = str(e)
    return files, errors


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


def collect_bundle(dest: Path, pcap: Path, spec: dict, result: CaptureResult, pods: list[PodNetns],
                   node_wide: bool, versions: dict) -> Path:
    """Write `dest` (.tar.gz): the capture file and the network state of the target pods (and of
    the node when `node_wide`). Written as `<dest>.partial`, then renamed."""
    dest = Path(dest)
    top = _safe(dest.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    collected: dict[str, dict] = {}
    members: dict[str, bytes] = {}
    pod_ips = tuple(ip for p in pods for ip in p.ips)
    if node_wide:
        # The agent's own namespace (the node's, with hostNetwork), named explicitly: the calling
        # thread itself may be elsewhere.
        files, errors = _collect_netns(f"/proc/{os.getpid()}/ns/net", pod_ips if pods else None)
        members.update({f"node/{k}": v for k, v in files.items()})
        collected["node"] = {"files": sorted(files), "errors": errors}
    for pod in pods:
        where = f"pods/{_safe(pod.namespace)}_{_safe(pod.name)}"
        files, errors = _collect_netns(pod.netns, pod.ips)
        members.update({f"{where}/{k}": v for k, v in files.items()})
        collected[where] = {"namespace": pod.namespace, "pod": pod.name, "ips": list(pod.ips),
                            "files": sorted(files), "errors": errors}
    uname = platform.uname()
    info = {
        "spec": spec,
        "result": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()},
        "captureFile": pcap.name,
        "nodeWide": node_wide,
        "versions": {**versions, "kernel": uname.release, "kernelBuild": uname.version, "machine": uname.machine},
        "collectedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "collected": collected,
    }
    members["capture.json"] = json.dumps(info, indent=1, default=str).encode()

    partial = dest.with_name(dest.name + PARTIAL)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                tar.add(pcap, arcname=f"{top}/{pcap.name}", recursive=False,
                        filter=lambda ti: _owned_by_root(ti, 0o600))
                for name, data in sorted(members.items()):
                    ti = _owned_by_root(tarfile.TarInfo(f"{top}/{name}"), 0o600)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest


def _owned_by_root(ti: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mode = mode
    ti.mtime = ti.mtime or int(time.time())
    return ti
