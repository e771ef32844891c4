"""Merge the per-interface pcap files libpcap wrote into one pcapng file.

pcapng carries what a pcap file cannot: one interface description block per
interface (its name, the pod it belongs to, the filter, its own link type), so
Wireshark shows which pod each packet came from. libpcap reads pcapng but does
not write it; the format is small and fixed, so it is written here with
`struct` (a general pcapng library builds an object per packet, which this
path does not need). The merge is also where limits become exact: packets are
taken in time order until the packet, byte or time limit would be passed.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

PCAP_MAGIC_MICRO = 0xA1B2C3D4
PCAP_MAGIC_NANO = 0xA1B23C4D
SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
OPT_COMMENT, IF_NAME, IF_DESCRIPTION, IF_TSRESOL, IF_FILTER = 1, 2, 3, 9, 11
SHB_OS, SHB_USERAPPL = 3, 4
EPB_FIXED = 32  # block header, interface id, timestamp, lengths, trailing length


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad4(len(value))


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def _options(pairs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_option(c, v) for c, v in pairs if v) + b"\0\0\0\0"  # opt_endofopt


def epb_size(caplen: int) -> int:
    """Bytes an enhanced packet block of `caplen` captured bytes takes."""
    return EPB_FIXED + caplen + _pad4(caplen)


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    comment: str
    linktype: int
    snap_length: int
    filter_expr: str = ""


def header(interfaces: list[InterfaceInfo], application: str, os_name: str) -> bytes:
    """Section header + one interface description block per interface."""
    shb = _block(SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + _options([(SHB_USERAPPL, application.encode()), (SHB_OS, os_name.encode())]))
    idbs = b"".join(
        _block(IDB, struct.pack("<HHI", i.linktype, 0, i.snap_length) + _options([
            (IF_NAME, i.name.encode()),
            (IF_DESCRIPTION, i.comment.encode()),
            (OPT_COMMENT, i.comment.encode()),
            (IF_TSRESOL, b"\x09"),  # nanoseconds
            (IF_FILTER, b"\0" + i.filter_expr.encode() if i.filter_expr else b""),
        ]))
        for i in interfaces
    )
    return shb + idbs


def read_pcap(path: Path, interface: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(timestamp ns, interface, original length, data) of each whole record of a pcap file
    written on this host; a record cut short by a kill at the end is ignored."""
    with open(path, "rb", buffering=1 << 20) as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("=I", head[:4])[0]
        if magic not in (PCAP_MAGIC_MICRO, PCAP_MAGIC_NANO):
            raise ValueError(f"{path}: not a pcap file written on this host")
        scale = 1 if magic == PCAP_MAGIC_NANO else 1000
        record = struct.Struct("=IIII")
        while True:
            rh = f.read(16)
            if len(rh) < 16:
                return
            sec, frac, caplen, origlen = record.unpack(rh)
            data = f.read(caplen)
            if len(data) < caplen:
                return
            yield sec * 1_000_000_000 + frac * scale, interface, origlen, data


@dataclass
class Merged:
    packets: int = 0
    bytes: int = 0  # on-the-wire bytes of the packets written
    size: int = 0
    sha256: str = ""
    limit: str = ""  # "maxPackets" / "maxBytes" when the merge stopped at that limit


def merge(out: BinaryIO, head: bytes, sources: list[Path], *, max_packets: int | None,
          max_bytes: int | None, not_after_ns: int | None) -> Merged:
    """Write `head` then the packets of `sources` (source i = interface i) in time order."""
    digest = hashlib.sha256(head)
    out.write(head)
    result = Merged(size=len(head))
    epb = struct.Struct("<IIIIIII")
    streams = [read_pcap(p, i) for i, p in enumerate(sources)]
    for ts, interface, origlen, data in heapq.merge(*streams, key=lambda r: r[0]):
        if not_after_ns is not None and ts > not_after_ns:
            continue  # the last ring block may run past the end of the capture window
        if max_packets is not None and result.packets >= max_packets:
            result.limit = "maxPackets"
            break
        caplen = len(data)
        length = epb_size(caplen)
        if max_bytes is not None and result.size + length > max_bytes:
            result.limit = "maxBytes"
            break
        block = b"".join((
            epb.pack(EPB, length, interface, ts >> 32, ts & 0xFFFFFFFF, caplen, origlen),
            data, b"\0" * _pad4(caplen), struct.pack("<I", length),
        ))
        out.write(block)
        digest.update(block)
        result.packets += 1
        result.bytes += origlen
        result.size += length
    for stream in streams:
        stream.close()
    result.sha256 = digest.hexdigest()
    return result
