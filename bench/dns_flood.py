#!/usr/bin/env python3
"""DNS flood between two lab pods: the agent's CPU and whether its counters stay exact.

Builds a NodeLab with two pods. Pod 1 runs a minimal UDP responder on port 53
(it flips the QR bit of each query and sends it back: NOERROR, no answers);
pod 0 sends queries of four types (A, AAAA, TXT, MX) at a paced rate for a
number of seconds. The agent (`fovea agent --standalone`, its default
plugins) watches the lab's pod interfaces. For each sampling ratio:

* agent CPU (utime+stime from /proc/<pid>/stat) over the flood, as % of one
  core, beside the same agent's CPU over an idle window of the same length;
* counters against ground truth: fovea_dns_requests_total{qtype} against the
  queries the client sent, fovea_dns_responses_total against the responses
  the server sent, fovea_dns_unanswered_total against the difference (after
  dns.timeout), and the latency histogram's count against the responses;
* lost sampled messages (fovea_agent_lost_events_total{source="dns_events"})
  and rejects.

Each process runs in its own namespace as a subprocess (no shared GIL).
Needs root. Everything is created in the lab's namespaces and removed at the end.

    .venv/bin/python bench/dns_flood.py --rate 5000 --seconds 20 --ratios 0.01,1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent.lab.netlab import NodeLab  # noqa: E402
from datapath import Agent, cpu_seconds, progress  # noqa: E402

QTYPES = {"A": 1, "AAAA": 28, "TXT": 16, "MX": 15}
TIMEOUT = 2.0  # dns.timeout of the agent under test

SERVER = r"""
import json, signal, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], 53))
sent = 0
def done(*_):
    print(json.dumps({"responses": sent}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    if len(data) >= 12:
        s.sendto(data[:2] + b"\x81\x80" + data[4:], peer)
        sent += 1
"""

CLIENT = r"""
import json, socket, struct, sys, time
server, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
qtypes = json.loads(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.setblocking(False)
name = b"\x03www\x04shop\x07example\x00"
kinds = list(qtypes.items())
sent = {k: 0 for k in qtypes}
received = 0
i = 0
start = time.monotonic()
while True:
    elapsed = time.monotonic() - start
    if elapsed >= seconds:
        break
    due = int(elapsed * rate)
    while i < due:
        label, code = kinds[i % len(kinds)]
        s.sendto(struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", code, 1),
                 (server, 53))
        sent[label] += 1
        i += 1
    while True:
        try:
            s.recv(2048)
            received += 1
        except BlockingIOError:
            break
    time.sleep(0.002)
time.sleep(0.5)
while True:
    try:
        s.recv(2048)
        received += 1
    except BlockingIOError:
        break
print(json.dumps({"sent": sent, "received": received, "seconds": time.monotonic() - start}))
"""


def scrape(agent: Agent) -> dict[str, float]:
    """DNS and lost-event samples: {'name{labels}': value}."""
    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("fovea_dns_", "fovea_agent_dns_", "fovea_agent_lost_events_total")):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def settled(agent: Agent, want: float) -> dict:
    """A scrape once the unanswered queries have been expired (or 30 s passed)."""
    deadline = time.monotonic() + 30
    while True:
        time.sleep(1)
        m = scrape(agent)
        got = sum(v for k, v in m.items() if k.startswith("fovea_dns_unanswered_total"))
        if got >= want or time.monotonic() > deadline:
            time.sleep(1.5 * agent.interval)
            return scrape(agent)


def run(lab: NodeLab, ratio: float, rate: float, seconds: float) -> dict:
    client_ep, server_ep = lab.pods
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as cfg:
        # A node name of its own: tc filters are named after the node, and another agent
        # on this host under the default name would replace (and then remove) ours.
        json.dump({"nodeName": f"{lab.prefix}-{os.getpid()}", "pods": {"interfaces": [lab.prefix + "p*"]},
                   "dns": {"timeout": TIMEOUT, "sampleRatio": ratio}}, cfg)
    server = subprocess.Popen(["ip", "netns", "exec", server_ep.netns, sys.executable, "-c", SERVER, server_ep.ipv4],
                              stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        assert server.stdout.readline().strip() == "ready"
        agent = Agent(lab.uplink, interval=1.0, config=cfg.name)
        time.sleep(2)
        idle0 = cpu_seconds(agent.pid)
        time.sleep(seconds)
        idle = cpu_seconds(agent.pid) - idle0
        before = scrape(agent)
        start_total = sum(v for k, v in before.items() if k.startswith("fovea_dns_unanswered_total"))
        cpu0 = cpu_seconds(agent.pid)
        progress(f"sampleRatio {ratio}: {rate:.0f} queries/s for {seconds:.0f} s")
        out = subprocess.run(["ip", "netns", "exec", client_ep.netns, sys.executable, "-c", CLIENT,
                              server_ep.ipv4, str(rate), str(seconds), json.dumps(QTYPES)],
                             capture_output=True, text=True, check=True)
        cpu = cpu_seconds(agent.pid) - cpu0
        client = json.loads(out.stdout)
        server.send_signal(signal.SIGTERM)
        responses = json.loads(server.communicate(timeout=10)[0].strip().splitlines()[-1])["responses"]
        sent = sum(client["sent"].values())
        after = settled(agent, start_total + sent - responses)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if agent is not None:
            agent.close()
        os.unlink(cfg.name)
    return {
        "ratio": ratio, "rate": sent / client["seconds"], "sent": client["sent"], "responses": responses,
        "cpu": 100 * cpu / client["seconds"], "idle_cpu": 100 * idle / seconds,
        "requests": {q: delta(after, before, f'fovea_dns_requests_total{{qtype="{q}"}}') for q in QTYPES},
        "answered": sum(delta(after, before, k) for k in after if k.startswith("fovea_dns_responses_total")),
        "unanswered": sum(delta(after, before, k) for k in after if k.startswith("fovea_dns_unanswered_total")),
        "latency_count": delta(after, before, "fovea_dns_latency_seconds_count"),
        "lost": delta(after, before, 'fovea_agent_lost_events_total{source="dns_events"}'),
        "rejected": sum(delta(after, before, k) for k in after if k.startswith("fovea_agent_dns_rejected_total")),
    }


def report(results: list[dict], args) -> str:
    lines = [
        f"| dns.sampleRatio | queries/s sent | agent CPU, % of one core (idle) | requests = sent | "
        f"responses = server's | unanswered = difference | latency count | lost sampled | rejected |",
        "|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        sent = sum(r["sent"].values())
        exact_req = all(r["requests"][q] == n for q, n in r["sent"].items())
        lines.append(
            f"| {r['ratio']} | {r['rate']:.0f} | {r['cpu']:.1f} ({r['idle_cpu']:.1f}) | "
            f"{'yes' if exact_req else 'NO'}: {sum(r['requests'].values()):.0f} / {sent} | "
            f"{'yes' if r['answered'] == r['responses'] else 'NO'}: {r['answered']:.0f} / {r['responses']} | "
            f"{'yes' if r['unanswered'] == sent - r['responses'] else 'NO'}: {r['unanswered']:.0f} / "
            f"{sent - r['responses']} | {r['latency_count']:.0f} | {r['lost']:.0f} | {r['rejected']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=5000, help="queries per second (default 5000)")
    p.add_argument("--seconds", type=float, default=20, help="seconds of flood per run (default 20)")
    p.add_argument("--ratios", default="0.01,1", help="dns.sampleRatio values, one run each (default 0.01,1)")
    p.add_argument("--output", metavar="FILE", help="also write the markdown table to FILE")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/dns_flood.py needs root (network namespaces, eBPF)")
    results = []
    with NodeLab("fvd%04x" % random.randrange(16**4), pods=2, ipv6=False, octet=random.randrange(100, 200)) as lab:
        progress(f"lab {lab.prefix} (10.{lab.octet}.0.0/16)")
        for ratio in (float(r) for r in args.ratios.split(",")):
            results.append(run(lab, ratio, args.rate, args.seconds))
    table = report(results, args)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
