"""Merging per-interface pcap files into pcapng: order, limits, torn tails, readers agree."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess

import pytest
from scapy.all import Ether, IP, UDP, rdpcap, wrpcap

from capture import pcapng
from capture.pcapng import InterfaceInfo, epb_size, merge

T0 = 1_700_000_000


def frames(stamps: list[float], src: str) -> list:
    out = []
    for i, t in enumerate(stamps):
        p = Ether() / IP(src=src, dst="10.0.0.9") / UDP(sport=1000 + i, dport=53) / (b"x" * (10 + i))
        p.time = T0 + t
        out.append(p)
    return out


@pytest.fixture
def sources(tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    wrpcap(str(a), frames([0.1, 0.3, 0.5, 0.7], "10.0.0.1"), nano=True)
    wrpcap(str(b), frames([0.2, 0.4, 0.6], "10.0.0.2"), nano=True)
    return [a, b]


HEAD = pcapng.header([InterfaceInfo("veth-a", "pod shop/a", 1, 262144, "udp"),
                      InterfaceInfo("veth-b", "pod shop/b", 1, 262144, "udp")], "fovea", "Linux test")


def run(sources, tmp_path, **limits):
    out = tmp_path / "out.pcapng"
    with open(out, "wb") as f:
        result = merge(f, HEAD, sources, max_packets=limits.get("max_packets"),
                       max_bytes=limits.get("max_bytes"), not_after_ns=limits.get("not_after_ns"))
    data = out.read_bytes()
    assert len(data) == result.size and hashlib.sha256(data).hexdigest() == result.sha256
    return out, result


def test_merge_is_in_time_order_with_interface_names(sources, tmp_path):
    out, result = run(sources, tmp_path)
    packets = rdpcap(str(out))
    assert result.packets == len(packets) == 7
    assert [p[IP].src[-1] for p in packets] == list("1212121")
    assert result.bytes == sum(len(p) for p in packets)
    if shutil.which("tshark"):
        rows = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.interface_name",
                               "-e", "frame.interface_description"], capture_output=True, text=True,
                              check=True).stdout.splitlines()
        assert rows[:2] == ["veth-a\tpod shop/a", "veth-b\tpod shop/b"]


def test_packet_limit_is_exact(sources, tmp_path):
    _, result = run(sources, tmp_path, max_packets=5)
    assert result.packets == 5 and result.limit == "maxPackets"


def test_byte_limit_keeps_what_fits(sources, tmp_path):
    full = len(HEAD) + sum(epb_size(len(p)) for p in rdpcap(str(sources[0])) + rdpcap(str(sources[1])))
    limit = full - 1  # the last packet no longer fits
    out, result = run(sources, tmp_path, max_bytes=limit)
    assert result.limit == "maxBytes" and result.packets == 6
    assert result.size <= limit and len(rdpcap(str(out))) == 6


def test_time_window_drops_later_packets(sources, tmp_path):
    _, result = run(sources, tmp_path, not_after_ns=(T0 * 10**9) + 450_000_000)
    assert result.packets == 4 and result.limit == ""


def test_a_torn_last_record_is_ignored(sources, tmp_path):
    data = sources[0].read_bytes()
    sources[0].write_bytes(data[:-5])  # as if the writer was killed mid-record
    _, result = run(sources, tmp_path)
    assert result.packets == 6


def test_empty_sources_make_a_valid_file(tmp_path):
    empty = tmp_path / "e.pcap"
    empty.write_bytes(struct.pack("=IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
    out, result = run([empty, empty], tmp_path)
    assert result.packets == 0 and len(rdpcap(str(out))) == 0


def test_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a pcap file"):
        merge(io.BytesIO(), HEAD, [bad], max_packets=None, max_bytes=None, not_after_ns=None)
