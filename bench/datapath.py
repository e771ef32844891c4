#!/usr/bin/env python3
"""Datapath overhead of the Fovea agent, measured on a lab node.

Builds a NodeLab (one pod and a "world" namespace behind the lab uplink,
routed through the host), then measures traffic from the pod to the world
with the agent off and on, interleaved round by round:

    round i:  agent off: TCP run, UDP run
              agent on:  start agent, wait for /readyz, TCP run, UDP run, SIGTERM

* TCP: one iperf3 stream, `end.sum_received.bits_per_second`.
* UDP: iperf3 `-u -b 0 -l 64` (64-byte payloads, unlimited send rate);
  packets per second received by the server: (packets - lost_packets) /
  seconds of `end.sum_received`.
* Agent: CPU time (utime+stime from /proc/<pid>/stat) over each measured run,
  as % of one core; peak RSS (VmHWM from /proc/<pid>/status, which includes
  the start-up compile); time and CPU spent until /readyz.
* Sanity line: the agent's egress packet counter
  (fovea_forward_packets_total{direction="egress"}) over each UDP run, beside
  the packets iperf3 sent and the uplink's own tx counter.

Progress goes to stderr; the markdown report to stdout (and --output).
Needs root. Everything is created in the lab's namespaces and removed at the end.

    .venv/bin/python bench/datapath.py --rounds 5 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.netlab import NodeLab  # noqa: E402

TCP_GOAL = 0.97
UDP_GOAL = 0.95
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
EGRESS_RE = re.compile(r'^fovea_forward_packets_total\{direction="egress"\}\s+(\S+)', re.M)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fovea_cli() -> str:
    for c in (Path(sys.executable).parent / "fovea", REPO / ".venv" / "bin" / "fovea"):
        if c.is_file():
            return str(c)
    raise SystemExit("cannot find the fovea CLI (run with the project's venv python)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def link_stat(ifname: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/{name}").read_text())


# -- the agent ------------------------------------------------------------------


class Agent:
    """`fovea agent --standalone` on the lab uplink, as a subprocess."""

    def __init__(self, uplink: str, interval: float = 1.0, ready_timeout: float = 180):
        self.port = free_port()
        self.interval = interval
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fovea-bench-agent-", suffix=".log", delete=False)
        argv = [fovea_cli(), "agent", "--standalone", "--uplink", uplink,
                "--port", str(self.port), "--interval", str(interval)]
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = started + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent not ready after {ready_timeout:.0f}s:\n{self.output()}")
            time.sleep(0.1)
        self.ready_seconds = time.monotonic() - started
        self.ready_cpu = cpu_seconds(self.pid)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def egress_packets(self) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        m = EGRESS_RE.search(text)
        if m is None:
            raise RuntimeError("no fovea_forward_packets_total{direction=\"egress\"} in /metrics")
        return float(m.group(1))

    def settled_egress(self) -> float:
        """The counter once the agent has read its maps after the traffic stopped."""
        time.sleep(2.5 * self.interval)
        last = self.egress_packets()
        for _ in range(10):
            time.sleep(1.2 * self.interval)
            now = self.egress_packets()
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                progress(f"agent {self.pid} ignored SIGTERM for 30s; killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


# -- iperf3 ---------------------------------------------------------------------


def iperf(lab: NodeLab, seconds: float, udp: bool) -> dict:
    """One iperf3 test from the pod to the world; returns the client's JSON."""
    world, pod = lab.world, lab.pods[0]
    server = subprocess.Popen(
        ["ip", "netns", "exec", world.netns, "iperf3", "-s", "-1", "-B", world.ipv4,
         "-p", str(IPERF_PORT), "-J"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    client = ["iperf3", "-c", world.ipv4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if udp:
        client += ["-u", "-b", "0", "-l", "64"]
    try:
        for attempt in range(50):  # until the server listens
            time.sleep(0.1)
            r = lab.run(pod.netns, *client, timeout=seconds + 60, check=False)
            if r.returncode == 0:
                result = json.loads(r.stdout)
                server.communicate(timeout=30)
                return result
            if server.poll() is not None or "refused" not in r.stdout + r.stderr:
                break
        raise RuntimeError(f"iperf3 client failed ({r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def measure(lab: NodeLab, seconds: float, udp: bool, agent: Agent | None) -> dict:
    """One run; with an agent, also its CPU over the run and (UDP) its egress count."""
    uplink = lab.uplink
    out: dict = {}
    if agent is not None and udp:
        out["egress_before"] = agent.settled_egress()
    tx0 = link_stat(uplink, "tx_packets")
    txd0 = link_stat(uplink, "tx_dropped")
    cpu0 = cpu_seconds(agent.pid) if agent else 0.0
    t0 = time.monotonic()
    result = iperf(lab, seconds, udp)
    wall = time.monotonic() - t0
    if agent is not None:
        out["cpu_pct"] = 100.0 * (cpu_seconds(agent.pid) - cpu0) / wall
    end = result["end"]
    if udp:
        rcv, snt = end["sum_received"], end["sum_sent"]
        out["value"] = (rcv["packets"] - rcv["lost_packets"]) / rcv["seconds"]
        out["sent_packets"] = snt["packets"]
        out["sent_pps"] = snt["packets"] / snt["seconds"]
        out["lost_pct"] = rcv["lost_percent"]
        out["cpu_sender"] = end["cpu_utilization_percent"]["host_total"]
        out["cpu_receiver"] = end["cpu_utilization_percent"]["remote_total"]
        # Read after the agent's egress count has settled, so both cover the same packets.
        if agent is not None:
            out["egress_after"] = agent.settled_egress()
            out["egress_delta"] = out["egress_after"] - out["egress_before"]
    else:
        out["value"] = end["sum_received"]["bits_per_second"]
        out["retransmits"] = end["sum_sent"].get("retransmits", 0)
    out["uplink_tx"] = link_stat(uplink, "tx_packets") - tx0
    out["uplink_tx_dropped"] = link_stat(uplink, "tx_dropped") - txd0
    return out


def leftover_filters(ifname: str) -> str:
    """Any fovea tc filter still on the uplink (there should be none after SIGTERM)."""
    found = []
    for hook in ("ingress", "egress"):
        r = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True)
        if "fovea-" in r.stdout:
            found.append(hook)
    return ", ".join(found)


# -- report ---------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}–{max(xs):.3f}" if xs else "n/a"


def verdict(ratio: float, goal: float) -> str:
    return f"≥ {goal:.2f}: {'met' if ratio >= goal else '**not met**'}"


def report(args, runs: list[dict], lab: NodeLab, problems: list[str]) -> str:
    def vals(cond: str, kind: str, key: str = "value") -> list[float]:
        return [r[key] for r in runs if r["cond"] == cond and r["kind"] == kind and key in r]

    tcp_off, tcp_on = vals("off", "tcp"), vals("on", "tcp")
    udp_off, udp_on = vals("off", "udp"), vals("on", "udp")
    tcp_ratio = med(tcp_on) / med(tcp_off)
    udp_ratio = med(udp_on) / med(udp_off)
    rounds = sorted({r["round"] for r in runs})

    def per_round_ratios(kind: str) -> list[float]:
        out = []
        for i in rounds:
            on = [r["value"] for r in runs if r["round"] == i and r["kind"] == kind and r["cond"] == "on"]
            off = [r["value"] for r in runs if r["round"] == i and r["kind"] == kind and r["cond"] == "off"]
            if on and off:
                out.append(on[0] / off[0])
        return out

    starts = [r for r in runs if r["kind"] == "start"]
    cpu_tcp, cpu_udp = vals("on", "tcp", "cpu_pct"), vals("on", "udp", "cpu_pct")
    rss = [r["vm_hwm_kib"] for r in starts if "vm_hwm_kib" in r]
    lines = [
        "| metric | agent off (median) | agent on (median) | ratio on/off | goal |",
        "|---|---:|---:|---:|---|",
        f"| TCP single-stream throughput, Gbit/s | {med(tcp_off) / 1e9:.2f} | {med(tcp_on) / 1e9:.2f} "
        f"| {tcp_ratio:.3f} | {verdict(tcp_ratio, TCP_GOAL)} |",
        f"| UDP 64-byte payloads, packets/s received, kpps | {med(udp_off) / 1e3:.1f} | {med(udp_on) / 1e3:.1f} "
        f"| {udp_ratio:.3f} | {verdict(udp_ratio, UDP_GOAL)} |",
        f"| agent CPU during TCP runs, % of one core | – | {med(cpu_tcp):.1f} | | |",
        f"| agent CPU during UDP runs, % of one core | – | {med(cpu_udp):.1f} | | |",
        f"| agent peak RSS (VmHWM, max over {len(rss)} starts), MiB | – | {max(rss) / 1024:.1f} | | |"
        if rss else "| agent peak RSS | – | n/a | | |",
        f"| agent start-up to /readyz: wall s / CPU s | – | {med([s['ready_s'] for s in starts]):.1f} / "
        f"{med([s['ready_cpu'] for s in starts]):.1f} | | |",
    ]
    lines += [
        "",
        f"Per-round ratios on/off (min–max over {len(rounds)} rounds): "
        f"TCP {spread(per_round_ratios('tcp'))}, UDP {spread(per_round_ratios('udp'))}.",
        f"UDP sender rate (iperf3 sent, median): off {med(vals('off', 'udp', 'sent_pps')) / 1e3:.1f} kpps, "
        f"on {med(vals('on', 'udp', 'sent_pps')) / 1e3:.1f} kpps; receiver loss (median): "
        f"off {med(vals('off', 'udp', 'lost_pct')):.1f} %, on {med(vals('on', 'udp', 'lost_pct')):.1f} %.",
        "",
        "Sanity check, UDP runs with the agent on (packets over each run): the agent's "
        "`fovea_forward_packets_total{direction=\"egress\"}` delta, the uplink's own tx_packets "
        "delta, and what iperf3 sent (data only; the control connection adds a few packets):",
        "",
        "| round | agent egress | uplink tx_packets | iperf3 sent | agent − uplink |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r["cond"] == "on" and r["kind"] == "udp" and "egress_delta" in r:
            lines.append(f"| {r['round']} | {r['egress_delta']:.0f} | {r['uplink_tx']} | {r['sent_packets']} "
                         f"| {r['egress_delta'] - r['uplink_tx']:+.0f} |")
    lines += [
        "",
        "All runs (TCP in Gbit/s, UDP in kpps received; agent CPU in % of one core):",
        "",
        "| round | TCP off | TCP on | UDP off | UDP on | agent CPU TCP | agent CPU UDP |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in rounds:
        def get(cond, kind, key="value", scale=1.0, fmt="{:.2f}"):
            xs = [r[key] for r in runs if r["round"] == i and r["cond"] == cond and r["kind"] == kind and key in r]
            return fmt.format(xs[0] / scale) if xs else "–"
        lines.append(
            f"| {i} | {get('off', 'tcp', scale=1e9)} | {get('on', 'tcp', scale=1e9)} "
            f"| {get('off', 'udp', scale=1e3, fmt='{:.1f}')} | {get('on', 'udp', scale=1e3, fmt='{:.1f}')} "
            f"| {get('on', 'tcp', 'cpu_pct', fmt='{:.1f}')} | {get('on', 'udp', 'cpu_pct', fmt='{:.1f}')} |"
        )
    if problems:
        lines += ["", "Problems seen during the run:", ""] + [f"- {p}" for p in problems]
    lines += [
        "",
        f"Kernel {platform.release()}, {os.cpu_count()} CPUs, {args.rounds} rounds × {args.seconds:g} s per run, "
        f"agent `--interval 1`, lab prefix {lab.prefix}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------


def run_condition(lab: NodeLab, args, cond: str, rnd: int, runs: list[dict], problems: list[str]) -> None:
    agent = None
    try:
        if cond == "on":
            agent = Agent(lab.uplink)
            start = {"round": rnd, "cond": "on", "kind": "start",
                     "ready_s": agent.ready_seconds, "ready_cpu": agent.ready_cpu}
            runs.append(start)
            progress(f"round {rnd}: agent {agent.pid} ready in {agent.ready_seconds:.1f}s "
                     f"({agent.ready_cpu:.1f} CPU s)")
            time.sleep(1.0)  # let the first map reads pass
        for kind in ("tcp", "udp"):
            r = measure(lab, args.seconds, kind == "udp", agent)
            r.update(round=rnd, cond=cond, kind=kind)
            runs.append(r)
            if kind == "tcp":
                msg = f"{r['value'] / 1e9:.2f} Gbit/s, {r['retransmits']} retransmits"
            else:
                msg = (f"{r['value'] / 1e3:.1f} kpps received of {r['sent_pps'] / 1e3:.1f} kpps sent "
                       f"({r['lost_pct']:.1f}% lost)")
                if "egress_delta" in r:
                    msg += f"; agent egress {r['egress_delta']:.0f} vs uplink tx {r['uplink_tx']}"
            if "cpu_pct" in r:
                msg += f"; agent CPU {r['cpu_pct']:.1f}%"
            progress(f"round {rnd}: agent {cond:3} {kind.upper()}: {msg}")
        if agent is not None:
            start["vm_hwm_kib"] = vm_hwm_kib(agent.pid)
    finally:
        if agent is not None:
            rc = agent.stop()
            if rc != 0:
                problems.append(f"round {rnd}: agent exited with {rc} on SIGTERM:\n{agent.output()[-2000:]}")
            left = leftover_filters(lab.uplink)
            if left:
                problems.append(f"round {rnd}: fovea tc filters left on {lab.uplink} ({left}) after SIGTERM")
            errors = [ln for ln in agent.output().splitlines() if " ERROR " in ln or "Traceback" in ln]
            if errors:
                problems.append(f"round {rnd}: agent log: " + " | ".join(errors[:5]))
            agent.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Measure the Fovea agent's datapath overhead (TCP throughput, 64-byte UDP packet "
        "rate) on a lab node made of network namespaces, agent off vs on, interleaved. Needs root.",
    )
    p.add_argument("--rounds", type=int, default=5, help="off/on rounds (default 5)")
    p.add_argument("--seconds", type=float, default=5, help="seconds per iperf3 run (default 5)")
    p.add_argument("--output", metavar="FILE", help="also write the markdown report to FILE")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, eBPF)")

    lab = NodeLab("fvb%04x" % random.randrange(16**4), pods=1, ipv6=False, octet=random.randrange(100, 200))
    runs: list[dict] = []
    problems: list[str] = []
    try:
        progress(f"building lab {lab.prefix} (10.{lab.octet}.0.0/16), uplink {lab.uplink}")
        lab.up()
        progress("warm-up (not counted)")
        iperf(lab, 1, udp=False)
        iperf(lab, 1, udp=True)
        for rnd in range(1, args.rounds + 1):
            for cond in ("off", "on"):
                run_condition(lab, args, cond, rnd, runs, problems)
    finally:
        progress(f"removing lab {lab.prefix}")
        lab.down()

    text = report(args, runs, lab, problems)
    sys.stdout.write(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
