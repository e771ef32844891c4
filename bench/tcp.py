#!/usr/bin/env python3
"""The agent under a TCP-heavy load: connects per second between two lab pods.

Builds a NodeLab with two pods, starts the agent (all default plugins; TCP
counts only the lab's pod namespaces, so the host's own connections stay out),
then a client in one pod connects to a server in the other at a fixed rate:
the server accepts and closes at once, the client sees EOF and closes (so
TIME_WAIT lands on the server and the client never runs out of ports).

Reported: connects made and their rate; the agent's handshake-latency
histogram count over the run (it must equal the connects made), its resets
and retransmits (0 expected on a lossless veth), its lost-event counters, and
its CPU (utime+stime from /proc/<pid>/stat) as % of one core over the run.

    .venv/bin/python bench/tcp.py --rate 2000 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.lab.netlab import NodeLab  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PORT = 7000

SERVER = textwrap.dedent("""
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", {port}))
    s.listen(4096)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.close()
""")

CLIENT = textwrap.dedent("""
    import socket, time, sys
    rate, seconds, host, port = {rate}, {seconds}, "{host}", {port}
    made = failed = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        due = start + made / rate
        if now < due:
            time.sleep(due - now)
        c = socket.socket()
        try:
            c.connect((host, port))
            c.recv(1)
            made += 1
        except OSError:
            failed += 1
        finally:
            c.close()
    print(made, failed, time.monotonic() - start)
""")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def lost_tcp(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^fovea_agent_lost_events_total\{[^}]*source="tcp[^"]*"[^}]*\}\s+(\S+)$',
                                            text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=2000, help="connects per second (default 2000)")
    ap.add_argument("--seconds", type=float, default=10, help="length of the run (default 10)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/tcp.py: needs root (network namespaces, eBPF)")

    lab = NodeLab("fvb%05x" % random.randrange(16**5), pods=2, ipv6=False, octet=random.randrange(100, 200))
    port = random.randrange(20000, 30000)
    agent = server = None
    tmp = Path(tempfile.mkdtemp(prefix="fovea-bench-"))
    try:
        lab.up()
        client, srv = lab.pods
        cfg = tmp / "fovea.yaml"
        cfg.write_text(f"pods:\n  interfaces: ['{lab.prefix}p*']\ntcp:\n  includeHost: false\n")
        fovea = Path(sys.executable).parent / "fovea"
        agent = subprocess.Popen([str(fovea), "agent", "--standalone", "--node-name", f"bench-{port}", "--port",
                                  str(port), "--uplink", lab.uplink, "--config", str(cfg), "--interval", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or agent.poll() is not None:
                    sys.exit("bench/tcp.py: the agent did not become ready")
                time.sleep(0.2)
        server = subprocess.Popen(["ip", "netns", "exec", srv.netns, sys.executable, "-c",
                                   SERVER.format(port=PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        time.sleep(2)
        before, cpu0, t0 = scrape(port), cpu_seconds(agent.pid), time.monotonic()
        progress(f"{args.rate} connects/s for {args.seconds:g} s")
        out = subprocess.run(["ip", "netns", "exec", client.netns, sys.executable, "-c",
                              CLIENT.format(rate=args.rate, seconds=args.seconds, host=srv.ipv4, port=PORT)],
                             capture_output=True, text=True, check=True).stdout.split()
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(2.5)  # two reads: everything counted has landed
        after = scrape(port)
        made, failed, took = int(out[0]), int(out[1]), float(out[2])

        def delta(name: str, labels: str = "") -> float:
            return sample(after, name, labels) - sample(before, name, labels)

        counted = delta("fovea_tcp_connect_duration_seconds_count")
        sent = delta("fovea_tcp_resets_total", '{direction="sent"}')
        received = delta("fovea_tcp_resets_total", '{direction="received"}')
        rows = [
            ("connects made (failed)", f"{made} ({failed})"),
            ("rate achieved, connects/s", f"{made / took:.0f}"),
            ("fovea_tcp_connect_duration_seconds_count over the run", f"{counted:.0f} ({'exact' if counted == made else 'NOT exact'})"),
            ("resets sent / received over the run", f"{sent:.0f} / {received:.0f}"),
            ("retransmits over the run", f"{delta('fovea_tcp_retransmits_total'):.0f}"),
            ("TCP lost events (all tcp_* sources)", f"{lost_tcp(after) - lost_tcp(before):.0f}"),
            ("agent CPU over the run, % of one core", f"{100 * (cpu1 - cpu0) / (t1 - t0):.1f}"),
        ]
        print(f"| `bench/tcp.py --rate {args.rate} --seconds {args.seconds:g}` | |\n|---|---:|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        return 0 if counted == made and failed == 0 else 1
    finally:
        for p in (server, agent):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        lab.down()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main())
