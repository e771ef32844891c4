"""The agent's Kubernetes cache: list+watch of the API server into slim records.

One list+watch loop per kind (agent/k8s/listwatch.py: paged raw-JSON lists into
slim records, watches resumed from the last resourceVersion, 410 -> relist with
removals reported for objects that vanished in the gap, backoff with jitter);
an API outage never stops the agent: lookups answer from the last state.

Kinds: the pods of this node (fieldSelector spec.nodeName) and namespaces (for
the fovea.dev/observe annotation). With `cluster_wide`, one watch of all pods
(this node's among them) replaces the node's, and Services and Nodes are
added, to name the other end of a flow.

Sized for 150,000 pods on every node (about 560 bytes a pod, docs/performance.md):
pods are keyed by uid, an IP claimed once is one dict entry, and records share
their repeated strings (agent/k8s/records.py).

pod_by_ip: a hostNetwork pod claims its node's IP only when no pod of the pod
network does; when two pods claim an IP (the old one terminating), a live pod
wins over a terminating one, then Running over Pending over finished, then the
newest; removing one claim leaves the others.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from kubernetes import client as k8s_client

from agent.addresses import canonical_ip
from agent.errors import FoveaError
from agent.k8s.listwatch import ListWatch, QuietLog, ReflectorStatus, Timing
from agent.k8s.records import (
    NamespaceRecord,
    NodeRecord,
    PodRecord,
    ServiceRecord,
    namespace_record,
    node_record,
    pod_record,
    service_record,
)

log = logging.getLogger(__name__)

# on_change(kind, old, new): kind is "pods", "namespaces", "services" or "nodes";
# old is None for an addition, new is None for a removal. It is called from the
# cache's threads, after the store has changed: keep it quick.
ChangeCallback = Callable[[str, object, object], None]


def make_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """A client for the API server: the kubeconfig given, else $KUBECONFIG, else the
    in-cluster service account, else ~/.kube/config."""
    from kubernetes import config as k8s_config

    cfg = k8s_client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if path:
            files = [p for p in path.split(os.pathsep) if p]
            missing = [p for p in files if not Path(p).expanduser().is_file()]
            if missing == files:
                where = "--kubeconfig" if kubeconfig else "$KUBECONFIG"
                raise FoveaError(f"kubeconfig {path} does not exist", f"check {where}, or run with --standalone")
            k8s_config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)
        elif Path("~/.kube/config").expanduser().is_file():
            path = str(Path("~/.kube/config").expanduser())
            k8s_config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        else:
            raise FoveaError(
                "no Kubernetes API to talk to: not running in a pod (KUBERNETES_SERVICE_HOST is unset), "
                "no --kubeconfig, no $KUBECONFIG, no ~/.kube/config",
                "pass --kubeconfig FILE, or run with --standalone",
            )
    except k8s_config.ConfigException as e:
        source = f"kubeconfig {path}" if path else "the in-cluster service account"
        raise FoveaError(f"cannot use {source}: {e}", "check the file, or run with --standalone") from None
    # The cache retries with its own backoff; urllib3's retries would only add a warning per attempt.
    cfg.retries = 0
    from agent import __version__

    api = k8s_client.ApiClient(cfg)
    api.user_agent = f"fovea-agent/{__version__}"  # names the agent in the API server's audit log
    return api


class _IpIndex:
    """IP -> the record that owns it. Several records may claim one IP at once (a
    terminating pod and its successor): each keeps its claim, the best one answers,
    and removing one claim leaves the others.

    Almost every IP has one claim, and `best` alone holds it: only an IP claimed
    twice gets a dict of its claims (in `_contested`), until one claim is left."""

    def __init__(self, key: Callable[[object], object], rank: Callable[[object], tuple]):
        self._key, self._rank = key, rank
        self.best: dict[str, object] = {}  # read without the lock: one dict lookup
        self._contested: dict[str, dict[object, object]] = {}

    def set(self, key, old_ips: tuple[str, ...], record, new_ips: tuple[str, ...]) -> None:
        for ip in old_ips:
            if ip not in new_ips:
                self._drop(key, ip)
        for ip in new_ips:
            claims = self._contested.get(ip)
            if claims is None:
                held = self.best.get(ip)
                if held is None or self._key(held) == key:
                    self.best[ip] = record
                    continue
                claims = self._contested[ip] = {self._key(held): held}
            claims[key] = record
            self.best[ip] = max(claims.values(), key=self._rank)

    def remove(self, key, ips: tuple[str, ...]) -> None:
        for ip in ips:
            self._drop(key, ip)

    def _drop(self, key, ip: str) -> None:
        claims = self._contested.get(ip)
        if claims is None:
            held = self.best.get(ip)
            if held is not None and self._key(held) == key:
                del self.best[ip]
            return
        if claims.pop(key, None) is None:
            return
        self.best[ip] = max(claims.values(), key=self._rank)
        if len(claims) == 1:
            del self._contested[ip]

    def contested(self) -> int:
        """IPs claimed by more than one record."""
        return len(self._contested)


def _pod_key(pod: PodRecord) -> object:
    """Pods are keyed by uid: the record already holds it (a (namespace, name) key would be a
    56-byte tuple a pod), and a pod recreated under the same name is another pod."""
    return pod.uid or (pod.namespace, pod.name)


class _Networks:
    """The nodes' pod CIDRs: is an address inside one? One set lookup per prefix length."""

    def __init__(self):
        self._by_length: dict[tuple[int, int], set[int]] = {}  # replaced whole: readers take no lock

    def rebuild(self, cidrs) -> None:
        by_length: dict[tuple[int, int], set[int]] = {}
        for cidr in cidrs:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError:  # a node object is untrusted input too
                continue
            by_length.setdefault((net.version, net.prefixlen), set()).add(int(net.network_address))
        self._by_length = by_length

    def contains(self, ip: str) -> bool:
        if not self._by_length:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        bits, value = addr.max_prefixlen, int(addr)
        return any(version == addr.version and (value >> (bits - length)) << (bits - length) in nets
                   for (version, length), nets in self._by_length.items())


def _pod_rank(pod: PodRecord) -> tuple:
    # A hostNetwork pod shares its node's IP: any pod of the pod network is a better answer.
    return (not pod.host_network,) + pod.claim_rank()


class KubeCache:
    """Lookups on pods, namespaces, Services and Nodes, kept in step by list+watch.

    `api_client` should have `configuration.retries = 0` (make_api_client does it):
    failures are retried here, with backoff.
    """

    def __init__(self, api_client: k8s_client.ApiClient, node_name: str, cluster_wide: bool = False,
                 on_change: ChangeCallback | None = None, *,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, watch_timeout: float = 300.0,
                 page_size: int = 500, warn_interval: float = 60.0, connect_timeout: float = 10.0,
                 list_timeout: float = 60.0, read_slack: float = 30.0):
        self.node_name = node_name
        self.cluster_wide = cluster_wide
        self.on_change = on_change
        self.timing = Timing(backoff_initial, backoff_max, watch_timeout, page_size, connect_timeout,
                             list_timeout, read_slack, warn_interval)
        self._lock = threading.Lock()  # writers; readers do single dict lookups
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._warnings = QuietLog(warn_interval, log)
        self._pods: dict[object, PodRecord] = {}  # by _pod_key
        self._local: dict[object, PodRecord] = {}
        self._namespaces: dict[str, NamespaceRecord] = {}
        self._services: dict[tuple[str, str], ServiceRecord] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._pod_ips = _IpIndex(_pod_key, _pod_rank)
        self._service_ips = _IpIndex(lambda s: (s.namespace, s.name), lambda s: (s.namespace, s.name))
        self._node_ips = _IpIndex(lambda n: n.name, lambda n: (n.name,))
        self._pod_networks = _Networks()
        self._pod_networks_stale = False  # a node's pod CIDRs changed: rebuilt on the next lookup
        self._stores = {"pods": self._pods, "namespaces": self._namespaces, "services": self._services,
                        "nodes": self._nodes}
        core = k8s_client.CoreV1Api(api_client)
        if cluster_wide:
            kinds = [("pods", core.list_pod_for_all_namespaces, {}, pod_record),
                     ("namespaces", core.list_namespace, {}, namespace_record),
                     ("services", core.list_service_for_all_namespaces, {}, service_record),
                     ("nodes", core.list_node, {}, node_record)]
        else:
            kinds = [("pods", core.list_pod_for_all_namespaces, {"field_selector": f"spec.nodeName={node_name}"},
                      pod_record),
                     ("namespaces", core.list_namespace, {}, namespace_record)]
        self._reflectors = [self._list_watch(*k) for k in kinds]

    def _list_watch(self, kind: str, list_fn, kwargs: dict, to_record) -> ListWatch:
        def on_event(type_: str, record) -> None:
            (self._delete if type_ == "DELETED" else self._upsert)(kind, record)

        return ListWatch(kind, list_fn, kwargs=kwargs, convert=to_record, stop=self._stop, timing=self.timing,
                         on_list=lambda records: self._replace(kind, records), on_event=on_event,
                         on_synced=self._check_synced)

    # --- lifecycle

    def start(self) -> "KubeCache":
        for r in self._reflectors:
            r.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for r in self._reflectors:
            r.interrupt()
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            if r.thread.is_alive():
                r.thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def synced(self) -> bool:
        """Every kind has been listed once (lookups before that may miss)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def status(self) -> tuple[ReflectorStatus, ...]:
        return tuple(r.status() for r in self._reflectors)

    def stats(self) -> dict[str, int]:
        """Objects per kind (fovea_agent_cache_objects)."""
        return {r.kind: len(self._stores[r.kind]) for r in self._reflectors}

    # --- lookups (O(1), safe from any thread)

    def pod_by_ip(self, ip: str) -> PodRecord | None:
        best = self._pod_ips.best
        return best.get(ip) or best.get(canonical_ip(ip))

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        """The pod of that name (the best, while a recreated one and its predecessor both exist).
        A scan of every pod: for tests and diagnostics, not for the packet path."""
        with self._lock:
            pods = [p for p in self._pods.values() if p.name == name and p.namespace == namespace]
        return max(pods, key=_pod_rank, default=None)

    def local_pods(self) -> tuple[PodRecord, ...]:
        with self._lock:
            return tuple(self._local.values())

    def namespace(self, name: str) -> NamespaceRecord | None:
        return self._namespaces.get(name)

    def pod_observed(self, pod: PodRecord) -> bool:
        """The pod, or its namespace, carries fovea.dev/observe: "true"."""
        if pod.observe:
            return True
        ns = self._namespaces.get(pod.namespace)
        return ns is not None and ns.observe

    def service_by_ip(self, ip: str) -> ServiceRecord | None:
        best = self._service_ips.best
        return best.get(ip) or best.get(canonical_ip(ip))

    def node_by_ip(self, ip: str) -> NodeRecord | None:
        best = self._node_ips.best
        return best.get(ip) or best.get(canonical_ip(ip))

    def in_pod_network(self, ip: str) -> bool:
        """Inside a node's pod CIDR: a pod's address, whether a pod holds it yet or not."""
        if self._pod_networks_stale:
            with self._lock:
                self._pod_networks_stale = False
                self._pod_networks.rebuild(c for n in self._nodes.values() for c in n.pod_cidrs)
        return self._pod_networks.contains(ip)

    # --- the store (called by the reflectors)

    @staticmethod
    def _key(kind: str, record) -> object:
        if kind == "pods":
            return _pod_key(record)
        return record.name if kind in ("namespaces", "nodes") else (record.namespace, record.name)

    def _index_locked(self, kind: str, key, old, new) -> None:
        """Move the secondary indexes from old to new (either may be None)."""
        index = {"pods": self._pod_ips, "services": self._service_ips, "nodes": self._node_ips}.get(kind)
        if index is not None:
            old_ips = () if old is None else (old.cluster_ips if kind == "services" else old.ips)
            new_ips = () if new is None else (new.cluster_ips if kind == "services" else new.ips)
            if new is None:
                index.remove(key, old_ips)
            else:
                index.set(key, old_ips, new, new_ips)
        if kind == "nodes" and getattr(old, "pod_cidrs", ()) != getattr(new, "pod_cidrs", ()):
            self._pod_networks_stale = True
        if kind == "pods":
            if new is not None and new.node == self.node_name:
                self._local[key] = new
            else:
                self._local.pop(key, None)

    def _upsert(self, kind: str, record) -> None:
        key = self._key(kind, record)
        store = self._stores[kind]
        with self._lock:
            old = store.get(key)
            if old == record:
                return
            store[key] = record
            self._index_locked(kind, key, old, record)
        self._notify(kind, old, record)

    def _delete(self, kind: str, record) -> None:
        key = self._key(kind, record)
        store = self._stores[kind]
        with self._lock:
            old = store.get(key)
            if old is None:
                return  # already gone (or, for a pod, an older one of the same name: another uid)
            del store[key]
            self._index_locked(kind, key, old, None)
        self._notify(kind, old, None)

    def _replace(self, kind: str, records: list) -> None:
        """A (re)list: the store becomes exactly this; report what changed in the gap."""
        store = self._stores[kind]
        fresh = {self._key(kind, r): r for r in records}
        # Kept only for a subscriber: at 150k pods the first list's changes are ~10 MB.
        changes = [] if self.on_change is not None else None
        with self._lock:
            for key in [k for k in store if k not in fresh]:
                old = store.pop(key)
                self._index_locked(kind, key, old, None)
                if changes is not None:
                    changes.append((old, None))
            for key, record in fresh.items():
                old = store.get(key)
                if old != record:
                    store[key] = record
                    self._index_locked(kind, key, old, record)
                    if changes is not None:
                        changes.append((old, record))
        for old, new in changes or ():
            self._notify(kind, old, new)

    def _notify(self, kind: str, old, new) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(kind, old, new)
        except Exception:  # noqa: BLE001 (a subscriber's bug must not stop the watch)
            self._warnings.warn("on_change", "k8s %s: on_change failed", kind, exc_info=True)

    def _check_synced(self) -> None:
        if all(r.synced for r in self._reflectors) and not self._synced.is_set():
            self._synced.set()
            log.info("k8s cache synced: %s", ", ".join(f"{n} {k}" for k, n in self.stats().items()))
