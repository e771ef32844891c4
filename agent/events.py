"""Typed records that leave the kernel one by one, and the hub that hands them on.

Plugins publish records (a finished DNS transaction or HTTP request, a flow report, a drop);
consumers (the OTLP exporter, the `fovea observe` stream) subscribe with a
bounded queue each. Publishing never blocks: a full queue drops the record and
counts it for that subscriber, so a slow consumer costs data, never the readers.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

OBSERVERS = ("source", "destination")  # a record's `observer`: which end of it this node saw


def wall_clock(monotonic_ns: int) -> float:
    """Wall-clock seconds of a bpf_ktime_get_ns() (CLOCK_MONOTONIC) timestamp."""
    return time.time() - (time.monotonic_ns() - monotonic_ns) / 1e9


@dataclass(frozen=True)
class DnsTransaction:
    """One DNS query and its response (or the lack of one), seen once per node."""

    start: float  # wall-clock seconds of the query
    duration: float | None  # query -> response; None when unanswered within the timeout
    client: str
    client_port: int
    server: str
    server_port: int
    transport: str  # "udp" | "tcp"
    id: int
    qtype: str  # closed set (A, AAAA, ...) or OTHER
    rcode: str | None  # closed set (NOERROR, NXDOMAIN, ...) or OTHER; None when unanswered
    observer: str  # "source" | "destination": which end this node saw
    ifindex: int = 0
    name: str | None = None  # decoded in user space, when the message was sampled and parsed
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HttpRequest:
    """One sampled HTTP/1.x request and its response (or the lack of one), seen once per node."""

    start: float  # wall-clock seconds of the request's first byte
    duration: float | None  # to the response's first byte; None without a status code
    client: str
    client_port: int
    server: str
    server_port: int
    method: str  # GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS or OTHER
    status_code: int | None  # 100..599; None: no response (the connection ended, http.timeout,
    #                          pipelined, or a status line that could not be parsed)
    observer: str  # "source" | "destination": which end this node saw
    ifindex: int = 0
    path: str | None = None  # url.path, cut at http.urlPathMaxLength; None unless http.urlPath


@dataclass(frozen=True)
class FlowRecord:
    """One report of a flow: a TCP connection or a UDP/ICMP/other exchange,
    both directions together, seen once per node (DESIGN.md counting rules).

    A flow that lasts longer than the report interval is reported once per
    interval (`window` 0, 1, 2...); each record holds what that window added.
    """

    flow_id: int  # the same for every window of one flow (spans link on it)
    window: int
    start: float  # wall-clock seconds: first packet of this window
    end: float  # last packet of this window
    transport: str  # tcp | udp | icmp | other
    family: int  # 4 | 6
    source: str  # the end that opened the flow (sent the SYN, or the first packet)
    source_port: int
    destination: str
    destination_port: int
    packets: int  # source -> destination, this window
    bytes: int  # IP bytes (DESIGN.md), source -> destination
    reply_packets: int  # destination -> source
    reply_bytes: int
    tcp_flags: int  # TCP flags seen in this flow so far, both directions OR'ed
    observer: str  # "source" | "destination": which end this node saw
    final: bool  # the flow ended with this report
    end_reason: str  # fin | rst | idle | reused (a new attempt from its port) | interval (still running)
    ifindex: int = 0
    # A TCP connection attempt's outcome: established | refused | timeout (agent/flows.py
    # connection_outcome); "" while undecided, or not a TCP flow whose opening SYN was seen.
    connection: str = ""


@dataclass(frozen=True)
class DropEvent:
    """One packet the kernel dropped, with the kernel's own reason (sampled:
    the drops plugin publishes at most a configured rate; all are counted)."""

    time: float  # wall-clock seconds
    reason: str  # the kernel's name, e.g. NETFILTER_DROP
    transport: str
    family: int
    source: str
    source_port: int
    destination: str
    destination_port: int
    packets: int
    bytes: int


@dataclass(frozen=True)
class CaptureReport:
    """This node's part of one Capture or ClusterCapture, once it has ended."""

    kind: str  # Capture | ClusterCapture
    namespace: str  # "" for a ClusterCapture
    name: str
    uid: str
    start: float  # wall-clock seconds the node's part began
    end: float
    phase: str  # Succeeded | Failed (this node's phase)
    packets: int = 0
    bytes: int = 0
    dropped_packets: int = 0
    filter: str = ""
    location: str = ""  # the artifact, when there is one
    message: str = ""


class Subscription:
    def __init__(self, name: str, maxsize: int):
        self.name = name
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.dropped = 0

    def get(self, timeout: float | None = None):
        """The next record, or None after `timeout` seconds."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass
class EventHub:
    subscriptions: list[Subscription] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self, name: str, maxsize: int = 10_000) -> Subscription:
        sub = Subscription(name, maxsize)
        with self.lock:
            self.subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            self.subscriptions.remove(sub)

    def publish(self, record) -> None:
        with self.lock:
            subs = list(self.subscriptions)
        for sub in subs:
            try:
                sub.queue.put_nowait(record)
            except queue.Full:
                sub.dropped += 1

    def dropped(self) -> dict[str, int]:
        """Records each subscriber lost to a full queue (fovea_agent_lost_events_total)."""
        with self.lock:
            return {sub.name: sub.dropped for sub in self.subscriptions}
