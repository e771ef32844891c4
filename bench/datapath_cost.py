#!/usr/bin/env python3
"""What Fovea's tc programs cost a packet, beside the least any flow counter costs.

One run, side by side, on a lab node (agent/lab/netlab.py: a pod routed through
the host to a "world" namespace behind the lab uplink), with the programs at
the same hooks (both hooks of the pods' host-side veths and of the uplink):

* none: no program;
* empty: a program that returns at once (the hook's own cost), tcx and clsact;
* reference: bench/reference.c, which parses the headers in place and adds the
  packet to a per-CPU 5-tuple hash: one hash operation, the floor of a flow counter;
* fovea: the agent (`fovea agent --standalone`, default plugins and flows),
  attached with tcx and with the clsact fallback (tc.mode);
* fovea-nohttp: the same agent with `http.enabled: false` (tcx): HTTP parsing
  compiled out of the pods programs. Against fovea, in the same rounds, it shows
  what HTTP parsing costs packets that are not HTTP, and what it costs an HTTP
  message.

Traffic from the pod to the world: iperf3 UDP with 64-byte payloads at an
unlimited rate (packets/s sent: on veths the sender's CPU runs the whole
path), one iperf3 TCP stream (Gbit/s received), a DNS flood (queries at
--dns-rate to a responder in the world, which answers each one), and HTTP: a
keep-alive HTTP/1.1 client (http.client) sending small GETs as fast as it can,
one after the other on one connection, to a server (http.server) on port 8080
(an `http.ports` port) in the world, which answers each with one segment.

Program time: `kernel.bpf_stats_enabled` makes the kernel time every program
run (run_time_ns, run_cnt, read with bpftool). Its clock reads cost time
themselves, so throughput is measured in runs of its own with the stats off.
"ns per packet" is the programs' total run time at the lab's hooks over the
packets (skbs) that crossed the uplink, each of which also crossed one pod
veth: the cost of the whole path. The stats' own clock reads are in every
run time, so the empty program's time is that floor: the "work" column
subtracts it (same mode), and the ratio to the reference is taken on it too.
For HTTP, "ns per HTTP message" is the same run time over the messages
(requests and responses) the client sent and received. Conditions are
interleaved round by round; medians over rounds, and the HTTP on/off ratios
also round by round, with their spread. Other Fovea agents or tests on the
host attach to these veths too and compete for the CPUs: runs that see a
program not ours at the lab's hooks are flagged and left out.

Needs root, iperf3, bpftool. Everything is made in the lab's namespaces and removed.

    .venv/bin/python bench/datapath_cost.py --rounds 3 --seconds 5
    .venv/bin/python bench/datapath_cost.py --conditions none,reference,fovea,fovea-nohttp  # HTTP on/off
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent.kernel.headers import find_headers  # noqa: E402
from agent.lab.netlab import NodeLab  # noqa: E402
from agent.tc import TcAttacher, tcx_program_ids, tcx_supported  # noqa: E402
from datapath import Agent, iperf, link_stat, progress  # noqa: E402
from dns_flood import CLIENT, SERVER  # noqa: E402

CONDITIONS = ("none", "empty", "empty-clsact", "reference", "fovea", "fovea-clsact", "fovea-nohttp")
TRAFFIC = {"udp64": "UDP 64-byte payloads, kpps sent", "tcp": "TCP bulk, Gbit/s",
           "dns": "DNS flood (queries + responses), kpps",
           "http": "HTTP/1.1 keep-alive GETs, k requests/s"}
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
HOOKS = ("ingress", "egress")
GOAL_COST = 1.5  # program time per packet, Fovea over reference
GOAL_THROUGHPUT = {"udp64": 0.95, "tcp": 0.98}
GOAL_COST_KINDS = ("udp64", "tcp", "dns")
HTTP_PORT = 8080  # one of http.ports' defaults

HTTP_SERVER = r"""
import http.server, signal, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    wbufsize = -1  # status line, headers and body in one write, as servers send a small response
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
socketserver.TCPServer.allow_reuse_address = True
server = socketserver.TCPServer((sys.argv[1], int(sys.argv[2])), Handler)  # HTTPServer's getfqdn would wait on DNS
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
server.serve_forever()
"""

HTTP_CLIENT = r"""
import http.client, json, sys, time
server, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection(server, port, timeout=10)
requests = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    conn.request("GET", "/")
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"HTTP status {r.status}")
    requests += 1
elapsed = time.monotonic() - start
conn.close()
print(json.dumps({"requests": requests, "seconds": elapsed}))
"""


def bpftool(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


def lab_program_ids(lab: NodeLab) -> set[int]:
    """Programs at the lab's hooks: tcx chains and clsact filters."""
    ids: set[int] = set()
    for ep in lab.endpoints:
        if tcx_supported() is None:
            for hook in HOOKS:
                ids.update(tcx_program_ids(socket.if_nametoindex(ep.host_if), hook))
        for dev in bpftool("net", "show", "dev", ep.host_if) or []:
            ids.update(f["id"] for f in dev.get("tc", []) if "id" in f)
    return ids


def run_time(ids: set[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the programs."""
    ns = cnt = 0
    for i in ids:
        info = bpftool("prog", "show", "id", str(i)) or {}
        ns += info.get("run_time_ns", 0)
        cnt += info.get("run_cnt", 0)
    return ns, cnt


class Programs:
    """bench/reference.c's `reference` or `empty` at every lab hook, attached as the agent would."""

    def __init__(self, lab: NodeLab, function: str, mode: str):
        from bcc import BPF

        os.environ.update(find_headers().env)
        self.bpf = BPF(src_file=str(REPO / "bench" / "reference.c"))
        fn = self.bpf.load_func(function.encode(), BPF.SCHED_CLS)
        self.tc = TcAttacher(instance=f"bench{os.getpid()}", mode=mode)
        for ep in lab.endpoints:
            self.tc.attach(ep.host_if, {"ingress": fn, "egress": fn})

    def close(self) -> None:
        self.tc.close()
        self.bpf.cleanup()


def dns_flood(lab: NodeLab, seconds: float, rate: int) -> float:
    """Queries from the pod to a responder in the world; returns queries sent per second."""
    world, pod = lab.world, lab.pods[0]
    server = subprocess.Popen(["ip", "netns", "exec", world.netns, sys.executable, "-c", SERVER, world.ipv4],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = lab.run(pod.netns, sys.executable, "-c", CLIENT, world.ipv4, str(rate), str(seconds),
                      json.dumps({"A": 1, "AAAA": 28}), timeout=seconds + 60)
        r = json.loads(out.stdout)
        return sum(r["sent"].values()) / r["seconds"]
    finally:
        server.terminate()
        server.wait()


def http_load(lab: NodeLab, seconds: float) -> tuple[int, float]:
    """Keep-alive GETs from the pod to a server in the world; returns (requests answered, seconds)."""
    world, pod = lab.world, lab.pods[0]
    server = subprocess.Popen(["ip", "netns", "exec", world.netns, sys.executable, "-c", HTTP_SERVER, world.ipv4,
                               str(HTTP_PORT)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = lab.run(pod.netns, sys.executable, "-c", HTTP_CLIENT, world.ipv4, str(HTTP_PORT), str(seconds),
                      timeout=seconds + 60)
        r = json.loads(out.stdout)
        return r["requests"], r["seconds"]
    finally:
        server.terminate()
        server.wait()


def traffic(lab: NodeLab, kind: str, seconds: float, dns_rate: int) -> tuple[float, int]:
    """(throughput in the kind's unit, HTTP messages: requests + responses, 0 for other kinds)."""
    if kind == "udp64":
        return iperf(lab, seconds, udp=True)["end"]["sum_sent"]["packets"] / seconds / 1e3, 0
    if kind == "tcp":
        return iperf(lab, seconds, udp=False)["end"]["sum_received"]["bits_per_second"] / 1e9, 0
    if kind == "http":
        requests, took = http_load(lab, seconds)
        return requests / took / 1e3, 2 * requests
    return dns_flood(lab, seconds, dns_rate) / 1e3, 0


def path_packets(lab: NodeLab) -> int:
    return link_stat(lab.uplink, "tx_packets") + link_stat(lab.uplink, "rx_packets")


def set_stats(on: bool) -> None:
    STATS.write_text("1" if on else "0")


def http_datapath(agent: Agent) -> float | None:
    """The agent's fovea_agent_http_datapath (1: HTTP parsed in the pods programs), None if not exported."""
    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as r:
        m = re.search(r"^fovea_agent_http_datapath (\S+)$", r.read().decode(), re.M)
    return float(m.group(1)) if m else None


def start(cond: str, lab: NodeLab, workdir: Path):
    mode = "clsact" if cond.endswith("clsact") else "tcx"
    if cond.startswith("fovea"):
        http = cond != "fovea-nohttp"
        config = workdir / f"{cond}.yaml"
        config.write_text(yaml.safe_dump({"tc": {"mode": mode}, "pods": {"interfaces": [lab.prefix + "p*"]},
                                          "http": {"enabled": http}}))
        agent = Agent(lab.uplink, interval=5, config=str(config))
        if (http_datapath(agent) == 1.0) != http:  # else the on/off comparison would measure nothing
            got = http_datapath(agent)
            agent.close()
            raise SystemExit(f"{cond}: the agent's fovea_agent_http_datapath is {got}, expected HTTP parsing "
                             f"{'on' if http else 'off'}: run `fovea doctor` or the agent alone to see why")
        return agent
    if cond.startswith(("empty", "reference")):
        return Programs(lab, cond.split("-")[0], mode)
    return None


def stop(thing) -> None:
    if thing is not None:
        thing.close()


def measure(args, lab: NodeLab, workdir: Path) -> list[dict]:
    runs = []
    for rnd in range(args.rounds):
        for cond in args.conditions:
            foreign = lab_program_ids(lab)
            progress(f"round {rnd + 1}: {cond}" + (f" (foreign programs {sorted(foreign)})" if foreign else ""))
            thing = start(cond, lab, workdir)
            try:
                ours = lab_program_ids(lab) - foreign
                for kind in args.traffic:
                    run = {"round": rnd, "cond": cond, "kind": kind, "flagged": bool(foreign)}
                    if kind != "dns":
                        run["value"] = traffic(lab, kind, args.seconds, args.dns_rate)[0]
                    if ours:
                        set_stats(True)
                        ns0, cnt0 = run_time(ours)
                        p0 = path_packets(lab)
                        value, messages = traffic(lab, kind, args.seconds, args.dns_rate)
                        ns1, cnt1 = run_time(ours)
                        set_stats(False)
                        packets = path_packets(lab) - p0
                        run["ns_per_packet"] = (ns1 - ns0) / max(1, packets)
                        run["ns_per_run"] = (ns1 - ns0) / max(1, cnt1 - cnt0)
                        if messages:
                            run["ns_per_message"] = (ns1 - ns0) / messages
                            run["packets_per_message"] = packets / messages
                        run.setdefault("value", value)
                    elif kind == "dns":
                        run["value"] = traffic(lab, kind, args.seconds, args.dns_rate)[0]
                    runs.append(run)
                    progress(f"  {kind}: {run}")
            finally:
                set_stats(False)
                stop(thing)
    return runs


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def http_on_off(args, clean: list[dict]) -> list[str]:
    """Fovea with HTTP parsing (fovea) against without (fovea-nohttp), per traffic kind.

    Ratios are taken round by round (the two ran minutes apart at most), and their
    spread over rounds is shown: that is the noise a ratio of 1 must be read against.
    """
    def per_round(cond: str, kind: str, key: str) -> dict[int, float]:
        return {r["round"]: r[key] for r in clean if r["cond"] == cond and r["kind"] == kind and key in r}

    def span(xs) -> str:
        return f"{min(xs):.0f}–{max(xs):.0f}" if xs else "–"

    lines = ["**HTTP parsing on (fovea) against off (fovea-nohttp), program time**", "",
             "| traffic | measure | HTTP off, ns (range over rounds) | HTTP on, ns (range) | on − off, ns | on/off "
             "| on/off per round: median (range) |", "|---|---|---:|---:|---:|---:|---:|"]
    for kind in args.traffic:
        key, label = ("ns_per_message", "per HTTP message") if kind == "http" else ("ns_per_packet", "per packet")
        off, on = per_round("fovea-nohttp", kind, key), per_round("fovea", kind, key)
        if off.keys() & on.keys():
            ratios = [on[r] / off[r] for r in sorted(on.keys() & off.keys())]
            a, b = med(list(off.values())), med(list(on.values()))
            lines.append(f"| {kind} | {label} | {a:.0f} ({span(off.values())}) | {b:.0f} ({span(on.values())}) "
                         f"| {b - a:+.0f} | {b / a:.3f} | {med(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")
    return lines + [""]


def report(args, runs: list[dict]) -> str:
    clean = [r for r in runs if not r["flagged"]] or runs

    def cell(cond: str, kind: str, key: str) -> float:
        return med([r[key] for r in clean if r["cond"] == cond and r["kind"] == kind and key in r])

    def work(cond: str, kind: str) -> float:
        """ns per packet above the empty program's (the stats' clock reads, the call)."""
        empty = "empty-clsact" if cond.endswith("clsact") else "empty"
        return cell(cond, kind, "ns_per_packet") - cell(empty, kind, "ns_per_packet")

    def num(x: float, fmt: str) -> str:
        return "–" if x != x else format(x, fmt)

    lines = []
    for kind in args.traffic:
        base = cell("none", kind, "value")
        http = kind == "http"
        lines += [f"**{TRAFFIC[kind]}**", "",
                  "| programs at the hooks | throughput | vs none | program ns per packet | per program run, ns "
                  "| work ns per packet (− empty) | vs reference (ns / work) |"
                  + (" program ns per HTTP message | packets per message |" if http else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if http else "")]
        for cond in args.conditions:
            v, ns = cell(cond, kind, "value"), cell(cond, kind, "ns_per_packet")
            ratio = (f"{num(ns / cell('reference', kind, 'ns_per_packet'), '.2f')} / "
                     f"{num(work(cond, kind) / work('reference', kind), '.2f')}" if cond.startswith(("reference", "fovea")) else "–")
            lines.append(f"| {cond} | {v:.2f} | {v / base:.3f} | {num(ns, '.0f')} | "
                         f"{num(cell(cond, kind, 'ns_per_run'), '.0f')} | "
                         f"{num(work(cond, kind), '.0f') if cond.startswith(('reference', 'fovea')) else '–'} | {ratio} |"
                         + (f" {num(cell(cond, kind, 'ns_per_message'), '.0f')} | "
                            f"{num(cell(cond, kind, 'packets_per_message'), '.2f')} |" if http else ""))
        lines.append("")
    if "fovea" in args.conditions and "fovea-nohttp" in args.conditions:
        lines += http_on_off(args, clean)
    flagged = len(runs) - len(clean)
    lines.append(f"Medians of {args.rounds} interleaved rounds, {args.seconds:g} s runs, kernel "
                 f"{os.uname().release}; {flagged} flagged runs left out.")
    goals = []
    for kind, goal in GOAL_THROUGHPUT.items():
        if kind in args.traffic:
            r = cell("fovea", kind, "value") / cell("none", kind, "value")
            goals.append(f"{kind} throughput on/off {r:.3f} (goal ≥ {goal})")
    for kind in (k for k in args.traffic if k in GOAL_COST_KINDS):
        r = cell("fovea", kind, "ns_per_packet") / cell("reference", kind, "ns_per_packet")
        w = work("fovea", kind) / work("reference", kind)
        goals.append(f"{kind} program time Fovea/reference {r:.2f}, work alone {num(w, '.2f')} (goal ≤ {GOAL_COST})")
    if goals:
        lines.append("Goals: " + "; ".join(goals) + ".")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--dns-rate", type=int, default=20000, help="DNS queries per second (default 20000)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"subset of {','.join(CONDITIONS)}")
    p.add_argument("--traffic", default=",".join(TRAFFIC), help=f"subset of {','.join(TRAFFIC)}")
    p.add_argument("--output", help="also append the report to this file")
    p.add_argument("--runs", help="write the runs as JSON to this file")
    p.add_argument("--report-only", metavar="RUNS", help="report the runs of an earlier --runs file; measure nothing")
    args = p.parse_args()
    args.conditions = args.conditions.split(",")
    args.traffic = args.traffic.split(",")
    if args.report_only:
        runs = json.loads(Path(args.report_only).read_text())
        args.rounds = len({r["round"] for r in runs})
        print(report(args, runs))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench/datapath_cost.py needs root (lab namespaces, eBPF): run it with sudo")
    for tool in ("iperf3", "bpftool"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise SystemExit(f"{tool} is not installed: run scripts/bootstrap")
    if "none" not in args.conditions or "reference" not in args.conditions:
        raise SystemExit("--conditions must include none and reference: the ratios are taken against them")
    was = STATS.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="fovea-cost-") as workdir, \
            NodeLab(f"fc{os.getpid() % 100000}", pods=1, ipv6=False, octet=190 + os.getpid() % 10) as lab:
        try:
            runs = measure(args, lab, Path(workdir))
        finally:
            STATS.write_text(was)
    if args.runs:
        Path(args.runs).write_text(json.dumps(runs))
    out = report(args, runs)
    print(out)
    if args.output:
        with open(args.output, "a") as f:
            f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
