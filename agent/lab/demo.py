"""`fovea demo`: the agent on a demo node made of network namespaces.

Two "pods" and an "outside world" behind a demo uplink (agent/lab/netlab.py).
The pods are named by a static pods file (shop/web and shop/db), so the
summary shows pod-level traffic and the workload traffic map too.
Live traffic flows from the pods to the world: pings, a TCP transfer, UDP
datagrams, plus traffic that the kernel drops: UDP to a port an iptables rule
in the world blocks (NETFILTER_DROP), UDP to a port nobody listens on and TCP
to a closed port (NO_SOCKET). The agent runs in this process and serves
/metrics; the terminal shows a live summary until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.config import Config, PodLevelConfig, PodsConfig
from agent.lab.netlab import NodeLab
from agent.runtime import Agent, require_root

log = logging.getLogger(__name__)

PREFIX = "fvdemo"
OCTET = 213  # 10.213.0.0/16 and fd00:213::/32, unlikely to be in use
ECHO_PORT, OPEN_UDP_PORT, BLOCKED_PORT, CLOSED_PORT = 8080, 5000, 9999, 7777


class Traffic:
    """Background traffic through the demo node, some of it dropped on purpose."""

    def __init__(self, lab: NodeLab):
        self.lab = lab
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        world = self.lab.world
        self.tcp_server = self.lab.socket(world.netns, socket.AF_INET, socket.SOCK_STREAM)
        self.tcp_server.bind((world.ipv4, ECHO_PORT))
        self.tcp_server.listen(16)
        self.tcp_server.settimeout(0.5)
        self.udp_server = self.lab.socket(world.netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_server.bind((world.ipv4, OPEN_UDP_PORT))
        self.udp_server.settimeout(0.5)
        self.lab.run(world.netns, "iptables", "-A", "INPUT", "-p", "udp", "--dport", str(BLOCKED_PORT), "-j", "DROP")
        for target in (self._serve_tcp, self._serve_udp, self._pod_a, self._pod_b):
            t = threading.Thread(target=self._guard(target), name=target.__name__, daemon=True)
            t.start()
            self.threads.append(t)

    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception:
                if not self.stop.is_set():
                    log.exception("demo traffic %s failed", fn.__name__)
        return run

    def _serve_tcp(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp_server.accept()
            except socket.timeout:
                continue
            with conn:
                while conn.recv(65536):
                    pass

    def _serve_udp(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(socket.timeout):
                self.udp_server.recv(2048)

    def _pod_a(self) -> None:
        """Pings, a TCP transfer, UDP to a closed port."""
        pod, world = self.lab.pods[0], self.lab.world
        udp = self.lab.socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
        while not self.stop.wait(0.5):
            subprocess.run(["ip", "netns", "exec", pod.netns, "ping", "-c", "3", "-i", "0.05", "-q", world.ipv4],
                           capture_output=True)
            tcp = self.lab.socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM)
            with tcp:
                tcp.connect((world.ipv4, ECHO_PORT))
                tcp.sendall(b"x" * 256 * 1024)
            udp.sendto(b"closed", (world.ipv4, CLOSED_PORT))

    def _pod_b(self) -> None:
        """UDP that arrives, UDP that iptables drops, TCP to a closed port."""
        pod, world = self.lab.pods[1], self.lab.world
        udp = self.lab.socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
        while not self.stop.wait(0.25):
            for _ in range(5):
                udp.sendto(b"hello", (world.ipv4, OPEN_UDP_PORT))
            udp.sendto(b"blocked", (world.ipv4, BLOCKED_PORT))
            tcp = self.lab.socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM)
            with tcp, contextlib.suppress(ConnectionRefusedError):
                tcp.connect((world.ipv4, CLOSED_PORT))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self.tcp_server.close()
        self.udp_server.close()


DEMO_PODS = (("shop", "web-7d9c-abcde", "Deployment", "web"), ("shop", "db-0", "StatefulSet", "db"))


def _write_static_pods(lab: NodeLab, directory: str) -> str:
    entries = [
        {"ip": ip, "namespace": ns, "pod": name, "workloadKind": kind, "workloadName": workload}
        for (ns, name, kind, workload), ep in zip(DEMO_PODS, lab.pods)
        for ip in (ep.ipv4, ep.ipv6)
    ]
    path = os.path.join(directory, "pods.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"pods": entries}, f)
    return path


def _scrape(port: int) -> dict[tuple, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """Names left-aligned, numbers (packets, bytes, values and their rates) right-aligned."""
    table = Table(title=title, expand=True)
    for col in columns:
        table.add_column(col, justify="right" if col.startswith(("packets", "bytes", "value", "per second")) else "left")
    return table


def _summary(port: int, now: dict, prev: dict, dt: float, started: float, until: str) -> Group:
    def rate(key):
        return (now.get(key, 0) - prev.get(key, now.get(key, 0))) / dt if dt > 0 else 0.0

    fwd = _table("Forward traffic on the demo uplink", ("direction", "packets", "packets/s", "bytes", "bytes/s"))
    for d in ("ingress", "egress"):
        pk = ("fovea_forward_packets_total", (("direction", d),))
        bk = ("fovea_forward_bytes_total", (("direction", d),))
        fwd.add_row(d, f"{now.get(pk, 0):,.0f}", f"{rate(pk):,.1f}", f"{now.get(bk, 0):,.0f}", f"{rate(bk):,.0f}")

    drops = _table("Drops by the kernel's reason (whole node)", ("reason", "protocol", "packets", "packets/s"))
    rows = sorted(
        ((dict(labels), v, rate((name, labels))) for (name, labels), v in now.items()
         if name == "fovea_drop_packets_total"),
        key=lambda r: -r[1],
    )
    for labels, v, r in rows[:12]:
        drops.add_row(labels["reason"], labels["protocol"], f"{v:,.0f}", f"{r:,.1f}")

    pods = _table("Pods (fovea_pod_packets_total)", ("namespace/pod", "workload", "direction", "packets", "packets/s"))
    for (name, labels), v in sorted(now.items()):
        if name == "fovea_pod_packets_total":
            lab = dict(labels)
            pods.add_row(f"{lab['namespace']}/{lab['pod']}", f"{lab['workload_kind']}/{lab['workload_name']}",
                         lab["direction"], f"{v:,.0f}", f"{rate((name, labels)):,.1f}")

    flows = _table("Traffic map (fovea_workload_flow_packets_total)", ("from", "to", "protocol", "packets", "packets/s"))
    for (name, labels), v in sorted(now.items()):
        if name == "fovea_workload_flow_packets_total":
            lab = dict(labels)
            src = "/".join(x for x in (lab["source_namespace"], lab["source_workload"]) if x)
            dst = "/".join(x for x in (lab["destination_namespace"], lab["destination_workload"]) if x)
            flows.add_row(src, dst, lab["protocol"], f"{v:,.0f}", f"{rate((name, labels)):,.1f}")

    tcp = _table("TCP health (node)", ("measure", "value", "per second"))
    for title, key in (("retransmits", ("fovea_tcp_retransmits_total", ())),
                       ("resets sent", ("fovea_tcp_resets_total", (("direction", "sent"),))),
                       ("resets received", ("fovea_tcp_resets_total", (("direction", "received"),))),
                       ("handshakes timed", ("fovea_tcp_connect_duration_seconds_count", ()))):
        tcp.add_row(title, f"{now.get(key, 0):,.0f}", f"{rate(key):,.1f}")
    for state in ("ESTABLISHED", "TIME_WAIT"):
        tcp.add_row(f"connections {state}", f"{now.get(('fovea_tcp_connections', (('state', state),)), 0):,.0f}", "")
    handshakes = now.get(("fovea_tcp_connect_duration_seconds_count", ()), 0)
    if handshakes:
        mean = now.get(("fovea_tcp_connect_duration_seconds_sum", ()), 0) / handshakes
        tcp.add_row("mean handshake", f"{mean * 1e6:,.0f} µs", "")

    head = Text.assemble(
        ("Fovea demo", "bold"), f"  running {time.monotonic() - started:,.0f}s  ",
        f"metrics: curl localhost:{port}/metrics  ", (until, "dim"),
    )
    return Group(head, fwd, drops, pods, flows, tcp)


def run_demo(port: int = 9810, duration: float = 0) -> int:
    require_root()
    console = Console()
    lab = NodeLab(PREFIX, pods=2, ipv6=True, octet=OCTET)
    agent = traffic = None
    tmp = tempfile.mkdtemp(prefix="fovea-demo-")
    try:
        console.print("building the demo node (network namespaces)...")
        lab.up()
        pods_file = _write_static_pods(lab, tmp)
        config = Config(
            standalone=True, uplinks=(lab.uplink,), port=port, interval=2.0, nodeName="demo-node",
            staticPods=pods_file, pods=PodsConfig(interfaces=(PREFIX + "p*",)),
            podLevel=PodLevelConfig(allPods=True),
        )
        agent = Agent(config)
        console.print("compiling and loading the eBPF programs...")
        agent.start()
        threading.Thread(target=agent.run, name="agent", daemon=True).start()
        traffic = Traffic(lab)
        traffic.start()
        console.print(f"Fovea is serving metrics: curl localhost:{port}/metrics")

        started = time.monotonic()
        until = f"stops after {duration:.0f}s" if duration else "Ctrl-C to stop"
        prev, prev_t = _scrape(port), time.monotonic()
        with Live(_summary(port, prev, prev, 0, started, until), console=console, refresh_per_second=2) as live:
            while not duration or time.monotonic() - started < duration:
                time.sleep(1)
                now, t = _scrape(port), time.monotonic()
                live.update(_summary(port, now, prev, t - prev_t, started, until))
                prev, prev_t = now, t
    except KeyboardInterrupt:
        pass
    finally:
        if traffic is not None:
            traffic.close()
        if agent is not None:
            agent.stop()
            agent.close()
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
        console.print("removed everything the demo created (namespaces, links, tc filters, iptables rules)")
    return 0
