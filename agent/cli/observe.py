"""The flow-stream client: `fovea observe` and `kubectl fovea observe` (see agent/observe.py
for the protocol)."""

from __future__ import annotations

import argparse
import json
import socket

from agent.errors import FoveaError


def run_observe(args, server: str | None, socket_path: str = "") -> int:
    """Print the records the observe flags ask for (also `kubectl fovea observe`)."""
    filt = {"namespace": args.namespace, "pod": args.pod, "protocol": args.protocol, "port": args.port,
            "verdict": args.verdict, "dns": args.dns or None, "http": args.http or None}
    last = args.last if args.last is not None else (0 if args.follow else 20)
    request = {"last": last, "follow": args.follow, "filter": {k: v for k, v in filt.items() if v is not None}}
    conn = connect(server, socket_path)
    try:
        for record in stream(conn, request):
            print(json.dumps(record) if args.output == "json" else format_human(record), flush=True)
    except BrokenPipeError:  # | head
        pass
    finally:
        conn.close()
    return 0


def add_observe_filters(o: argparse.ArgumentParser) -> None:
    """The record filters and output flags of `fovea observe` and `kubectl fovea observe`."""
    o.add_argument("--namespace", "-n", help="records with an end in this namespace")
    o.add_argument("--pod", help="records with an end in this pod ([namespace/]name)")
    o.add_argument("--protocol", choices=["tcp", "udp", "icmp", "other"], help="this L4 protocol only")
    o.add_argument("--port", type=int, help="records with an end on this port")
    o.add_argument("--verdict", choices=["forwarded", "dropped", "refused", "timeout"],
                   help="dropped: drops only; refused, timeout: TCP connection attempts that failed so")
    o.add_argument("--dns", action="store_true", help="DNS transactions only")
    o.add_argument("--http", action="store_true", help="HTTP requests only (with --dns: both)")
    o.add_argument("-o", "--output", choices=["human", "json"], default="human",
                   help="human (default) or json: one JSON object per line")
    o.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    o.add_argument("--last", type=int, metavar="N",
                   help="the last N matching records first (default 20; 0 with --follow)")


def connect(server: str | None, socket_path: str) -> socket.socket:
    """A connection to an agent's flow stream: `host:port`, else the Unix socket."""
    try:
        if server:
            host, _, port = server.rpartition(":")
            return socket.create_connection((host or "127.0.0.1", int(port)), timeout=10)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(socket_path)
        return s
    except ValueError:
        raise FoveaError(f"--server {server!r} is not host:port", "e.g. --server 127.0.0.1:9811") from None
    except OSError as e:
        where = server or socket_path
        raise FoveaError(
            f"cannot reach the flow stream at {where}: {e.strerror or e}",
            "is the agent running on this node? From outside the node: "
            "kubectl fovea observe --node <node> (through kubectl port-forward)",
        ) from None


def stream(conn: socket.socket, request: dict):
    """Send the request; yield the records (dicts) as they arrive."""
    conn.sendall(json.dumps(request).encode() + b"\n")
    if request.get("follow"):
        conn.settimeout(None)
    with conn.makefile("rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _end(e: dict) -> str:
    if e.get("pod"):
        name = f"{e.get('namespace', '')}/{e['pod']}"
    elif e.get("workload") and e.get("workload") != "external":
        name = f"{e.get('namespace') + '/' if e.get('namespace') else ''}{e['workload']}({e['address']})"
    else:
        name = e.get("address", "?")
    return f"{name}:{e.get('port', 0)}" if e.get("port") else name


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_human(d: dict) -> str:
    """One line per record, like `hubble observe`."""
    kind = d.get("type")
    if kind == "lost":
        return f"!! {d['records']} records lost: the stream could not keep up"
    if kind == "error":
        return f"!! error: {d.get('message')}"
    head = f"{d.get('time', '')}  {kind.upper():5} {d.get('protocol', ''):4} {_end(d['source'])} -> {_end(d['destination'])}"
    if kind == "flow":
        tail = (f"{d['packets']} pkts {_size(d['bytes'])} / {d['reply_packets']} pkts {_size(d['reply_bytes'])}"
                f"  {d.get('tcp_flags') or ''}  {d['end_reason'] if d['final'] else 'ongoing'}")
        if d.get("verdict") in ("refused", "timeout"):
            tail += f"  {d['verdict'].upper()}"
        return f"{head}  {tail}"
    if kind == "drop":
        return f"{head}  DROPPED {d['reason']} ({d['packets']} pkts {_size(d['bytes'])})"
    if kind == "dns":
        latency = f"{d['latency'] * 1000:.1f} ms" if d.get("latency") is not None else "no answer"
        return f"{head}  {d['qtype']} {d.get('name') or '?'} {d.get('rcode') or 'UNANSWERED'} {latency}"
    if kind == "http":
        request = f"{d['method']} {d['path']}" if d.get("path") is not None else d["method"]
        if d.get("status_code") is None:
            return f"{head}  {request} NO RESPONSE"
        return f"{head}  {request} {d['status_code']} {d['latency'] * 1000:.1f} ms"
    return f"{head}  {json.dumps(d)}"
