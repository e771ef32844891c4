#!/usr/bin/env python3
"""The agent's footprint, for sizing the DaemonSet's requests and limits.

On a lab node (agent/lab/netlab.py: two pods and a world behind the lab uplink),
start the agent --starts times with its default plugins and measure, each time:
seconds and CPU seconds until /readyz (the eBPF compile included) and the peak
RSS so far (VmHWM). Then keep the last agent running for --seconds with light
traffic (pod-to-pod and pod-to-world UDP at ~200 packets/s) and a scrape every
--scrape-interval seconds, and measure its CPU use and its RSS at the end.

    .venv/bin/python bench/footprint.py --starts 5 --seconds 30

With --keep-attached every agent runs with lifecycle.keepAttached on one node
name: the first start is a fresh one, every later one a restart with unchanged
programs that adopts what the previous agent left (reported apart).

Needs root. Everything is made in the lab's namespaces and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
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
    p.add_argument("--keep-attached", action="store_true",
                   help="restarts: lifecycle.keepAttached on, one node name for every start")
    args = p.parse_args()
    lab = NodeLab("fvfoot", pods=2, ipv6=False, octet=236)
    starts = []
    keep = {}
    if args.keep_attached:
        config = tempfile.NamedTemporaryFile("w", prefix="fovea-bench-", suffix=".yaml", delete=False)
        config.write("lifecycle: {keepAttached: true}\n")
        config.close()
        keep = {"config": config.name, "node": f"bench-keep-{os.getpid()}"}
    with lab:
        for i in range(args.starts):
            agent = Agent(lab.uplink, interval=1.0, **keep)
            starts.append((agent.ready_seconds, agent.ready_cpu, vm_hwm_kib(agent.pid)))
            progress(f"start {i + 1}: ready in {agent.ready_seconds:.1f}s, {agent.ready_cpu:.2f} CPU s, "
                     f"VmHWM {starts[-1][2] / 1024:.0f} MiB")
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
        if keep:  # what the last agent kept
            NodePins(keep["node"]).remove()
            os.unlink(keep["config"])
    if keep:
        print(f"First start (fresh): ready in {starts[0][0]:.1f} s, {starts[0][1]:.2f} CPU s. "
              "The table is of the restarts, which adopt the pinned maps and programs.\n")
        starts = starts[1:] or starts
    ready_s, ready_cpu, peaks = zip(*starts)
    print(f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, kernel {platform.release()}, "
          f"{args.starts} starts, default plugins, --interval 1{', --keep-attached' if keep else ''}.\n")
    print("| measure | median | max |\n|---|---:|---:|")
    print(f"| start to /readyz, s | {statistics.median(ready_s):.1f} | {max(ready_s):.1f} |")
    print(f"| CPU until /readyz (compile included), CPU s | {statistics.median(ready_cpu):.2f} | {max(ready_cpu):.2f} |")
    print(f"| peak RSS at /readyz (VmHWM), MiB | {statistics.median(peaks) / 1024:.1f} | {max(peaks) / 1024:.1f} |")
    print(f"| running {args.seconds:.0f} s with traffic and scrapes: CPU, % of one core | {100 * cpu:.1f} | |")
    print(f"| running: RSS at the end (VmRSS), MiB | {rss / 1024:.1f} | |")
    print(f"| running: peak RSS over its life (VmHWM), MiB | {hwm / 1024:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
