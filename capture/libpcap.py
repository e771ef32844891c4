"""libpcap through ctypes: just what the engine needs.

Packets go from the kernel ring to the file inside libpcap: `pcap_dispatch` is
handed libpcap's own `pcap_dump` as the callback, so no Python runs per packet.
ctypes releases the GIL during each call, so one thread per interface captures
in parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from agent.errors import FoveaError

PCAP_ERRBUF_SIZE = 256
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
PCAP_TSTAMP_PRECISION_NANO = 1
PCAP_ERROR_BREAK = -2
DLT_EN10MB = 1


class BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class PcapStat(ctypes.Structure):
    _fields_ = [("ps_recv", ctypes.c_uint), ("ps_drop", ctypes.c_uint), ("ps_ifdrop", ctypes.c_uint)]


def _load() -> ctypes.CDLL:
    names = [ctypes.util.find_library("pcap"), "libpcap.so.0.8", "libpcap.so.1", "libpcap.so"]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    else:
        raise FoveaError("libpcap not found", "install libpcap (Debian: libpcap0.8)")
    p, c_int, c_char_p, c_void_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    sig = {
        "pcap_create": (p, [c_char_p, c_char_p]),
        "pcap_open_dead": (p, [c_int, c_int]),
        "pcap_set_snaplen": (c_int, [p, c_int]),
        "pcap_set_promisc": (c_int, [p, c_int]),
        "pcap_set_timeout": (c_int, [p, c_int]),
        "pcap_set_buffer_size": (c_int, [p, c_int]),
        "pcap_set_tstamp_precision": (c_int, [p, c_int]),
        "pcap_activate": (c_int, [p]),
        "pcap_datalink": (c_int, [p]),
        "pcap_snapshot": (c_int, [p]),
        "pcap_geterr": (c_char_p, [p]),
        "pcap_statustostr": (c_char_p, [c_int]),
        "pcap_compile": (c_int, [p, ctypes.POINTER(BpfProgram), c_char_p, c_int, ctypes.c_uint32]),
        "pcap_setfilter": (c_int, [p, ctypes.POINTER(BpfProgram)]),
        "pcap_freecode": (None, [ctypes.POINTER(BpfProgram)]),
        "pcap_dump_fopen": (p, [p, c_void_p]),
        "pcap_dispatch": (c_int, [p, c_int, c_void_p, c_void_p]),
        "pcap_dump_ftell64": (ctypes.c_int64, [p]),
        "pcap_dump_flush": (c_int, [p]),
        "pcap_dump_close": (None, [p]),
        "pcap_stats": (c_int, [p, ctypes.POINTER(PcapStat)]),
        "pcap_breakloop": (None, [p]),
        "pcap_setnonblock": (c_int, [p, c_int, c_char_p]),
        "pcap_get_selectable_fd": (c_int, [p]),
        "pcap_close": (None, [p]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fdopen.restype, _libc.fdopen.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_char_p]


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def compile_filter(handle: int, expr: str) -> BpfProgram:
    """Compile `expr` for `handle`'s link type; raises ValueError(libpcap's message)."""
    prog = BpfProgram()
    if lib().pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
        raise ValueError(lib().pcap_geterr(handle).decode(errors="replace"))
    return prog


class Handle:
    """One live capture on one interface, dumping to one file."""

    def __init__(self, ifname: str, snap_length: int, buffer_size: int, timeout_ms: int = 100):
        L = lib()
        errbuf = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
        self.ifname = ifname
        self.dumper = None
        self.handle = L.pcap_create(ifname.encode(), errbuf)
        if not self.handle:
            raise FoveaError(f"cannot capture on {ifname}: {errbuf.value.decode(errors='replace')}")
        L.pcap_set_snaplen(self.handle, snap_length)
        L.pcap_set_promisc(self.handle, 0)
        L.pcap_set_timeout(self.handle, timeout_ms)
        L.pcap_set_buffer_size(self.handle, buffer_size)
        L.pcap_set_tstamp_precision(self.handle, PCAP_TSTAMP_PRECISION_NANO)
        status = L.pcap_activate(self.handle)
        if status < 0:
            detail = L.pcap_geterr(self.handle).decode(errors="replace") or L.pcap_statustostr(status).decode()
            self.close()
            raise FoveaError(f"cannot capture on {ifname}: {detail}",
                             "check that the interface exists and the agent has CAP_NET_RAW")
        # Non-blocking, and the thread polls the fd itself: with TPACKET_V3 a blocking read
        # waits for a packet however long that takes, and could not notice a deadline.
        L.pcap_setnonblock(self.handle, 1, errbuf)
        self.fd = L.pcap_get_selectable_fd(self.handle)
        self.linktype = L.pcap_datalink(self.handle)
        self.snap_length = L.pcap_snapshot(self.handle)

    def set_filter(self, expr: str) -> None:
        prog = compile_filter(self.handle, expr)
        try:
            if lib().pcap_setfilter(self.handle, ctypes.byref(prog)) != 0:
                raise ValueError(lib().pcap_geterr(self.handle).decode(errors="replace"))
        finally:
            lib().pcap_freecode(ctypes.byref(prog))

    def dump_to(self, path: str) -> None:
        """Dump into a new file (never an existing one, never through a symlink; mode 0600:
        a capture holds other people's traffic)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fp = _libc.fdopen(fd, b"wb")
        if not fp:
            os.close(fd)
            raise OSError(ctypes.get_errno(), f"fdopen {path}")
        self.dumper = lib().pcap_dump_fopen(self.handle, fp)
        if not self.dumper:
            raise FoveaError(f"cannot write {path}: {lib().pcap_geterr(self.handle).decode(errors='replace')}")

    def dispatch(self, count: int) -> int:
        """Up to `count` packets (-1: what the ring holds) from the kernel to the file; returns
        how many (0: none waiting), PCAP_ERROR_BREAK after breakloop, < 0 on error."""
        L = lib()
        return L.pcap_dispatch(self.handle, count, ctypes.cast(L.pcap_dump, ctypes.c_void_p), self.dumper)

    def error(self) -> str:
        return lib().pcap_geterr(self.handle).decode(errors="replace")

    def file_position(self) -> int:
        return lib().pcap_dump_ftell64(self.dumper)

    def dropped(self) -> int:
        """Packets the kernel dropped because the ring was full (PACKET_STATISTICS)."""
        stat = PcapStat()
        if lib().pcap_stats(self.handle, ctypes.byref(stat)) != 0:
            return 0
        return stat.ps_drop

    def breakloop(self) -> None:
        lib().pcap_breakloop(self.handle)

    def close_dump(self) -> None:
        if self.dumper:
            lib().pcap_dump_flush(self.dumper)
            lib().pcap_dump_close(self.dumper)
            self.dumper = None

    def close(self) -> None:
        self.close_dump()
        if self.handle:
            lib().pcap_close(self.handle)
            self.handle = None
