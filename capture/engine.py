"""The capture engine: capture on interfaces until a limit, then write one pcapng file.

Per interface, one libpcap handle and one thread that hands ring blocks straight
to libpcap's `pcap_dump` (see capture/libpcap.py): no Python per packet while
capturing. Between blocks the thread checks the limits. When every thread has
stopped, the per-interface files are merged in time order into one pcapng file
(capture/pcapng.py), which is where the limits are made exact.

A file appears under its final name only complete: everything is written under
`*.partial` names, fsync'd, then renamed. A killed process leaves only
`*.partial` files, which `clean_partials` removes.
"""

from __future__ import annotations

import logging
import os
import platform
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import FoveaError
from capture import libpcap, pcapng

log = logging.getLogger(__name__)

PARTIAL = ".partial"
RING_BUFFER_BYTES = 8 << 20  # per interface: absorbs bursts while the file catches up
RING_BUDGET_BYTES = 64 << 20  # default for all interfaces of one capture (captures.ringMemory): locked memory
MIN_RING_BYTES = 1 << 20
MAX_FILTER_LENGTH = 4096
BLOCK_TIMEOUT_MS = 100  # the kernel hands over a partly filled ring block after this
DRAIN_SECONDS = 2.5 * BLOCK_TIMEOUT_MS / 1000
POLL_MS = 50  # how long a thread waits for packets before it looks at the clock again


@dataclass(frozen=True)
class Interface:
    """One interface to capture on."""

    name: str  # e.g. the host-side veth of a pod, or a host interface
    comment: str = ""  # e.g. "pod shop/web-1": goes into the pcapng interface block


@dataclass(frozen=True)
class Limits:
    duration: float  # seconds
    max_bytes: int | None = None  # size of the capture file (per node)
    max_packets: int | None = None
    snap_length: int = 262144


class FilterError(FoveaError):
    """A capture filter libpcap refuses; the message carries libpcap's complaint."""


@dataclass(frozen=True)
class CaptureResult:
    path: Path
    packets: int  # packets in the file
    bytes: int  # on-the-wire bytes of those packets
    dropped_packets: int  # dropped by the kernel (ring full) during the capture
    stop_reason: str  # "duration" | "maxBytes" | "maxPackets" | "stopped" | "error"
    size: int  # file size
    sha256: str
    message: str = ""


def _filter_error(expr: str, complaint: str) -> FilterError:
    return FilterError(f"capture filter {expr!r} is not valid: {complaint}",
                       "write it in pcap-filter syntax (man 7 pcap-filter), e.g. 'tcp port 443'")


def check_filter(expr: str, linktype: int = libpcap.DLT_EN10MB) -> None:
    """Compile `expr` with libpcap (never parsed here); raises FilterError."""
    if len(expr) > MAX_FILTER_LENGTH or "\0" in expr:
        raise _filter_error(expr[:80], f"longer than {MAX_FILTER_LENGTH} characters or holds a NUL")
    L = libpcap.lib()
    dead = L.pcap_open_dead(linktype, 262144)
    try:
        prog = libpcap.compile_filter(dead, expr)
        L.pcap_freecode(prog)
    except ValueError as e:
        raise _filter_error(expr, str(e)) from None
    finally:
        L.pcap_close(dead)


def clean_partials(directory: Path) -> list[Path]:
    """Remove the unfinished files a killed capture left in `directory`; returns them."""
    removed = []
    for path in Path(directory).glob("*" + PARTIAL):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaptureRun:
    """One capture on this node: start(), then wait() (or stop() early)."""

    def __init__(self, interfaces: list[Interface], filter_expr: str | None, limits: Limits, path: Path,
                 ring_budget: int = RING_BUDGET_BYTES):
        if not interfaces:
            raise FoveaError("nothing to capture on", "the capture matched no interface on this node")
        if limits.duration <= 0:
            raise FoveaError(f"capture duration must be positive, not {limits.duration}")
        for name, value in (("maxBytes", limits.max_bytes), ("maxPackets", limits.max_packets),
                            ("snapLength", limits.snap_length)):
            if value is not None and value <= 0:
                raise FoveaError(f"capture {name} must be positive, not {value}")
        self.interfaces = list(interfaces)
        self.filter_expr = filter_expr or ""
        self.limits = limits
        self.path = Path(path)
        self.ring_budget = ring_budget
        self._handles: list[libpcap.Handle] = []
        self._raw = [self.path.with_name(f"{self.path.name}.if{i}{PARTIAL}") for i in range(len(interfaces))]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._reason = ""
        self._ended_ns = 0
        self._message = ""
        self._errors: list[str] = []
        self._packets = [0] * len(interfaces)
        self._positions = [24] * len(interfaces)
        self._result: CaptureResult | None = None
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------

    def start(self) -> None:
        """Open every interface and compile the filter (FilterError / FoveaError at once,
        nothing left behind), then capture in the background."""
        if self.filter_expr:
            check_filter(self.filter_expr)
        ring = min(RING_BUFFER_BYTES, max(MIN_RING_BYTES, self.ring_budget // len(self.interfaces)))
        try:
            for iface in self.interfaces:
                handle = libpcap.Handle(iface.name, self.limits.snap_length, ring, BLOCK_TIMEOUT_MS)
                self._handles.append(handle)
                if self.filter_expr:
                    try:
                        handle.set_filter(self.filter_expr)
                    except ValueError as e:  # valid for Ethernet, not for this link type
                        raise _filter_error(self.filter_expr, f"{e} (on {iface.name})") from None
            for handle, raw in zip(self._handles, self._raw):
                try:
                    handle.dump_to(str(raw))
                except OSError as e:
                    raise FoveaError(f"cannot write {raw}: {e.strerror}",
                                     "check the capture directory (exists, writable, no leftovers)") from None
        except BaseException:
            self._close_handles()
            self._remove_raw()
            raise
        info = [pcapng.InterfaceInfo(i.name, i.comment, h.linktype, h.snap_length, self.filter_expr)
                for i, h in zip(self.interfaces, self._handles)]
        self._header = pcapng.header(info, "fovea", f"Linux {platform.release()}")
        if self.limits.max_bytes is not None and self.limits.max_bytes < len(self._header):
            self._close_handles()
            self._remove_raw()
            raise FoveaError(f"capture maxBytes {self.limits.max_bytes} is smaller than the file's "
                             f"header ({len(self._header)} bytes)", "allow at least a few KiB")
        self._started_ns = time.time_ns()
        self._deadline = time.monotonic() + self.limits.duration
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.path.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop early (resource deleted, agent shutting down); the file is still written."""
        self._end("stopped")

    def wait(self, timeout: float | None = None) -> CaptureResult | None:
        """The result once the file is complete; None if still running after `timeout`."""
        self._done.wait(timeout)
        return self._result

    # -- capture ------------------------------------------------------------------

    def _end(self, reason: str, message: str = "") -> None:
        with self._lock:
            if not self._reason:
                self._reason, self._message = reason, message
                self._ended_ns = time.time_ns()
            self._stopping.set()
            for handle in self._handles:
                if handle.handle:
                    handle.breakloop()

    def _interface_failed(self, message: str) -> None:
        """One interface gone (its pod was deleted): the others go on; all gone ends the run."""
        with self._lock:
            self._errors.append(message)
            everything_failed = len(self._errors) == len(self._handles)
        if everything_failed:
            self._end("error", "; ".join(self._errors))

    def _pump(self, i: int) -> None:
        handle, limits = self._handles[i], self.limits
        poller = select.poll()
        poller.register(handle.fd, select.POLLIN)
        while not self._stopping.is_set():
            if time.monotonic() >= self._deadline:
                self._end("duration")
                break
            count = -1
            if limits.max_packets is not None:
                count = max(1, limits.max_packets - sum(self._packets))
            n = handle.dispatch(count)
            if n == libpcap.PCAP_ERROR_BREAK:
                break
            if n < 0:
                self._interface_failed(f"capture on {handle.ifname} ended: {handle.error()}")
                return
            if n == 0:
                poller.poll(POLL_MS)
                continue
            with self._lock:
                self._packets[i] += n
                self._positions[i] = handle.file_position()
                packets = sum(self._packets)
                # Lower bound of the pcapng size: the merge trims to the exact limit.
                size = len(self._header) + sum(self._positions) - 24 * len(self._positions) \
                    + (pcapng.EPB_FIXED - 16) * packets
            if limits.max_packets is not None and packets >= limits.max_packets:
                self._end("maxPackets")
            elif limits.max_bytes is not None and size >= limits.max_bytes:
                self._end("maxBytes")
        if self._reason in ("duration", "stopped"):
            self._drain(handle, poller)

    @staticmethod
    def _drain(handle: libpcap.Handle, poller: select.poll) -> None:
        """Take what the ring still holds: packets of the capture window may sit in a ring
        block the kernel hands over only after the block timeout. The merge drops those
        stamped after the window."""
        until = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < until:
            n = handle.dispatch(-1)
            if n == 0:
                poller.poll(POLL_MS)
            elif n < 0 and n != libpcap.PCAP_ERROR_BREAK:
                return

    def _run(self) -> None:
        try:
            pumps = [threading.Thread(target=self._pump, args=(i,), name=f"capture-{h.ifname}", daemon=True)
                     for i, h in enumerate(self._handles)]
            for t in pumps:
                t.start()
            for t in pumps:
                t.join()
            dropped = sum(h.dropped() for h in self._handles)
            self._close_handles()
            self._result = self._finish(dropped)
        except Exception as e:  # never leave a waiter hanging
            log.exception("capture %s failed", self.path.name)
            self._close_handles()
            self._result = CaptureResult(self.path, 0, 0, 0, "error", 0, "", f"capture failed: {e}")
        finally:
            self._remove_raw()
            self._done.set()

    def _finish(self, dropped: int) -> CaptureResult:
        partial = self.path.with_name(self.path.name + PARTIAL)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                merged = pcapng.merge(
                    out, self._header, self._raw,
                    max_packets=self.limits.max_packets, max_bytes=self.limits.max_bytes,
                    not_after_ns=min(self._started_ns + int(self.limits.duration * 1e9),
                                     self._ended_ns or time.time_ns()),
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        reason = merged.limit or self._reason or "duration"
        message = self._message if reason == "error" else "; ".join(self._errors)
        if dropped:
            message = (message + "; " if message else "") + f"the kernel dropped {dropped} packets"
        return CaptureResult(self.path, merged.packets, merged.bytes, dropped, reason,
                             merged.size, merged.sha256, message)

    def _close_handles(self) -> None:
        with self._lock:
            for handle in self._handles:
                handle.close()

    def _remove_raw(self) -> None:
        for raw in self._raw:
            raw.unlink(missing_ok=True)
