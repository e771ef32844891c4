#!/usr/bin/env python3
"""The agent's footprint, for sizing the DaemonSet's requests and limits.

On a lab node (agent/lab/netlab.py: two pods and a world behind the lab uplink),
start the agent --starts times with its default plugins and measure, each time:
seconds and CPU seconds until /readyz (its compiler processes' CPU included),
the agent's peak RSS so far (VmHWM) and its compiler processes' peak RSS
(fovea_agent_compiler_peak_rss_bytes). The run has a compiled-program cache
of its own (kernel.cacheDir), empty at first: the first start compiles, every
later one takes its programs from the cache (reported apart). Then keep the
last agent running for --seconds with light traffic (pod-to-pod and
pod-to-world UDP at ~200 packets/s) and a scrape every --scrape-interval
seconds, and measure its CPU use and its RSS at the end.

    .venv/bin/python bench/footprint.py --starts 5 --seconds 30

With --api the agents run against a Kubernetes API emulator (tests/k8s_emulator.py,
in this process) that knows the lab's node and pods, as in a cluster: the
Kubernetes client and the cache are in the agent's memory then.

With --keep-attached every agent runs with lifecycle.keepAttached on one node
name: every start after the first is also a restart that adopts the maps and
programs the previous agent left.

Needs root. Everything is made in the lab's namespaces and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datapath import Agent, cpu_seconds, progress, vm_hwm_kib  # noqa: E402

from agent.lab.netlab import NodeLab  # noqa: E402
from agent.nsenter import in_netns  # noqa: E402
from agent.pins import NodePins  # noqa: E402


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def compiler_peak_kib(url: str) -> int:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(r"^fovea_agent_compiler_peak_rss_bytes (\S+)$", text, re.M)
    return int(float(m.group(1))) // 1024 if m else 0


def cluster(lab: NodeLab, node: str, directory: str) -> str:
    """A Kubernetes API emulator that knows the lab's node and its pods; returns a kubeconfig."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod

    api = K8sEmulator().start()
    api.create(make_namespace("shop"))
    api.create(make_node(node, "192.0.2.10"))
    for i, pod in enumerate(lab.pods):
        api.create(make_pod(f"web-{i}", "shop", node, pod.ipv4, owner=("ReplicaSet", "web-7d9c")))
    return str(api.write_kubeconfig(Path(directory, "kubeconfig")))


def traffic(lab: NodeLab, stop: threading.Event) -> None:
    web, db = lab.pods[:2]
    with in_netns(web.netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        while not stop.wait(0.01):
            s.sendto(b"x" * 100, (db.ipv4, 9))
            s.sendto(b"x" * 100, (lab.world.ipv4, 9))
    finally:
        s.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--scrape-interval", type=float, default=5)
    p.add_argument("--api", action="store_true", help="run the agents against a Kubernetes API emulator")
    p.add_argument("--keep-attached", action="store_true",
                   help="restarts: lifecycle.keepAttached on, one node name for every start")
    args = p.parse_args()
    lab = NodeLab("fvfoot", pods=2, ipv6=False, octet=236)
    starts = []
    cache = tempfile.TemporaryDirectory(prefix="fovea-bench-cache-")
    config = tempfile.NamedTemporaryFile("w", prefix="fovea-bench-", suffix=".yaml", delete=False)
    config.write(f"kernel: {{cacheDir: {cache.name}}}\n")
    if args.keep_attached:
        config.write("lifecycle: {keepAttached: true}\n")
    config.close()
    node = {"node": f"bench-keep-{os.getpid()}"} if args.keep_attached or args.api else {}
    with lab, cache:
        api = cluster(lab, node["node"], cache.name) if args.api else None
        for i in range(args.starts):
            agent = Agent(lab.uplink, interval=1.0, config=config.name, kubeconfig=api, **node)
            starts.append((agent.ready_seconds, cpu_seconds(agent.pid, children=True), vm_hwm_kib(agent.pid),
                           compiler_peak_kib(agent.url)))
            progress(f"start {i + 1}: ready in {agent.ready_seconds:.1f}s, {starts[-1][1]:.2f} CPU s, "
                     f"VmHWM {starts[-1][2] / 1024:.0f} MiB, compiler peak {starts[-1][3] / 1024:.0f} MiB")
            if i < args.starts - 1:
                agent.close()
        stop = threading.Event()
        sender = threading.Thread(target=traffic, args=(lab, stop), daemon=True)
        sender.start()
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        while time.monotonic() - t0 < args.seconds:
            urllib.request.urlopen(agent.url + "/metrics", timeout=10).read()
            time.sleep(args.scrape_interval)
        cpu = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
        rss, hwm = vm_rss_kib(agent.pid), vm_hwm_kib(agent.pid)
        stop.set()
        sender.join()
        agent.close()
        if node:  # what the last agent kept
            NodePins(node["node"]).remove()
    os.unlink(config.name)
    first, restarts = starts[0], starts[1:] or starts
    ready_s, ready_cpu, peaks, _ = zip(*restarts)
    flags = "".join(f", --{f}" for f in ("keep-attached", "api") if getattr(args, f.replace("-", "_")))
    print(f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, kernel {platform.release()}, "
          f"{args.starts} starts, default plugins, --interval 1{flags}.\n")
    print("| measure | first start (compiles) | later starts: median | max |\n|---|---:|---:|---:|")
    print(f"| start to /readyz, s | {first[0]:.1f} | {statistics.median(ready_s):.1f} | {max(ready_s):.1f} |")
    print(f"| CPU until /readyz (compiler processes included), CPU s | {first[1]:.2f} | "
          f"{statistics.median(ready_cpu):.2f} | {max(ready_cpu):.2f} |")
    print(f"| agent's peak RSS at /readyz (VmHWM), MiB | {first[2] / 1024:.1f} | {statistics.median(peaks) / 1024:.1f} "
          f"| {max(peaks) / 1024:.1f} |")
    later = ", ".join(f"{s[3] / 1024:.0f}" for s in starts[1:]) or "-"
    print(f"| compiler processes' peak RSS, MiB | {first[3] / 1024:.1f} | {later} | |")
    print(f"\nThe last agent, running {args.seconds:.0f} s with traffic and scrapes: {100 * cpu:.1f}% of one core, "
          f"RSS at the end (VmRSS) {rss / 1024:.1f} MiB, peak over its life (VmHWM) {hwm / 1024:.1f} MiB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
