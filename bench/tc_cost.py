#!/usr/bin/env python3
"""Per-packet cost of Fovea's tc programs with and without the DNS code in them.

bench/datapath.py measures the whole datapath with iperf3, which on a shared
or noisy host cannot resolve a difference of a few nanoseconds per packet.
This measures the programs themselves: each build of bpf/pods.c and
bpf/forward.c (plain, and with -DFOVEA_DNS as the dns plugin compiles them)
is run by the kernel on a synthetic packet with BPF_PROG_TEST_RUN, which
reports the average time per run over `--repeat` runs. Builds are measured
alternately, `--rounds` times, and the medians are compared.

Packets: a 1500-byte TCP segment (bulk TCP), a UDP datagram with a 64-byte
payload to a port that is not DNS (small packets), a DNS query (A,
www.shop.example) and a DNS response for which no query is in flight.

Needs root (loads eBPF). Creates no interface and attaches nothing.

    .venv/bin/python bench/tc_cost.py --rounds 9 --repeat 200000
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import statistics
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.compiler import compile_program  # noqa: E402
from agent.config import Config  # noqa: E402
from agent.kernel.headers import find_headers  # noqa: E402
from agent.plugins.dns import dns_cflags  # noqa: E402


class TestRunOpts(ct.Structure):
    """struct bpf_test_run_opts (libbpf), up to `cpu`; `sz` tells libbpf how much of it we use."""

    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32)]


def packet(proto: int, sport: int, dport: int, payload: bytes) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + len(payload), 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + len(payload), 0, 0x4000, 64, proto, 0,
                     bytes([10, 1, 1, 2]), bytes([10, 1, 2, 2]))
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + ip + l4 + payload


def dns_message(response: bool) -> bytes:
    flags = 0x8180 if response else 0x0100
    return (struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 0)
            + b"\x03www\x04shop\x07example\x00" + struct.pack("!HH", 1, 1))


PACKETS = {
    "TCP segment, 1500 bytes": packet(6, 40000, 5201, bytes(1500 - 40)),
    "UDP, 64-byte payload (not DNS)": packet(17, 40000, 5201, bytes(64)),
    "DNS query (UDP)": packet(17, 40000, 53, dns_message(False)),
    "DNS response, no query in flight": packet(17, 53, 40000, dns_message(True)),
}


def test_run(fd: int, data: bytes, repeat: int) -> float:
    from bcc import libbcc

    buf = ct.create_string_buffer(data, len(data))
    out = ct.create_string_buffer(len(data) + 256)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.cast(buf, ct.c_void_p),
                       data_out=ct.cast(out, ct.c_void_p), data_size_in=len(data),
                       data_size_out=len(out), repeat=repeat)
    fn = libbcc.lib.bpf_prog_test_run_opts
    fn.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]
    if fn(fd, ct.byref(opts)) != 0:
        raise OSError(ct.get_errno(), "BPF_PROG_TEST_RUN failed")
    return float(opts.duration)


def builds(headers) -> dict:
    """{(program, with DNS): loaded function}."""
    cfg = Config()
    dns_flags = dns_cflags(cfg.dns)
    pods_flags = [f"-DPOD_MAP_SIZE={cfg.pods.mapSize}", f"-DFLOW_MAP_SIZE={cfg.pods.flowMapSize}"]
    out = {}
    keep = []
    for program, flags, fn in (("pods", pods_flags, b"pod_from_pod"), ("forward", [], b"forward_egress")):
        for with_dns in (False, True):
            bpf = compile_program(program, flags + (dns_flags if with_dns else []), headers)
            keep.append(bpf)
            out[(program, with_dns)] = bpf.load_func(fn, bpf.SCHED_CLS)
    return out, keep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="alternating measurements per build (default 9)")
    p.add_argument("--repeat", type=int, default=200000, help="runs per measurement (default 200000)")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/tc_cost.py needs root (loads eBPF)")
    headers = find_headers(None, cache=Config().kernel.cacheDir)
    progs, keep = builds(headers)
    results: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for name, data in PACKETS.items():
            for (program, with_dns), fn in progs.items():
                results.setdefault((program, name, with_dns), []).append(test_run(fn.fd, data, args.repeat))
    print("| program | packet | without DNS, ns | with DNS, ns | added, ns |")
    print("|---|---|---:|---:|---:|")
    for program in ("pods", "forward"):
        for name in PACKETS:
            a = statistics.median(results[(program, name, False)])
            b = statistics.median(results[(program, name, True)])
            print(f"| {program} | {name} | {a:.0f} | {b:.0f} | {b - a:+.0f} |")
    for bpf in keep:
        bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
