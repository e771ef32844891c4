#!/usr/bin/env python3
"""Per-packet cost of Fovea's tc programs, build by build, timed by the kernel.

bench/datapath.py measures the whole datapath with iperf3, which on a shared
or noisy host cannot resolve a few nanoseconds per packet. This measures the
programs themselves: bpf/pods.c and bpf/forward.c are built as the agent
builds them (same flags, from the default config and the plugins' own cflags
helpers) in five variants: plain, +dns (-DFOVEA_DNS), +flows (-DFOVEA_FLOWS),
+dns+flows, and +dns+flows+http (-DFOVEA_HTTP in the pods program: the default
agent). The kernel runs each build on a synthetic
packet `--repeat` times with BPF_PROG_TEST_RUN and reports the mean time per
run; builds are measured interleaved, `--rounds` times, medians shown.

Packets, sent by a local pod (its address listed in flow_pod_addrs, as the
agent lists its pods, so the uplink program leaves the flow to the pods
program): a 1500-byte TCP segment, a UDP datagram with a 64-byte payload to a
port that is not DNS, a DNS query (A, www.shop.example) and a DNS response
for which no query is in flight; and the same UDP datagram from the node
itself (not a pod: the uplink program keeps its flow); and a 1500-byte TCP
segment to HTTP port 80 that starts no message (a body: the parser reads its
first bytes and stops). Each packet is one
flow, so after its first run the flow table holds it: the steady state of a
flow already seen. A pod's packet is run with __sk_buff.ingress_ifindex set
(it came in through the pod's veth), as at the uplink in the real path, where
the DNS code then leaves it to the pods program. The "pods + forward" rows add up the two programs: the
path of a pod's packet to the outside (bench/datapath.py).

HTTP messages change state (a request inserts, its response takes), so they
cannot be repeated: an exchange on one keep-alive connection is timed a run
at a time, request then response, beside the same request sent to a port that
is not HTTP's, in the builds without and with HTTP (the cost per HTTP message).

Needs root (loads eBPF). Creates no interface and attaches nothing.
Markdown to stdout.

    .venv/bin/python bench/tc_cost.py --rounds 7 --repeat 200000
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import socket
import statistics
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.compiler import compile_program  # noqa: E402
from agent.config import Config  # noqa: E402
from agent.flows import KernelFlowTable, flow_cflags, flow_table_cflags  # noqa: E402
from agent.kernel.headers import find_headers  # noqa: E402
from agent.plugins.dns import dns_cflags  # noqa: E402
from agent.plugins.http import http_cflags  # noqa: E402

BUILDS = ("plain", "+dns", "+flows", "+dns+flows", "+dns+flows+http")
DEFAULT = BUILDS[-1]  # what the default agent loads
PROGRAMS = (("pods", b"pod_from_pod"), ("forward", b"forward_egress"))  # packets leaving a pod, then the node


class TestRunOpts(ct.Structure):
    """struct bpf_test_run_opts (libbpf), up to `cpu`; `sz` tells libbpf how much of it we use."""

    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32)]


POD, NODE, PEER = "10.1.1.2", "10.1.9.1", "10.1.2.2"


def packet(proto: int, sport: int, dport: int, payload: bytes, src: str = POD) -> bytes:
    """Ethernet + IPv4 (src -> PEER) + TCP (20-byte header, ACK) or UDP."""
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + len(payload), 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + len(payload), 0, 0x4000, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(PEER))
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + ip + l4 + payload


def dns_message(response: bool) -> bytes:
    flags = 0x8180 if response else 0x0100
    return (struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 0)
            + b"\x03www\x04shop\x07example\x00" + struct.pack("!HH", 1, 1))


PACKETS = {
    "TCP segment, 1500 bytes": packet(6, 40000, 5201, bytes(1500 - 40)),
    "UDP, 64-byte payload (not DNS)": packet(17, 40000, 5201, bytes(64)),
    "DNS query": packet(17, 40000, 53, dns_message(False)),
    # Same addresses as the query, so it answers no query in flight.
    "DNS response, no query in flight": packet(17, 53, 40000, dns_message(True)),
    "UDP, 64-byte payload, from the node": packet(17, 40000, 5201, bytes(64), src=NODE),
}
# Source port 40000 shares its low 6 bits with HTTP port 8000: it passes http.h's port mask and
# runs one compare chain. Most ports do not (59 of 64 low-bit values): this one runs none.
PACKETS["TCP segment, 1500 bytes, ports the HTTP mask lets go"] = packet(6, 40001, 5201, bytes(1500 - 40))
PACKETS["TCP segment to port 80, 1500 bytes (a body)"] = packet(6, 40001, 80, bytes(1500 - 40))
FROM_POD = [name for name in PACKETS if "from the node" not in name]

# One HTTP exchange on a keep-alive connection: the request and its response, in turn
# (the response is run through the same program: the parser does not look at the hook).
HTTP_REQUEST = packet(6, 40030, 80, b"GET /cart HTTP/1.1\r\nHost: shop\r\nAccept: */*\r\n\r\n")
HTTP_RESPONSE = packet(6, 80, 40030, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
HTTP_RESPONSE = HTTP_RESPONSE[:26] + HTTP_RESPONSE[30:34] + HTTP_RESPONSE[26:30] + HTTP_RESPONSE[34:]  # PEER -> POD
NOT_HTTP = packet(6, 40031, 5201, b"GET /cart HTTP/1.1\r\nHost: shop\r\nAccept: */*\r\n\r\n")  # not an HTTP port


SKB_INGRESS_IFINDEX = 36  # offset of ingress_ifindex in struct __sk_buff (uapi/linux/bpf.h)
POD_VETH = 2  # any ifindex but 0: the packet was received on another interface (the pod's)


def test_run(fd: int, data: bytes, repeat: int, ingress_ifindex: int) -> float:
    """Mean ns per run of the program on `data`, as the kernel timed it."""
    from bcc import libbcc

    buf = ct.create_string_buffer(data, len(data))
    out = ct.create_string_buffer(len(data) + 256)
    ctx = ct.create_string_buffer(SKB_INGRESS_IFINDEX + 4)  # the rest of __sk_buff is left to the kernel
    struct.pack_into("=I", ctx, SKB_INGRESS_IFINDEX, ingress_ifindex)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.cast(buf, ct.c_void_p),
                       data_out=ct.cast(out, ct.c_void_p), data_size_in=len(data),
                       data_size_out=len(out), ctx_in=ct.cast(ctx, ct.c_void_p), ctx_size_in=len(ctx),
                       repeat=repeat)
    fn = libbcc.lib.bpf_prog_test_run_opts
    fn.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]
    if fn(fd, ct.byref(opts)) != 0:
        raise OSError(ct.get_errno(), "BPF_PROG_TEST_RUN failed")
    return float(opts.duration)


def build_flags(cfg: Config) -> dict[tuple[str, str], list[str]]:
    """{(program, build): cflags}, in the order the agent passes them: the host
    plugin's flags (flows among them), then the dns extension's."""
    own = {"pods": [f"-DPOD_MAP_SIZE={cfg.pods.mapSize}", *flow_table_cflags(cfg.flows)],  # its counters
           "forward": []}
    flows, dns = flow_cflags(cfg.flows), dns_cflags(cfg.dns)
    http = {"pods": http_cflags(cfg.http), "forward": []}  # HTTP is parsed at pod interfaces only
    return {(program, build): own[program] + (flows if "flows" in build else []) + (dns if "dns" in build else [])
            + (http[program] if "http" in build else [])
            for program, _ in PROGRAMS for build in BUILDS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurements per build and packet (default 7)")
    p.add_argument("--repeat", type=int, default=200_000, help="runs per measurement (default 200000)")
    p.add_argument("--exchanges", type=int, default=20_000, help="HTTP exchanges timed one by one (default 20000)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/tc_cost.py needs root (loads eBPF): run it with sudo")
    cfg = Config()
    headers = find_headers(None, cache=cfg.kernel.cacheDir)
    functions = dict(PROGRAMS)
    objects, loaded = [], {}  # loaded: (program, build) -> loaded function
    try:
        for (program, build), flags in build_flags(cfg).items():
            objects.append(compile_program(program, flags, headers))
            loaded[(program, build)] = objects[-1].load_func(functions[program], objects[-1].SCHED_CLS)
            if "flows" in build or program == "pods":
                KernelFlowTable(objects[-1]).set_pod_addresses({POD}, set())
        ns: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for name, data in PACKETS.items():
                for (program, build), fn in loaded.items():
                    ifindex = POD_VETH if name in FROM_POD else 0
                    ns.setdefault((program, build, name), []).append(test_run(fn.fd, data, args.repeat, ifindex))
        exchanges = http_exchanges(loaded, args.exchanges)
    finally:
        for bpf in objects:
            bpf.cleanup()

    med = {key: statistics.median(v) for key, v in ns.items()}
    for name in FROM_POD:  # a pod's packet to the outside passes both programs
        for build in BUILDS:
            med[("pods + forward", build, name)] = med[("pods", build, name)] + med[("forward", build, name)]
    print("| program | packet | " + " | ".join(f"{b}, ns" for b in BUILDS) + " | default − plain, ns |")
    print("|---|---|" + "---:|" * (len(BUILDS) + 1))
    for program, names in (("pods", FROM_POD), ("forward", PACKETS), ("pods + forward", FROM_POD)):
        for name in names:
            row = [med[(program, b, name)] for b in BUILDS]
            print(f"| {program} | {name} | " + " | ".join(f"{v:.0f}" for v in row) + f" | {row[-1] - row[0]:+.0f} |")
    print(f"\nMedians of {args.rounds} interleaved rounds of {args.repeat} runs each "
          f"(BPF_PROG_TEST_RUN, kernel {os.uname().release}); default = {DEFAULT}.")
    print("\n| pods program, one run each | " + " | ".join(f"{b}, ns" for b in HTTP_BUILDS) + " | difference, ns |")
    print("|---|" + "---:|" * (len(HTTP_BUILDS) + 1))
    for name in ("HTTP request (GET, port 80)", "HTTP response (200)", "the same request to port 5201 (not HTTP)"):
        row = [statistics.median(exchanges[(b, name)]) for b in HTTP_BUILDS]
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row) + f" | {row[-1] - row[0]:+.0f} |")
    print(f"\nMedians of {args.exchanges} exchanges on one keep-alive connection, a run each "
          "(the request, then its response: one run per packet, so each time includes the test run's own overhead).")
    return 0


HTTP_BUILDS = ("+dns+flows", DEFAULT)


def http_exchanges(loaded, exchanges: int) -> dict[tuple, list[float]]:
    """Request, response and a non-HTTP packet of the same size, one run each, in turn."""
    out: dict[tuple, list[float]] = {}
    for build in HTTP_BUILDS:
        fd = loaded[("pods", build)].fd
        for data in (HTTP_REQUEST, HTTP_RESPONSE, NOT_HTTP):  # the flows' first packets make their entries
            test_run(fd, data, 1, POD_VETH)
    for _ in range(exchanges):
        for build in HTTP_BUILDS:
            fd = loaded[("pods", build)].fd
            for name, data in (("HTTP request (GET, port 80)", HTTP_REQUEST), ("HTTP response (200)", HTTP_RESPONSE),
                               ("the same request to port 5201 (not HTTP)", NOT_HTTP)):
                out.setdefault((build, name), []).append(test_run(fd, data, 1, POD_VETH))
    return out


if __name__ == "__main__":
    sys.exit(main())
