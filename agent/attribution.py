"""Attribution: the one place that holds the counting rules (DESIGN.md).

Probes hand over records keyed by addresses or interfaces; this stage says
whose they are. Pod metrics, the traffic map, drops, TCP and DNS series,
flow records, spans and the flow stream all ask it, and no plugin keeps a
rule of its own. The rules:

- a local pod: an address the pod source (the Kubernetes cache, or a static
  file standalone) names as a pod of this node of the pod network;
- a hostNetwork pod's traffic is the node's: its IP names the node;
- a Service ClusterIP (seen before DNAT) names the Service; the API server's
  Service (default/kubernetes) is `apiserver`; anything else is `external`;
- the traffic map counts once per cluster: at the sender's node when a pod
  of the cluster sent the packet, at the receiver's node only when not. A
  reply whose source is a ClusterIP (reverse NAT) was sent by the Service's
  backend pod, so it is counted where that pod's node counts it, never again
  at the receiver under the Service's name. The API server is the exception:
  its backends are not pods, so its replies count at the receiver. A TCP
  connection attempt (the service map) counts by the same rule, applied to
  its SYN;
- the pending window: a pod's address that the pod source does not name yet
  (a new pod's first packets), one that a pod interface of this node holds or
  that lies in a node's pod CIDR (spec.podCIDRs), is held for
  `podLevel.pendingWindow` seconds and credited to the pod when it appears;
  what is still unknown then, or does not fit the bounded store, is counted
  in fovea_agent_unattributed_total{signal} in the signal's own unit.

Translated flows (reverse NAT, MASQUERADE/SNAT) are kept as one flow by the
tc programs and the flow tracker (bpf/flows.inc, agent/flows.py), which ask
`service()` here to pair a Service connection's two halves.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

EXTERNAL = "external"
APISERVER = "apiserver"
MAX_PENDING = 65536  # keys (counters) or records held per signal while their pod is unknown


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()  # the answer for an address the pod source does not know yet: ask again later


@dataclass(frozen=True)
class Peer:
    namespace: str
    workload: str
    pod_sender: bool  # traffic from this address was sent by a pod of the cluster (a pod IP, a ClusterIP)
    pod: str = ""  # the pod's name, when the address is a pod's


@dataclass(frozen=True)
class Endpoint:
    """One end of a flow or DNS transaction as spans and the flow stream name it."""

    address: str
    namespace: str = ""
    pod: str = ""
    workload_kind: str = ""
    workload: str = EXTERNAL
    local: bool = False  # a pod of this node


class Attribution:
    def __init__(self, source, node_name: str, all_pods: bool = False, pending_window: float = 30.0,
                 max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.node_name = node_name
        self.all_pods = all_pods
        self.pending_window = pending_window
        self.max_pending = max_pending
        self.clock = clock
        self.pod_interfaces: dict[int, tuple[str, ...]] = {}  # ifindex -> addresses (the datapath inventory)
        self.pod_addresses: frozenset[str] = frozenset()
        self.unattributed: dict[str, int] = defaultdict(int)  # signal -> units never credited to a pod
        self._lock = threading.Lock()  # unattributed is counted from the read loop and record threads

    # -- the datapath inventory ----------------------------------------------------

    def set_pod_interfaces(self, interfaces: dict[int, tuple[str, ...]]) -> None:
        """The host-side pod interfaces of this node and their pods' addresses."""
        self.pod_interfaces = dict(interfaces)
        self.pod_addresses = frozenset(ip for ips in interfaces.values() for ip in ips)

    # -- names -------------------------------------------------------------------

    def local_pod(self, ip: str):
        """The pod of this node that holds `ip`, or None."""
        pod = self.source.pod_by_ip(ip) if ip else None
        if pod is None or pod.host_network or (pod.node and pod.node != self.node_name):
            return None
        return pod

    def unknown(self, ip: str) -> bool:
        """A pod's address the pod source does not name (yet): one of this node's pod
        interfaces holds it, or it lies in a node's pod CIDR."""
        return self.source.pod_by_ip(ip) is None and (ip in self.pod_addresses or self.source.in_pod_network(ip))

    def owner(self, ip: str):
        """The local pod of `ip`; None if it is no local pod's; WAIT if it may become one."""
        pod = self.local_pod(ip)
        if pod is None and self.unknown(ip):
            return WAIT
        return pod

    def interface_owner(self, ifindex: int):
        """The local pod behind a pod interface; WAIT while none of its addresses names a pod."""
        ips = self.pod_interfaces.get(ifindex, ())
        for ip in ips:
            pod = self.local_pod(ip)
            if pod is not None:
                return pod
        if any(self.source.pod_by_ip(ip) is not None for ip in ips):
            return None  # named, but not a pod of this node's network
        return WAIT

    def observed(self, pod) -> bool:
        return self.all_pods or self.source.pod_observed(pod)

    @staticmethod
    def pod_labels(pod) -> tuple[str, str, str, str]:
        return (pod.namespace, pod.name, pod.workload_kind, pod.workload_name)

    def labels(self, pod):
        """The pod series labels of an owner() answer: None when not an observed local pod."""
        if pod is WAIT:
            return WAIT
        return self.pod_labels(pod) if pod is not None and self.observed(pod) else None

    def local_pod_labels(self) -> set[tuple[str, str, str, str]]:
        """pod_labels() of every pod on this node now: their series are alive."""
        return {self.pod_labels(p) for p in self.source.local_pods()}

    def service(self, ip: str):
        return self.source.service_by_ip(ip)

    def peer(self, ip: str) -> Peer:
        pod = self.source.pod_by_ip(ip)
        if pod is not None and not pod.host_network:
            return Peer(pod.namespace, pod.workload_name, True, pod.name)
        svc = self.source.service_by_ip(ip)
        if svc is not None:
            if (svc.namespace, svc.name) == ("default", "kubernetes"):
                return Peer("", APISERVER, False)  # its backends are the API servers, not pods
            return Peer(svc.namespace, svc.name, True)  # from it: a backend pod's reply, reverse-NATed
        node = self.source.node_by_ip(ip)
        if node is not None:
            return Peer("", node.name, False)
        if pod is not None:  # a hostNetwork pod whose node we do not know
            return Peer("", pod.node or self.node_name, False)
        return Peer("", EXTERNAL, False)

    def endpoint(self, ip: str) -> Endpoint:
        pod = self.local_pod(ip)
        if pod is not None:
            return Endpoint(ip, pod.namespace, pod.name, pod.workload_kind, pod.workload_name, True)
        other = self.source.pod_by_ip(ip)
        peer = self.peer(ip)
        kind = other.workload_kind if peer.pod else ""
        return Endpoint(ip, peer.namespace, peer.pod, kind, peer.workload)

    # -- counting rules ------------------------------------------------------------

    def drop_owner(self, src: str, dst: str):
        """A drop belongs to the local pod that sent it, else the local pod it was for:
        (pod, "egress"|"ingress"), None, or WAIT."""
        sender = self.owner(src)
        if sender is WAIT:
            return WAIT
        if sender is not None:
            return sender, "egress"
        receiver = self.owner(dst)
        if receiver is None or receiver is WAIT:
            return receiver
        return receiver, "ingress"

    def workload_pair(self, src: str, dst: str, to_pod: bool):
        """The traffic map's (sender, receiver) for a packet seen at a pod interface
        (to_pod: sent to the pod), None when another node counts it, or WAIT."""
        local = self.owner(dst if to_pod else src)
        if local is WAIT or self.unknown(src if to_pod else dst):
            return WAIT  # the other end may be a local pod not known yet, too
        if local is None:
            return None  # not a pod of this node: its own node counts it
        sender = self.peer(src)
        if to_pod and sender.pod_sender:
            return None  # counted at the sender's node
        return sender, self.peer(dst)

    def record_waits(self, *addresses: str) -> bool:
        """A flow record or DNS transaction names an end not known yet: hold it."""
        return any(self.unknown(a) for a in addresses)

    # -- the pending window -------------------------------------------------------------

    def pending(self, signal: str) -> "PendingCounts":
        with self._lock:
            self.unattributed.setdefault(signal, 0)  # exported from the start: rates need a first 0
        return PendingCounts(self, signal)

    def holding(self, signal: str, publish: Callable[[object], None],
                addresses: Callable[[object], tuple[str, ...]]) -> "HeldRecords":
        with self._lock:
            self.unattributed.setdefault(signal, 0)
        return HeldRecords(self, signal, publish, addresses)

    def count_unattributed(self, signal: str, n: int) -> None:
        if n:
            with self._lock:
                self.unattributed[signal] += n

    def unattributed_counts(self) -> dict[str, int]:
        """fovea_agent_unattributed_total{signal}: a copy, safe from any thread."""
        with self._lock:
            return dict(self.unattributed)


class PendingCounts:
    """Counter increments waiting for their pod, at most `pending_window` seconds.

    drain(handle): handle(key, packets, bytes) returns False (or WAIT) to keep an
    increment for later; one kept past the window is counted unattributed (its
    first value: packets, events, messages) and let go."""

    def __init__(self, attribution: Attribution, signal: str):
        self.attribution = attribution
        self.signal = signal
        self._items: dict[Hashable, list] = {}  # key -> [first value, second value, held since]

    def add(self, increments: dict[Hashable, tuple[int, int]]) -> None:
        now = self.attribution.clock()
        for key, (p, b) in increments.items():
            v = self._items.get(key)
            if v is None:
                if len(self._items) >= self.attribution.max_pending:
                    self.attribution.count_unattributed(self.signal, p)  # bounded: no room to wait
                    continue
                v = self._items[key] = [0, 0, now]
            v[0] += p
            v[1] += b

    def drain(self, handle: Callable[[Hashable, int, int], bool]) -> None:
        deadline = self.attribution.clock() - self.attribution.pending_window
        for key in list(self._items):
            p, b, since = self._items[key]
            done = handle(key, p, b)
            if done is True:
                del self._items[key]
            elif since <= deadline:
                self.attribution.count_unattributed(self.signal, p)
                del self._items[key]

    def save(self) -> list:
        """What still waits, for the next agent (lifecycle.keepAttached); keys are tuples."""
        return [[list(key), p, b, since] for key, (p, b, since) in self._items.items()]

    def restore(self, saved: list) -> None:
        for key, p, b, since in saved:  # `since` is CLOCK_MONOTONIC: the same in the next agent
            self._items[tuple(key)] = [p, b, since]

    def give_up(self, predicate: Callable[[Hashable], bool]) -> None:
        """Keys that can never resolve (their interface is gone): unattributed now."""
        for key in [k for k in self._items if predicate(k)]:
            self.attribution.count_unattributed(self.signal, self._items.pop(key)[0])

    def __len__(self) -> int:
        return len(self._items)


class HeldRecords:
    """Records (flows, DNS transactions) that name an address not known yet wait
    here, at most `pending_window` seconds, so that spans and the flow stream name
    the pod; then they go on, named or not (counted unattributed)."""

    def __init__(self, attribution: Attribution, signal: str, publish: Callable[[object], None],
                 addresses: Callable[[object], tuple[str, ...]]):
        self.attribution = attribution
        self.signal = signal
        self._publish = publish
        self._addresses = addresses
        self._held: list[tuple[float, object]] = []
        self._lock = threading.Lock()  # records come from reader and poll threads

    def publish(self, record) -> None:
        a = self.attribution
        if not a.record_waits(*self._addresses(record)):
            self._publish(record)
            return
        with self._lock:
            if a.pending_window > 0 and len(self._held) < a.max_pending:
                self._held.append((a.clock(), record))
                return
        a.count_unattributed(self.signal, 1)  # no waiting, or no room: on, without the pod's name
        self._publish(record)

    def release(self) -> None:
        """Publish what is known now or waited long enough; call once per read."""
        a = self.attribution
        deadline = a.clock() - a.pending_window
        with self._lock:
            held, self._held = self._held, []
            keep = []
            out = []
            for since, record in held:
                if not a.record_waits(*self._addresses(record)):
                    out.append(record)
                elif since <= deadline:
                    a.count_unattributed(self.signal, 1)
                    out.append(record)
                else:
                    keep.append((since, record))
            self._held = keep
        for record in out:
            self._publish(record)

    def flush(self) -> None:
        """The agent stops: what waits goes on now."""
        with self._lock:
            held, self._held = self._held, []
        for _, record in held:
            self.attribution.count_unattributed(self.signal, 1)
            self._publish(record)

    def __len__(self) -> int:
        return len(self._held)


def flow_addresses(record) -> tuple[str, ...]:
    return (record.source, record.destination)


def client_server_addresses(record) -> tuple[str, ...]:
    """A DNS transaction's or an HTTP request's ends."""
    return (record.client, record.server)
