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
  attached with tcx and with the clsact fallback (tc.mode).

Traffic from the pod to the world: iperf3 UDP with 64-byte payloads at an
unlimited rate (packets/s sent: on veths the sender's CPU runs the whole
path), one iperf3 TCP stream (Gbit/s received), and a DNS flood (queries at
--dns-rate to a responder in the world, which answers each one).

Program time: `kernel.bpf_stats_enabled` makes the kernel time every program
run (run_time_ns, run_cnt, read with bpftool). Its clock reads cost time
themselves, so throughput is measured in runs of its own with the stats off.
"ns per packet" is the programs' total run time at the lab's hooks over the
packets (skbs) that crossed the uplink, each of which also crossed one pod
veth: the cost of the whole path. The stats' own clock reads are in every
run time, so the empty program's time is that floor: the "work" column
subtracts it (same mode), and the ratio to the reference is taken on it too. Conditions are interleaved round by round;
medians over rounds. Other Fovea agents or tests on the host attach to these
veths too and compete for the CPUs: runs that see a program not ours at the
lab's hooks are flagged and left out.

Needs root, iperf3, bpftool. Everything is made in the lab's namespaces and removed.

    .venv/bin/python bench/datapath_cost.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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

CONDITIONS = ("none", "empty", "empty-clsact", "reference", "fovea", "fovea-clsact")
TRAFFIC = {"udp64": "UDP 64-byte payloads, kpps sent", "tcp": "TCP bulk, Gbit/s",
           "dns": "DNS flood (queries + responses), kpps"}
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
HOOKS = ("ingress", "egress")
GOAL_COST = 1.5  # program time per packet, Fovea over reference
GOAL_THROUGHPUT = {"udp64": 0.95, "tcp": 0.98}


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


def traffic(lab: NodeLab, kind: str, seconds: float, dns_rate: int) -> float:
    if kind == "udp64":
        return iperf(lab, seconds, udp=True)["end"]["sum_sent"]["packets"] / seconds / 1e3
    if kind == "tcp":
        return iperf(lab, seconds, udp=False)["end"]["sum_received"]["bits_per_second"] / 1e9
    return dns_flood(lab, seconds, dns_rate) / 1e3


def path_packets(lab: NodeLab) -> int:
    return link_stat(lab.uplink, "tx_packets") + link_stat(lab.uplink, "rx_packets")


def set_stats(on: bool) -> None:
    STATS.write_text("1" if on else "0")


def start(cond: str, lab: NodeLab, workdir: Path):
    mode = "clsact" if cond.endswith("clsact") else "tcx"
    if cond.startswith("fovea"):
        config = workdir / f"{mode}.yaml"
        config.write_text(yaml.safe_dump({"tc": {"mode": mode}, "pods": {"interfaces": [lab.prefix + "p*"]}}))
        return Agent(lab.uplink, interval=5, config=str(config))
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
                        run["value"] = traffic(lab, kind, args.seconds, args.dns_rate)
                    if ours:
                        set_stats(True)
                        ns0, cnt0 = run_time(ours)
                        p0 = path_packets(lab)
                        value = traffic(lab, kind, args.seconds, args.dns_rate)
                        ns1, cnt1 = run_time(ours)
                        set_stats(False)
                        run["ns_per_packet"] = (ns1 - ns0) / max(1, path_packets(lab) - p0)
                        run["ns_per_run"] = (ns1 - ns0) / max(1, cnt1 - cnt0)
                        run.setdefault("value", value)
                    elif kind == "dns":
                        run["value"] = traffic(lab, kind, args.seconds, args.dns_rate)
                    runs.append(run)
                    progress(f"  {kind}: {run}")
            finally:
                set_stats(False)
                stop(thing)
    return runs


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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
        lines += [f"**{TRAFFIC[kind]}**", "",
                  "| programs at the hooks | throughput | vs none | program ns per packet | per program run, ns "
                  "| work ns per packet (− empty) | vs reference (ns / work) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for cond in args.conditions:
            v, ns = cell(cond, kind, "value"), cell(cond, kind, "ns_per_packet")
            ratio = (f"{num(ns / cell('reference', kind, 'ns_per_packet'), '.2f')} / "
                     f"{num(work(cond, kind) / work('reference', kind), '.2f')}" if cond.startswith(("reference", "fovea")) else "–")
            lines.append(f"| {cond} | {v:.2f} | {v / base:.3f} | {num(ns, '.0f')} | "
                         f"{num(cell(cond, kind, 'ns_per_run'), '.0f')} | "
                         f"{num(work(cond, kind), '.0f') if cond.startswith(('reference', 'fovea')) else '–'} | {ratio} |")
        lines.append("")
    flagged = len(runs) - len(clean)
    lines.append(f"Medians of {args.rounds} interleaved rounds, {args.seconds:g} s runs, kernel "
                 f"{os.uname().release}; {flagged} flagged runs left out.")
    goals = []
    for kind, goal in GOAL_THROUGHPUT.items():
        if kind in args.traffic:
            r = cell("fovea", kind, "value") / cell("none", kind, "value")
            goals.append(f"{kind} throughput on/off {r:.3f} (goal ≥ {goal})")
    for kind in args.traffic:
        r = cell("fovea", kind, "ns_per_packet") / cell("reference", kind, "ns_per_packet")
        w = work("fovea", kind) / work("reference", kind)
        goals.append(f"{kind} program time Fovea/reference {r:.2f}, work alone {w:.2f} (goal ≤ {GOAL_COST})")
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
