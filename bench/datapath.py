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
  seconds of `end.sum_received`; and packets per second sent. On veths the
  sender's CPU runs the whole forwarding path (pod veth, routing, uplink) up
  to the receiver's socket, so the sent rate is the datapath's own rate.
* The iperf3 client and server are pinned to CPUs 0 and 1 (--cpus): unpinned,
  results on a 2-CPU VM jump between two modes with where the scheduler puts them.
* Agent: CPU time (utime+stime from /proc/<pid>/stat) over each measured run,
  as % of one core (the eBPF programs run in the packets' softirq context and
  are not in it: their cost is what the throughput ratios show); peak RSS
  (VmHWM from /proc/<pid>/status, which includes the start-up compile); time
  and CPU spent until /readyz.
* Sanity lines: the agent's egress packet counter
  (fovea_forward_packets_total{direction="egress"}) over each UDP run, beside
  the packets iperf3 sent and the uplink's own tx counter; its UDP drop
  counter beside the datagrams iperf3 lost.
* Other activity: Fovea agents (tests, demos) running on the same host attach
  their pods programs to every veth with a peer in another namespace, this
  lab's too, and test runs compete for the CPUs. Before each run the script
  waits for such processes to end (--max-wait), flags runs they overlap, and
  leaves flagged runs out of the medians when enough clean runs remain.

Progress goes to stderr; the markdown report to stdout (and --output).
Needs root. Everything is created in the lab's namespaces and removed at the end.

    .venv/bin/python bench/datapath.py --rounds 10 --seconds 5 --commit HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
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

from agent.lab.netlab import NodeLab  # noqa: E402
from agent.tc import tcx_program_ids, tcx_supported  # noqa: E402

TCP_GOAL = 0.97
UDP_GOAL = 0.95
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
EGRESS_RE = re.compile(r'^fovea_forward_packets_total\{direction="egress"\}\s+(\S+)', re.M)
# UDP only: every TCP connection close on the host (the scrapes themselves, too) counts
# as one tcp QUEUE_PURGE drop, so the all-protocol total never settles.
DROPS_RE = re.compile(r'^fovea_drop_packets_total\{[^}]*protocol="udp"[^}]*\}\s+(\S+)', re.M)


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


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all its threads), in seconds; with children,
    also those of its children that ended (the agent's compiler processes)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def link_stat(ifname: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/{name}").read_text())


# -- the agent ------------------------------------------------------------------


class Agent:
    """`fovea agent --standalone` (or with kubeconfig, against that API) on the lab uplink, as a subprocess."""

    def __init__(self, uplink: str, interval: float = 1.0, ready_timeout: float = 180,
                 config: str | None = None, tree: str | None = None, node: str | None = None,
                 kubeconfig: str | None = None):
        self.port = free_port()
        self.interval = interval
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fovea-bench-agent-", suffix=".log", delete=False)
        # From a source tree (an exported commit): `python -m agent` run there imports
        # that tree's packages and compiles its bpf/ (the editable install comes later on
        # the import path); otherwise the venv's `fovea` on the working tree.
        cli = [sys.executable, "-m", "agent"] if tree else [fovea_cli()]
        # A node name of its own: agents sharing one replace each other's tc filters (node: a restart).
        source = ["--kubeconfig", kubeconfig] if kubeconfig else ["--standalone"]
        argv = [*cli, "agent", *source, "--uplink", uplink, "--node-name", node or f"bench-{self.port}",
                "--port", str(self.port), "--interval", str(interval)]
        if config:
            argv += ["--config", config]
        env = dict(os.environ, FOVEA_BPF_DIR=str(Path(tree, "bpf"))) if tree else None
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=tree, env=env)
        self.pid = self.proc.pid
        deadline = started + ready_timeout
        while True:
            if self.proc.poll() is not None:
                out = self.output()
                self.close()
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{out}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                out = self.output()
                self.close()
                raise RuntimeError(f"agent not ready after {ready_timeout:.0f}s:\n{out}")
            time.sleep(0.1)
        self.ready_seconds = time.monotonic() - started
        self.ready_cpu = cpu_seconds(self.pid, children=True)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def counters(self) -> tuple[float, float]:
        """(forward egress packets, dropped UDP packets) from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        m = EGRESS_RE.search(text)
        egress = float(m.group(1)) if m else -1.0  # -1: the forward plugin is not running
        drops = sum(float(v) for v in DROPS_RE.findall(text))
        return egress, drops

    def settled_counters(self) -> tuple[float, float]:
        """The counters once the agent has read its maps after the traffic stopped."""
        time.sleep(2.5 * self.interval)
        last = self.counters()
        for _ in range(10):
            time.sleep(1.2 * self.interval)
            now = self.counters()
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
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)


# -- iperf3 ---------------------------------------------------------------------


CPUS: tuple[int, int] | None = None  # (client, server) iperf3 affinity; set by --cpus


def iperf(lab: NodeLab, seconds: float, udp: bool) -> dict:
    """One iperf3 test from the pod to the world; returns the client's JSON."""
    world, pod = lab.world, lab.pods[0]
    server_argv = ["iperf3", "-s", "-1", "-B", world.ipv4, "-p", str(IPERF_PORT), "-J"]
    client = ["iperf3", "-c", world.ipv4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if CPUS is not None:
        client += ["-A", str(CPUS[0])]
        server_argv += ["-A", str(CPUS[1])]
    server = subprocess.Popen(
        ["ip", "netns", "exec", world.netns, *server_argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if udp:
        client += ["-u", "-b", "0", "-l", "64"]
    client += ["--connect-timeout", "5000"]
    try:
        for attempt in range(50):  # until the server listens
            time.sleep(0.1)
            r = lab.run(pod.netns, *client, timeout=seconds + 30, check=False)
            if r.returncode == 0:
                result = json.loads(r.stdout)
                server.communicate(timeout=30)
                return result
            if server.poll() is not None or "refused" not in r.stdout + r.stderr:
                break
        raise RuntimeError(f"iperf3 client failed ({r.returncode}): {r.stdout[-300:]} {r.stderr[-300:]}")
    except subprocess.TimeoutExpired as e:
        filters = lab_filters(lab)
        raise RuntimeError(f"iperf3 timed out ({e.cmd[-1] if e.cmd else ''}); fovea filters on the lab: "
                           f"{', '.join(filters) or 'none'}") from None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def measure(lab: NodeLab, seconds: float, udp: bool, agent: Agent | None) -> dict:
    """One run; with an agent, also its CPU over the run and (UDP) its egress count."""
    uplink = lab.uplink
    out: dict = {}
    if agent is not None and udp:
        out["egress_before"], out["drops_before"] = agent.settled_counters()
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
        out["lost_packets"] = rcv["lost_packets"]
        out["cpu_sender"] = end["cpu_utilization_percent"]["host_total"]
        out["cpu_receiver"] = end["cpu_utilization_percent"]["remote_total"]
        # Read after the agent's egress count has settled, so both cover the same packets.
        if agent is not None:
            out["egress_after"], out["drops_after"] = agent.settled_counters()
            out["egress_delta"] = (out["egress_after"] - out["egress_before"]
                                   if out["egress_after"] >= 0 else float("nan"))
            out["drops_delta"] = out["drops_after"] - out["drops_before"]
    else:
        out["value"] = end["sum_received"]["bits_per_second"]
        out["retransmits"] = end["sum_sent"].get("retransmits", 0)
    out["uplink_tx"] = link_stat(uplink, "tx_packets") - tx0
    out["uplink_tx_dropped"] = link_stat(uplink, "tx_dropped") - txd0
    return out


def lab_filters(lab: NodeLab) -> list[str]:
    """Fovea tc filters and tcx programs on the lab's host-side interfaces, as "ifname hook name"."""
    found = []
    for ifname in [ep.host_if for ep in lab.endpoints]:
        for hook in ("ingress", "egress"):
            r = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True)
            found += [f"{ifname} {hook} {m}" for m in re.findall(r"\b(fovea-\S+)", r.stdout)]
            if tcx_supported() is None:  # tcx links (the agent's default where the kernel has them)
                found += [f"{ifname} {hook} tcx program {i}"
                          for i in tcx_program_ids(socket.if_nametoindex(ifname), hook)]
    return found


def foreign_processes(ours: set[int]) -> list[str]:
    """Other Fovea agents or demos, test runs and iperf3s on this host: they attach to the lab's
    veths (the pods plugin takes every veth with a peer in another namespace) or compete for CPU."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(d.name)
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if pid in ours or pid == os.getpid():
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        names = {Path(a).name for a in args}
        module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""
        if "fovea" in names or module == "agent" or "pytest" in names or module == "pytest" or "iperf3" in names:
            found.append(f"{pid} {' '.join(args)[:80]}")
    return found


def foreign_activity(lab: NodeLab, agent: "Agent | None") -> list[str]:
    out = foreign_processes({agent.pid} if agent else set())
    if agent is None:  # with our agent running, its filters are expected
        out += [f"filter {f}" for f in lab_filters(lab)]
    return out


def wait_quiet(lab: NodeLab, agent: "Agent | None", max_wait: float) -> list[str]:
    """Wait (up to max_wait s) until no foreign activity is seen; return what is still seen."""
    deadline = time.monotonic() + max_wait
    seen = foreign_activity(lab, agent)
    if seen:
        progress(f"waiting for other activity to end: {'; '.join(seen[:3])}")
    while seen and time.monotonic() < deadline:
        time.sleep(2)
        seen = foreign_activity(lab, agent)
    return seen


# -- report ---------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"median {med(xs):.3f}, range {min(xs):.3f}–{max(xs):.3f}" if xs else "n/a"


def verdict(ratio: float, goal: float) -> str:
    return f"≥ {goal:.2f}: {'met' if ratio >= goal else '**not met**'}"


def report(args, runs: list[dict], lab: NodeLab, problems: list[str]) -> str:
    measured = [r for r in runs if r["kind"] in ("tcp", "udp")]
    flagged = [r for r in measured if "foreign" in r]

    def vals(cond: str, kind: str, key: str = "value", clean: bool = True) -> list[float]:
        return [r[key] for r in runs if r["cond"] == cond and r["kind"] == kind and key in r
                and not (clean and "foreign" in r)]

    # Runs that other activity on the host overlapped are left out of the medians, as long as
    # at least 3 clean runs remain in every cell; otherwise all runs are used, and it is said.
    clean = not args.include_flagged and all(
        len(vals(c, k)) >= 3 for c in ("off", "on") for k in ("tcp", "udp"))

    def ratio(kind: str, key: str = "value", only_clean: bool = clean) -> float:
        return med(vals("on", kind, key, only_clean)) / med(vals("off", kind, key, only_clean))

    tcp_off, tcp_on = vals("off", "tcp", clean=clean), vals("on", "tcp", clean=clean)
    udp_off, udp_on = vals("off", "udp", clean=clean), vals("on", "udp", clean=clean)
    tcp_ratio, udp_ratio = ratio("tcp"), ratio("udp")
    udp_sent_off, udp_sent_on = vals("off", "udp", "sent_pps", clean), vals("on", "udp", "sent_pps", clean)
    udp_sent_ratio = ratio("udp", "sent_pps")
    rounds = sorted({r["round"] for r in runs})

    def per_round_ratios(kind: str, key: str = "value") -> list[float]:
        out = []
        for i in rounds:
            pair = {r["cond"]: r for r in measured if r["round"] == i and r["kind"] == kind}
            if len(pair) == 2 and not (clean and any("foreign" in r for r in pair.values())):
                out.append(pair["on"][key] / pair["off"][key])
        return out

    starts = [r for r in runs if r["kind"] == "start" and r["cond"] == "on"]
    cpu_tcp, cpu_udp = vals("on", "tcp", "cpu_pct"), vals("on", "udp", "cpu_pct")
    rss = [r["vm_hwm_kib"] for r in starts if "vm_hwm_kib" in r]
    lines = [
        "| metric | agent off (median) | agent on (median) | ratio on/off | goal |",
        "|---|---:|---:|---:|---|",
        f"| TCP single-stream throughput, Gbit/s | {med(tcp_off) / 1e9:.2f} | {med(tcp_on) / 1e9:.2f} "
        f"| {tcp_ratio:.3f} | {verdict(tcp_ratio, TCP_GOAL)} |",
        f"| UDP 64-byte payloads, packets/s received, kpps | {med(udp_off) / 1e3:.1f} | {med(udp_on) / 1e3:.1f} "
        f"| {udp_ratio:.3f} | {verdict(udp_ratio, UDP_GOAL)} |",
        f"| UDP 64-byte payloads, packets/s sent, kpps | {med(udp_sent_off) / 1e3:.1f} | {med(udp_sent_on) / 1e3:.1f} "
        f"| {udp_sent_ratio:.3f} | – |",
        f"| agent CPU during TCP runs, % of one core | – | {med(cpu_tcp):.1f} | | |",
        f"| agent CPU during UDP runs, % of one core | – | {med(cpu_udp):.1f} | | |",
        f"| agent peak RSS (VmHWM, max over {len(rss)} starts), MiB | – | {max(rss) / 1024:.1f} | | |"
        if rss else "| agent peak RSS | – | n/a | | |",
        f"| agent start-up to /readyz: wall s / CPU s | – | {med([s['ready_s'] for s in starts]):.1f} / "
        f"{med([s['ready_cpu'] for s in starts]):.1f} | | |",
    ]
    if not flagged:
        basis = f"Medians over all {len(measured)} runs (no other activity seen on the host)."
    elif clean:
        basis = (f"Medians over the {len(measured) - len(flagged)} of {len(measured)} runs that no other "
                 f"activity on the host overlapped (see the last column below). Over all runs the ratios are "
                 f"TCP {ratio('tcp', only_clean=False):.3f}, UDP received {ratio('udp', only_clean=False):.3f}, "
                 f"UDP sent {ratio('udp', 'sent_pps', only_clean=False):.3f}.")
    else:
        basis = (f"Medians over all {len(measured)} runs, {len(flagged)} of which other activity on the host "
                 f"overlapped (see the last column below)" +
                 ("." if args.include_flagged else ": too few clean runs to leave them out."))
    lines += [
        "",
        basis,
        "",
        f"Ratios on/off within each round ({'rounds whose two runs were both clean' if clean else 'all rounds'}): "
        f"TCP {spread(per_round_ratios('tcp'))}; UDP received {spread(per_round_ratios('udp'))}; "
        f"UDP sent {spread(per_round_ratios('udp', 'sent_pps'))}.",
        f"UDP receiver loss (iperf3, median): "
        f"off {med(vals('off', 'udp', 'lost_pct')):.1f} %, on {med(vals('on', 'udp', 'lost_pct')):.1f} %.",
        "",
        "Sanity check, UDP runs with the agent on (packets over each run): the agent's "
        "`fovea_forward_packets_total{direction=\"egress\"}` delta, the uplink's own tx_packets "
        "delta, and what iperf3 sent (data only; the control connection adds a few packets); "
        "the agent's `fovea_drop_packets_total{protocol=\"udp\"}` delta (all reasons) beside the datagrams "
        "iperf3 counted as lost:",
        "",
        "| round | agent egress | uplink tx_packets | iperf3 sent | agent drops | iperf3 lost |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r["cond"] == "on" and r["kind"] == "udp" and "egress_delta" in r:
            lines.append(f"| {r['round']} | {r['egress_delta']:.0f} | {r['uplink_tx']} | {r['sent_packets']} "
                         f"| {r['drops_delta']:.0f} | {r['lost_packets']} |")
    lines += [
        "",
        "All runs (TCP in Gbit/s; UDP in kpps received, and sent; agent CPU in % of one core):",
        "",
        "| round | TCP off | TCP on | UDP off | UDP on | UDP sent off | UDP sent on | agent CPU TCP | agent CPU UDP "
        "| other activity seen |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    def flags_of(i: int) -> str:
        return ", ".join(f"{r['kind'].upper()} {r['cond']}" for r in runs if r["round"] == i and "foreign" in r) or "–"

    for i in rounds:
        def get(cond, kind, key="value", scale=1.0, fmt="{:.2f}"):
            xs = [r[key] for r in runs if r["round"] == i and r["cond"] == cond and r["kind"] == kind and key in r]
            return fmt.format(xs[0] / scale) if xs else "–"
        lines.append(
            f"| {i} | {get('off', 'tcp', scale=1e9)} | {get('on', 'tcp', scale=1e9)} "
            f"| {get('off', 'udp', scale=1e3, fmt='{:.1f}')} | {get('on', 'udp', scale=1e3, fmt='{:.1f}')} "
            f"| {get('off', 'udp', 'sent_pps', 1e3, '{:.1f}')} | {get('on', 'udp', 'sent_pps', 1e3, '{:.1f}')} "
            f"| {get('on', 'tcp', 'cpu_pct', fmt='{:.1f}')} | {get('on', 'udp', 'cpu_pct', fmt='{:.1f}')} "
            f"| {flags_of(i)} |"
        )
    if problems:
        lines += ["", "Problems seen during the run:", ""] + [f"- {p}" for p in problems]
    lines += [
        "",
        f"Agent: {args.agent_version}, plugins {args.plugins or 'default'}, config {args.config or 'default'}, `--interval 1`"
        + (f"; the 'off' columns are an agent with config {args.baseline_config}" if args.baseline_config else "")
        + ". "
        f"Kernel {platform.release()}, {os.cpu_count()} CPUs. {args.rounds} rounds × {args.seconds:g} s per run, "
        f"iperf3 client/server on CPUs {args.cpus}. Lab {lab.prefix}, "
        f"finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
    ]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=True).stdout.strip()


def describe_tree() -> str:
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "agent", "bpf")
    except (OSError, subprocess.CalledProcessError):
        return "working tree (not a git checkout)"
    return f"working tree at {head}" + (" with uncommitted changes in agent/ or bpf/" if dirty else "")


def export_commit(rev: str) -> tuple[str, str]:
    """`git archive` of agent/ and bpf/ at rev into a temporary directory."""
    commit = git("rev-parse", "--verify", rev + "^{commit}")
    tree = tempfile.mkdtemp(prefix="fovea-bench-src-")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "agent", "bpf"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree, f"commit {commit[:12]}"


def run_condition(lab: NodeLab, args, cond: str, rnd: int, runs: list[dict], problems: list[str]) -> None:
    agent = None
    try:
        if cond == "on" or args.baseline_config:
            # With --baseline-config, "off" is an agent too: the ratio is one feature's cost.
            config = args.agent_config if cond == "on" else args.baseline_config
            agent = Agent(lab.uplink, config=config, tree=args.tree)
            start = {"round": rnd, "cond": cond, "kind": "start",
                     "ready_s": agent.ready_seconds, "ready_cpu": agent.ready_cpu}
            runs.append(start)
            progress(f"round {rnd}: agent {agent.pid} ready in {agent.ready_seconds:.1f}s "
                     f"({agent.ready_cpu:.1f} CPU s)")
            time.sleep(1.0)  # let the first map reads pass
        for kind in ("tcp", "udp"):
            for attempt in range(1, 4):
                before = wait_quiet(lab, agent, args.max_wait)
                try:
                    r = measure(lab, args.seconds, kind == "udp", agent)
                    break
                except RuntimeError as e:
                    seen = foreign_activity(lab, agent)
                    msg = (f"round {rnd} agent {cond} {kind.upper()}, attempt {attempt}: {e}"
                           + (f" (other activity: {'; '.join(seen[:3])})" if seen else ""))
                    progress(msg)
                    problems.append(msg)
                    if attempt == 3:
                        raise
            r.update(round=rnd, cond=cond, kind=kind)
            after = foreign_activity(lab, agent)
            if before or after:
                r["foreign"] = sorted(set(before + after))
                problems.append(f"round {rnd} agent {cond} {kind.upper()}: other activity on the host during "
                                f"the run: {'; '.join(r['foreign'][:4])}")
            runs.append(r)
            if kind == "tcp":
                msg = f"{r['value'] / 1e9:.2f} Gbit/s, {r['retransmits']} retransmits"
            else:
                msg = (f"{r['value'] / 1e3:.1f} kpps received of {r['sent_pps'] / 1e3:.1f} kpps sent "
                       f"({r['lost_pct']:.1f}% lost)")
                if "egress_delta" in r:
                    msg += (f"; agent egress {r['egress_delta']:.0f} vs uplink tx {r['uplink_tx']}, "
                            f"agent drops {r['drops_delta']:.0f} vs iperf3 lost {r['lost_packets']}")
            if "cpu_pct" in r:
                msg += f"; agent CPU {r['cpu_pct']:.1f}%"
            if "foreign" in r:
                msg += " [other activity seen]"
            progress(f"round {rnd}: agent {cond:3} {kind.upper()}: {msg}")
        if agent is not None:
            start["vm_hwm_kib"] = vm_hwm_kib(agent.pid)
    finally:
        if agent is not None:
            rc = agent.stop()
            if rc != 0:
                problems.append(f"round {rnd}: agent exited with {rc} on SIGTERM:\n{agent.output()[-2000:]}")
            left = lab_filters(lab)
            if left:
                others = foreign_processes(set())
                problems.append(f"round {rnd}: fovea tc filters on the lab after our agent's SIGTERM: "
                                f"{', '.join(left)}" + (f" (other agents running: {'; '.join(others[:3])})"
                                                        if others else " (no other agent running)"))
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
    p.add_argument("--raw", metavar="FILE", help="also write every run's numbers as JSON to FILE")
    p.add_argument("--plugins", metavar="LIST",
                   help="agent plugins to run, comma-separated (default: the agent's default set)")
    p.add_argument("--config", metavar="FILE",
                   help="agent config file (e.g. 'flows: {enabled: false}' to compare without the flow table)")
    p.add_argument("--baseline-config", metavar="FILE",
                   help="run an agent with this config in the 'off' condition too (e.g. 'flows: {enabled: false}'), "
                   "so that the ratio is the cost of what the two configs differ in")
    p.add_argument("--commit", metavar="REV",
                   help="run the agent of this git revision (exported to a temporary directory) "
                   "instead of the working tree")
    p.add_argument("--max-wait", type=float, default=300, metavar="SECONDS",
                   help="before each run, wait up to this long for other Fovea agents, test runs and "
                   "iperf3s on the host to end (default 300); runs they overlap are flagged")
    p.add_argument("--include-flagged", action="store_true",
                   help="keep runs that other activity overlapped in the medians (default: leave them out "
                   "when at least 3 clean runs remain per cell)")
    p.add_argument("--cpus", default="0,1", metavar="CLIENT,SERVER",
                   help="pin the iperf3 client and server to these CPUs (default 0,1; 'none': no pinning)")
    args = p.parse_args(argv)
    global CPUS
    if args.cpus != "none":
        try:
            client_cpu, server_cpu = (int(c) for c in args.cpus.split(","))
        except ValueError:
            p.error("--cpus takes CLIENT,SERVER (two CPU numbers) or 'none'")
        CPUS = (client_cpu, server_cpu)
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, eBPF)")

    args.agent_config = None
    if args.plugins and args.config:
        p.error("--plugins and --config: put the plugins in the config file")
    if args.plugins:
        cfg = tempfile.NamedTemporaryFile("w", prefix="fovea-bench-", suffix=".yaml", delete=False)
        cfg.write("plugins: [%s]\n" % ", ".join(x for x in args.plugins.split(",") if x))
        cfg.close()
        args.agent_config = cfg.name
    if args.config:
        args.agent_config = str(Path(args.config).resolve())
    if args.baseline_config:
        args.baseline_config = str(Path(args.baseline_config).resolve())
    args.tree = None
    args.agent_version = describe_tree()
    if args.commit:
        args.tree, args.agent_version = export_commit(args.commit)

    lab = NodeLab("fvb%04x" % random.randrange(16**4), pods=1, ipv6=False, octet=random.randrange(100, 200))
    runs: list[dict] = []
    problems: list[str] = []
    try:
        progress(f"building lab {lab.prefix} (10.{lab.octet}.0.0/16), uplink {lab.uplink}")
        lab.up()
        progress("warm-up (not counted)")
        wait_quiet(lab, None, args.max_wait)
        for udp in (False, True):
            try:
                iperf(lab, 1, udp=udp)
            except RuntimeError as e:
                progress(f"warm-up: {e}")
        for rnd in range(1, args.rounds + 1):
            for cond in ("off", "on"):
                run_condition(lab, args, cond, rnd, runs, problems)
    finally:
        progress(f"removing lab {lab.prefix}")
        lab.down()
        if args.agent_config and not args.config:
            os.unlink(args.agent_config)
        if args.tree:
            shutil.rmtree(args.tree, ignore_errors=True)

    if args.raw:
        Path(args.raw).write_text(json.dumps({"args": vars(args), "runs": runs, "problems": problems}, indent=1))
    text = report(args, runs, lab, problems)
    sys.stdout.write(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
