#!/usr/bin/env python3
"""Capture rate of the Fovea capture engine next to `tcpdump -w`, on the same traffic.

Builds a NodeLab (one pod and a "world" namespace behind the lab uplink) and
sends iperf3 UDP (64-byte payloads) from the pod to the world, at a ladder of
paced rates and at full load (`-b 0`). For each rate, the engine and tcpdump
take turns (order alternating) capturing everything on the pod's host-side
veth into a file:

* ground truth: packets that crossed the veth while the capture ran (its rx
  and tx counters; iperf3's control connection included, since nothing is
  filtered);
* captured: packets in the file (engine: its result; tcpdump: records read
  back from the file);
* loss: ground truth - captured; kernel drops as each tool reports them
  (the engine's dropped_packets, tcpdump's "dropped by kernel");
* CPU: the capturing process's utime+stime while the traffic ran, in % of one
  core; for the engine also its total including writing the pcapng file
  after the capture.

The lossless rate of a tool is the highest packet rate (as iperf3 measured
its sending) at which it lost nothing. Both tools get the same ring buffer (the engine's 8 MiB, or
--ring-kib: a small ring makes how fast each tool empties it show) and snap
length.
The engine runs in a process of its own, like tcpdump.

Progress goes to stderr; the markdown report to stdout (and --output).
Needs root. Everything is created in the lab's namespaces and removed at the end.

    .venv/bin/python bench/capture.py --seconds 3 --rates 50000,100000,200000,300000,400000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.lab.netlab import NodeLab  # noqa: E402
from capture.engine import RING_BUFFER_BYTES  # noqa: E402
from capture.pcapng import read_pcap  # noqa: E402

GOAL = 0.5
IPERF_PORT = 5201
PAYLOAD = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
RING = RING_BUFFER_BYTES  # per capture, both tools; --ring-kib
PIN: list[str] = []  # taskset prefix for both tools; --capture-cpu

ENGINE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import capture.engine
    from capture.engine import CaptureRun, Interface, Limits
    capture.engine.RING_BUFFER_BYTES = int(sys.argv[3])
    run = CaptureRun([Interface(sys.argv[1])], None, Limits(duration=3600), Path(sys.argv[2]))
    run.start()
    print("ready", flush=True)
    sys.stdin.readline()
    run.stop()
    r = run.wait()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"packets": r.packets, "dropped": r.dropped_packets, "reason": r.stop_reason,
                      "cpu_total": ru.ru_utime + ru.ru_stime}), flush=True)
""")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def link_packets(ifname: str) -> int:
    stats = Path(f"/sys/class/net/{ifname}/statistics")
    return int((stats / "rx_packets").read_text()) + int((stats / "tx_packets").read_text())


def iperf(lab: NodeLab, seconds: float, pps: int) -> dict:
    world, pod = lab.world, lab.pods[0]
    rate = str(pps * PAYLOAD * 8) if pps else "0"
    server = subprocess.Popen(["ip", "netns", "exec", world.netns, "iperf3", "-s", "-1", "-B", world.ipv4,
                               "-p", str(IPERF_PORT), "-J", "-A", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = ["iperf3", "-c", world.ipv4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-A", "0",
              "-u", "-b", rate, "-l", str(PAYLOAD), "--connect-timeout", "5000"]
    try:
        for _ in range(50):
            time.sleep(0.1)
            r = lab.run(pod.netns, *client, timeout=seconds + 30, check=False)
            if r.returncode == 0:
                server.communicate(timeout=30)
                return json.loads(r.stdout)
            if server.poll() is not None or "refused" not in r.stdout + r.stderr:
                break
        raise RuntimeError(f"iperf3 failed: {r.stdout[-300:]} {r.stderr[-300:]}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def run_engine(lab: NodeLab, seconds: float, pps: int, workdir: Path) -> dict:
    path = workdir / f"engine-{random.randrange(1 << 30)}.pcapng"
    proc = subprocess.Popen([*PIN, sys.executable, "-c", ENGINE, lab.pods[0].host_if, str(path), str(RING)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        out = traffic(lab, seconds, pps, proc.pid)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        path.unlink(missing_ok=True)
    out.update(captured=result["packets"], dropped=result["dropped"],
               cpu_total_pct=100 * result["cpu_total"] / out["wall"])
    return out


def run_tcpdump(lab: NodeLab, seconds: float, pps: int, workdir: Path) -> dict:
    path = workdir / f"tcpdump-{random.randrange(1 << 30)}.pcap"
    proc = subprocess.Popen([*PIN, "tcpdump", "-i", lab.pods[0].host_if, "-w", str(path), "-s", "262144", "-n",
                             "-B", str(RING >> 10), "-Z", "root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "listening on" not in proc.stderr.readline():
            if proc.poll() is not None:
                raise RuntimeError("tcpdump exited")
        out = traffic(lab, seconds, pps, proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        dropped = int(next(ln.split()[0] for ln in err.splitlines() if "dropped by kernel" in ln))
        captured = sum(1 for _ in read_pcap(path, 0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        path.unlink(missing_ok=True)
    out.update(captured=captured, dropped=dropped)
    return out


def traffic(lab: NodeLab, seconds: float, pps: int, pid: int) -> dict:
    """Send, and measure the capturing process and the interface around it."""
    time.sleep(0.2)
    before, cpu0, t0 = link_packets(lab.pods[0].host_if), cpu_seconds(pid), time.monotonic()
    result = iperf(lab, seconds, pps)
    wall = time.monotonic() - t0
    time.sleep(1.5)  # the last ring block reaches user space (tcpdump's block timeout is 1 s)
    cpu = cpu_seconds(pid) - cpu0
    truth = link_packets(lab.pods[0].host_if) - before
    sent = result["end"]["sum"]["packets"]
    return {"truth": truth, "sent_pps": sent / result["end"]["sum"]["seconds"], "wall": wall,
            "cpu_pct": 100 * cpu / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--rates", default="50000,100000,200000,300000,400000",
                   help="paced packet rates to try (full load is always run too)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the whole ladder")
    p.add_argument("--ring-kib", type=int, default=RING_BUFFER_BYTES >> 10,
                   help="kernel ring size for both tools (default: the engine's)")
    p.add_argument("--capture-cpu", type=int,
                   help="pin both capturing processes to this CPU (0: the iperf3 sender's, 1: the receiver's)")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    global RING, PIN
    RING = args.ring_kib << 10
    PIN = ["taskset", "-c", str(args.capture_cpu)] if args.capture_cpu is not None else []
    rates = ([int(r) for r in args.rates.split(",") if r] + [0]) * args.repeat

    lab = NodeLab(f"fvb{random.randrange(16**5):05x}", pods=1, ipv6=False, octet=random.randrange(100, 200))
    rows = []
    with lab, tempfile.TemporaryDirectory(prefix="fovea-bench-") as tmp:
        workdir = Path(tmp)
        for i, pps in enumerate(rates):
            order = [("engine", run_engine), ("tcpdump", run_tcpdump)]
            if i % 2:
                order.reverse()
            for tool, fn in order:
                r = fn(lab, args.seconds, pps, workdir)
                r.update(tool=tool, rate=pps, loss=r["truth"] - r["captured"])
                progress(f"{tool:8} rate {pps or 'full':>7}: sent {r['sent_pps']:9.0f} pps, on veth {r['truth']},"
                         f" captured {r['captured']}, lost {r['loss']}, kernel drops {r['dropped']},"
                         f" CPU {r['cpu_pct']:.0f}%")
                rows.append(r)
    report = render(rows, args)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


def render(rows: list[dict], args) -> str:
    def lossless(tool: str) -> float:
        ok = [r["sent_pps"] for r in rows if r["tool"] == tool and r["loss"] == 0]
        return max(ok, default=0.0)

    engine, tcpdump = lossless("engine"), lossless("tcpdump")
    if tcpdump:
        ratio = f"{engine / tcpdump:.2f}"
        verdict = "met" if engine / tcpdump >= GOAL else "**not met**"
    else:
        ratio, verdict = "–", "tcpdump lost packets at every rate tried"
    lines = [
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()}, Linux {platform.release()},"
        f" {os.cpu_count()} CPUs, ring {RING >> 10} KiB"
        f"{f', capture pinned to CPU {PIN[-1]}' if PIN else ''}; `{' '.join(['bench/capture.py', *sys.argv[1:]])}`",
        "",
        "| | engine | tcpdump -w | ratio | goal |",
        "|---|---|---|---|---|",
        f"| highest lossless rate, packets/s | {engine:,.0f} | {tcpdump:,.0f} | {ratio} |"
        f" ≥ {GOAL}: {verdict} |",
        "",
        "| rate asked (pps) | tool | packets/s sent | packets on the veth | captured | lost | kernel drops | CPU % "
        "(capture) | CPU % (incl. file) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = f"{r['cpu_total_pct']:.0f}" if "cpu_total_pct" in r else "–"
        lines.append(f"| {r['rate'] or 'full load'} | {r['tool']} | {r['sent_pps']:,.0f} | {r['truth']:,} |"
                     f" {r['captured']:,} | {r['loss']:,} | {r['dropped']:,} | {r['cpu_pct']:.0f} | {total} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
