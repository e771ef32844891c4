#!/usr/bin/env python3
"""Spans per second and agent cost with a steady rate of flows, then memory with the collector down.

Builds a NodeLab with two pods, runs `fovea agent --standalone` with flows on
and OTLP to a gRPC receiver in this process (tests/otlp_receiver.py), then:

1. collector up: `--rate` new UDP flows per second from pod 0 to pod 1 (one
   datagram each, from source ports taken in turn, to a socket that reads
   them, so no drops; each flow ends by the idle timeout and becomes one span) for
   `--seconds`; measured: spans received
   per second, the agent's CPU (utime+stime of /proc/<pid>/stat over the
   phase, % of one core), its RSS;
2. collector down (the receiver stopped): the same rate for `--down-seconds`;
   the agent's RSS sampled every 10 s, and its span counters (dropped,
   failed) at the end.

Needs root. Progress to stderr, a markdown report to stdout.

    .venv/bin/python bench/flows.py --rate 1000 --seconds 60 --down-seconds 180
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no fork() notices from the receiver's threads
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.lab.netlab import NodeLab  # noqa: E402
from agent.nsenter import in_netns  # noqa: E402
from bench.datapath import cpu_seconds, fovea_cli, free_port, progress  # noqa: E402
from tests.otlp_receiver import GrpcReceiver  # noqa: E402

IDLE = 2.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("fovea_agent_spans") or line.startswith("fovea_agent_records_total"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


SINK_PORT = 9999


def sink(lab: NodeLab) -> socket.socket:
    """A UDP socket in pod 1 that reads and discards: flows to it cause no drops."""
    s = lab.socket(lab.pods[1].netns, socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((lab.pods[1].ipv4, SINK_PORT))

    def drain():
        while True:
            try:
                s.recv(65536)
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    return s


FIRST_PORT, PORTS = 10000, 50000  # source ports in turn: one is reused after 50 s, long after its flow ended


def send_flows(lab: NodeLab, rate: int, seconds: float, first: int) -> int:
    """`rate` one-datagram UDP flows per second (each from its own source port, to
    the sink), paced in 10 ms steps; returns how many."""
    src, dst = lab.pods
    sent = 0
    start = time.monotonic()
    with in_netns(src.netns):
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate)
            while sent < due:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((src.ipv4, FIRST_PORT + (first + sent) % PORTS))
                    s.sendto(b"x" * 32, (dst.ipv4, SINK_PORT))
                sent += 1
            time.sleep(0.01)
    return sent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=int, default=1000, help="new flows per second (default 1000)")
    p.add_argument("--seconds", type=float, default=60, help="collector-up phase (default 60)")
    p.add_argument("--down-seconds", type=float, default=180, help="collector-down phase (default 180)")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("needs root")

    lab = NodeLab("fvf%04x" % random.randrange(16**4), pods=2, ipv6=False, octet=random.randrange(100, 200))
    receiver = GrpcReceiver()
    port = free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(f"pods: {{interfaces: ['{lab.prefix}p*']}}\nflows: {{idleTimeout: {IDLE}}}\n"
              f"otlp: {{enabled: true, protocol: grpc, endpoint: '{receiver.endpoint}', maxSpansPerSecond: 100000}}\n")
    cfg.close()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    agent = sink_socket = None
    try:
        lab.up()
        sink_socket = sink(lab)
        agent = subprocess.Popen([fovea_cli(), "agent", "--standalone", "--uplink", lab.uplink, "--port", str(port),
                                  "--node-name", f"bench-{port}", "--observe-port", "0", "--observe-socket", "",
                                  "--config", cfg.name], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("agent did not start:\n" + Path(log.name).read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(2)

        progress(f"collector up: {args.rate} flows/s for {args.seconds:.0f}s")
        spans0, cpu0, t0 = len(receiver.spans), cpu_seconds(agent.pid), time.monotonic()
        sent = send_flows(lab, args.rate, args.seconds, 0)
        time.sleep(IDLE + 3)  # the last flows end and go out
        wall = time.monotonic() - t0
        up_cpu = 100 * (cpu_seconds(agent.pid) - cpu0) / wall
        last, deadline = -1, time.monotonic() + 30
        while len(receiver.spans) != last and time.monotonic() < deadline:  # stragglers: count, not CPU
            last = len(receiver.spans)
            time.sleep(2)
        spans = len(receiver.spans) - spans0
        up_rss = rss_kib(agent.pid)
        up = scrape(port)
        progress(f"{sent} flows sent, {spans} spans received, agent CPU {up_cpu:.1f}%")

        receiver.stop()
        progress(f"collector down: {args.rate} flows/s for {args.down_seconds:.0f}s")
        rss = [(0.0, rss_kib(agent.pid))]
        t1 = time.monotonic()
        cpu1 = cpu_seconds(agent.pid)
        down_sent = 0
        while (elapsed := time.monotonic() - t1) < args.down_seconds:
            down_sent += send_flows(lab, args.rate, min(10, args.down_seconds - elapsed), sent + down_sent)
            rss.append((time.monotonic() - t1, rss_kib(agent.pid)))
            progress(f"  {rss[-1][0]:.0f}s: RSS {rss[-1][1] / 1024:.1f} MiB")
        down_cpu = 100 * (cpu_seconds(agent.pid) - cpu1) / (time.monotonic() - t1)
        time.sleep(IDLE + 2)
        down = scrape(port)
        healthy = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
    finally:
        if sink_socket is not None:
            sink_socket.close()
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=60)
        lab.down()
        os.unlink(cfg.name)
        os.unlink(log.name)

    def delta(name):
        return down.get(name, 0) - up.get(name, 0)

    print("| phase | flows sent | spans received | spans/s | agent CPU, % of one core | RSS, MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| collector up, {args.seconds:.0f} s | {sent} | {spans} | {spans / args.seconds:.0f} | "
          f"{up_cpu:.1f} | {up_rss / 1024:.1f} |")
    print(f"| collector down, {args.down_seconds:.0f} s | {down_sent} | – | – | {down_cpu:.1f} | "
          f"{rss[0][1] / 1024:.1f} → {rss[-1][1] / 1024:.1f} (max {max(r for _, r in rss) / 1024:.1f}) |")
    print()
    queue_full = delta('fovea_agent_spans_dropped_total{reason="queue_full"}')
    print(f"While down: spans dropped (queue full) {queue_full:.0f}, "
          f"failed {delta('fovea_agent_spans_failed_total'):.0f}, exported {delta('fovea_agent_spans_exported_total'):.0f}, "
          f"queued at the end {down.get('fovea_agent_spans_queued', 0):.0f}; /healthz {'ok' if healthy else 'FAILING'}.")
    print("RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{r / 1024:.1f}" for t, r in rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
