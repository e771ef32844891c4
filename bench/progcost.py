#!/usr/bin/env python3
"""Per-packet cost of Fovea's tc programs, measured by the kernel itself.

BPF_PROG_TEST_RUN runs a loaded program on a packet we hand it, `--repeat`
times, and returns the mean run time per packet in nanoseconds. No traffic,
no veth, no other process in the path: the number is the program's own cost,
which a shared, busy machine blurs much less than throughput runs do
(bench/datapath.py). Each program is built twice, with and without the flow
table (-DFOVEA_FLOWS), and the builds are measured interleaved, `--rounds`
times, on two packets: a 1500-byte TCP segment and a 64-byte-payload UDP
datagram (one flow each: the steady state of a flow already in the table).

Needs root. Markdown to stdout.

    .venv/bin/python bench/progcost.py --rounds 7 --repeat 200000
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
from agent.config import FlowsConfig  # noqa: E402
from agent.flows import flow_cflags  # noqa: E402
from agent.kernel.headers import find_headers  # noqa: E402

BPF_PROG_TEST_RUN = 10
SYS_BPF = 321  # x86_64


class TestRunAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32), ("data_size_in", ct.c_uint32),
                ("data_size_out", ct.c_uint32), ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32), ("ctx_size_in", ct.c_uint32),
                ("ctx_size_out", ct.c_uint32), ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32), ("pad", ct.c_uint32)]


def checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def frame(proto: int, payload: int) -> bytes:
    """Ethernet + IPv4 + TCP (20-byte header, ACK) or UDP, with `payload` bytes."""
    l4 = (struct.pack("!HHIIBBHHH", 43210, 5201, 1, 1, 5 << 4, 0x10, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", 43210, 5201, 8 + payload, 0))
    total = 20 + len(l4) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, proto, 0,
                     bytes([10, 1, 1, 2]), bytes([10, 1, 2, 2]))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00"
    return eth + ip + l4 + b"x" * payload


def test_run(prog_fd: int, packet: bytes, repeat: int) -> float:
    """Mean ns per run of the program on `packet`, as the kernel timed it."""
    libc = ct.CDLL(None, use_errno=True)
    buf = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet), data_in=ct.addressof(buf),
                       data_size_out=len(out), data_out=ct.addressof(out), repeat=repeat)
    if libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) != 0:
        raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
    return float(attr.duration)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=200_000, help="runs per measurement (default 200000)")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("needs root")
    headers = find_headers(None, cache="/var/cache/fovea")
    flows = flow_cflags(FlowsConfig())
    builds = {}
    for name, fn, extra in (("pods", b"pod_from_pod", ["-DPOD_MAP_SIZE=8192", "-DFLOW_MAP_SIZE=65536"]),
                            ("forward", b"forward_egress", [])):
        for label, flags in (("without flows", extra), ("with flows", extra + flows)):
            bpf = compile_program(name, flags, headers)
            builds[(name, label)] = (bpf, bpf.load_func(fn, bpf.SCHED_CLS).fd)
    packets = {"TCP 1500 B": frame(6, 1460), "UDP 64 B payload": frame(17, 64)}
    results: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for (name, label), (_, fd) in builds.items():
            for pname, packet in packets.items():
                results.setdefault((name, pname, label), []).append(test_run(fd, packet, args.repeat))
    print("| program | packet | without flows, ns/packet | with flows, ns/packet | added, ns/packet |")
    print("|---|---|---:|---:|---:|")
    for name in ("pods", "forward"):
        for pname in packets:
            off = statistics.median(results[(name, pname, "without flows")])
            on = statistics.median(results[(name, pname, "with flows")])
            print(f"| {name} | {pname} | {off:.0f} | {on:.0f} | {on - off:+.0f} |")
    print(f"\nMedians of {args.rounds} interleaved rounds of {args.repeat} runs each "
          f"(BPF_PROG_TEST_RUN, kernel {os.uname().release}).")
    for bpf, _ in builds.values():
        bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
