#!/usr/bin/env python3
"""Kubernetes cache and /metrics scrape cost of the Fovea agent, in one process.

1. Kubernetes cache. A K8sEmulator (tests/k8s_emulator.py) on loopback holds a
   cluster: --pods pods over --namespaces namespaces (kube-system plus app
   namespaces), 50 nodes ("node-a" carries 1/50 of the pods), one Service per
   Deployment. Pods look like the kubelet reports them: pod IP, labels,
   ownerReferences to a ReplicaSet (hostNetwork DaemonSet pods in
   kube-system), a few annotations, containers with ports/env/probes/resources,
   conditions, container statuses and managedFields. Then, in this process:

   * KubeCache(make_api_client(kubeconfig), "node-a", cluster_wide=True), as
     the agent builds it (agent/runtime.py): time from start() to wait_synced();
   * memory: VmRSS (/proc/self/status, after gc.collect()) before the cache and
     after sync. The emulator lives in this process too, so its own growth is
     measured first (before creating the objects vs after) and not counted;
     the cache's stores are also sized object by object (sys.getsizeof over
     everything they reach), which the allocator's behaviour cannot blur;
   * --events watch events (label/annotation patches, the observe annotation
     toggled, pod create/delete churn, mixed), applied through the emulator's
     API; the time until the cache shows the last one (a new pod IP, polled
     with pod_by_ip) gives events/s end to end; then the latency of one event
     on an idle watch (median of 20);
   * 100,000 pod_by_ip lookups, hits and misses (µs per lookup).

2. Scrape. A PodsPlugin (not started: no BPF) whose pod_series SeriesStore
   holds --series pods x 2 directions, exported by its real metrics() through a
   CollectorRegistry: generate_latest() (median of 20), the exposition's size,
   and GET /metrics through agent.server.MetricsServer on a loopback port
   (median of 20, with requests). Also the parts: SeriesStore.touch() (each
   scrape's refresh runs it) and PodsPlugin.metrics() alone, and the same at
   the default podLevel.maxSeries cap.

Progress goes to stderr; the markdown report to stdout (and appended to --output).

    .venv/bin/python bench/cache.py --pods 10000 --events 5000 --series 10000
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import logging
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Everything is imported before the first memory reading, so imports are not
# counted as the cache's memory.
import kubernetes.client  # noqa: E402,F401
import kubernetes.config  # noqa: E402,F401
import requests  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from agent.config import PodLevelConfig  # noqa: E402
from agent.k8s.cache import KubeCache, make_api_client  # noqa: E402
from agent.plugins.pods import FLOW_LABELS, POD_LABELS, PodsPlugin  # noqa: E402
from agent.series import SeriesStore  # noqa: E402
from agent.server import MetricsServer  # noqa: E402
from bench.k8s_synthetic import Kind, SyntheticApi  # noqa: E402
from tests.k8s_emulator import K8sEmulator, make_namespace, make_node, make_pod, make_service  # noqa: E402

CACHE_MEMORY_GOAL_MB = 100.0  # for a 10k-pod cluster (emulator), and for 150k pods (--synthetic)
SCRAPE_GOAL_MS = 250.0  # at 10k series
NODES = 50
LOCAL_NODE = "node-a"
OBSERVE = "fovea.dev/observe"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """VmRSS of this process, after a full collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(native_id: int) -> float:
    """utime + stime of one thread of this process, in seconds."""
    stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reflector_cpu_s(cache: KubeCache, kinds: tuple[str, ...] | None = None) -> float:
    return sum(thread_cpu_s(r.thread.native_id) for r in cache._reflectors if kinds is None or r.kind in kinds)


class MachineLoad:
    """CPU the rest of the machine used while this process ran (other benchmarks, tests):
    busy jiffies of /proc/stat minus this process's own."""

    def __init__(self):
        self.t, self.busy, self.own = self._sample()

    @staticmethod
    def _sample() -> tuple[float, int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # minus idle and iowait
        stat = Path("/proc/self/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        return time.monotonic(), busy, int(f[11]) + int(f[12])

    def others_cores(self) -> float:
        t, busy, own = self._sample()
        return max(0.0, (busy - self.busy) - (own - self.own)) / CLK_TCK / max(1e-9, t - self.t)


def deep_size(roots) -> int:
    """Bytes of every object reachable from roots (each counted once), through
    dicts, tuples, lists, sets and __slots__ records."""
    seen: set[int] = set()
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (tuple, list, set, frozenset)):
            stack.extend(o)
        elif hasattr(type(o), "__slots__") and not isinstance(o, (str, bytes, int, float, bool)):
            for cls in type(o).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(o, slot):
                        stack.append(getattr(o, slot))
    return total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_ms(fn, runs: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median, min, max) in ms of fn() over runs, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times), max(times)


# -- the cluster ------------------------------------------------------------------


def rand_suffix(rng: random.Random, n: int) -> str:
    return "".join(rng.choices("bcdfghjklmnpqrstvwxz2456789", k=n))


def pod_ip(i: int) -> str:
    """Pod network 10.64.0.0/10: one address per pod index, never .0."""
    i += 1
    return f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{(i & 255) or 1}"


def node_names() -> list[str]:
    letters = string.ascii_lowercase
    return [f"node-{letters[i % 26]}{'' if i < 26 else i // 26}" for i in range(NODES)]


def node_ip(k: int) -> str:
    return f"172.18.{k // 250}.{k % 250 + 2}"


def enrich_pod(pod: dict, rng: random.Random, app: str, node_ip_: str) -> dict:
    """What the kubelet and the API server add to a pod: the bulk a list carries."""
    ts = "2025-06-0%dT%02d:%02d:%02dZ" % (rng.randint(1, 9), rng.randint(0, 23), rng.randint(0, 59),
                                          rng.randint(0, 59))
    image = f"registry.example.com/{app}:1.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
    container = {
        "name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": [{"name": "APP_NAME", "value": app}, {"name": "LOG_LEVEL", "value": "info"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10,
                           "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
        "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                          "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    }
    spec = pod["spec"]
    spec.update({
        "containers": [container], "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst", "serviceAccountName": "default", "serviceAccount": "default",
        "securityContext": {}, "schedulerName": "default-scheduler", "priority": 0,
        "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 300}],
        "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
    })
    status = pod["status"]
    running = status.get("phase") == "Running"
    status.update({
        "hostIP": node_ip_, "hostIPs": [{"ip": node_ip_}], "startTime": ts, "qosClass": "Burstable",
        "conditions": [{"type": t, "status": "True" if running or t == "PodScheduled" else "False",
                        "lastProbeTime": None, "lastTransitionTime": ts}
                       for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                 "PodScheduled")],
        "containerStatuses": [{
            "name": "main", "image": image, "ready": running, "started": running,
            "restartCount": rng.choice((0, 0, 0, 1, 2)),
            "imageID": f"{image.split(':')[0]}@sha256:{rng.getrandbits(256):064x}",
            "containerID": f"containerd://{rng.getrandbits(256):064x}",
            "state": {"running": {"startedAt": ts}} if running else {"waiting": {"reason": "ContainerCreating"}},
            "lastState": {}}],
    })
    pod["metadata"]["managedFields"] = [
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": ts,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {
             f"f:{k}": {} for k in pod["metadata"]["labels"]}, "f:ownerReferences": {}},
             "f:spec": {"f:containers": {'k:{"name":"main"}': {".": {}, "f:env": {}, "f:image": {},
                                                              "f:ports": {}, "f:readinessProbe": {},
                                                              "f:resources": {}}}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1",
         "subresource": "status", "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {},
                                                            "f:hostIP": {}, "f:podIP": {}, "f:podIPs": {},
                                                            "f:startTime": {}}}},
    ]
    return pod


class Cluster:
    """Builds the cluster in the emulator and remembers what the bench needs."""

    def __init__(self, api: K8sEmulator, pods: int, namespaces: int, seed: int):
        self.api = api
        self.rng = random.Random(seed)
        self.n_pods = pods
        self.namespaces = ["kube-system"] + [f"team-{i:02d}-app" for i in range(max(0, namespaces - 1))]
        self.nodes = node_names()
        self.pods: list[tuple[str, str]] = []  # (namespace, name) of every pod created (churn included)
        self.ips: list[str] = []  # IPs of the pods created at the start
        self.json_bytes = 0
        self.services = 0
        self._next_ip = 0

    def new_ip(self) -> str:
        ip = pod_ip(self._next_ip)
        self._next_ip += 1
        return ip

    def build(self) -> None:
        api, rng = self.api, self.rng
        for ns in self.namespaces:
            annotations = {OBSERVE: "true"} if ns.endswith(("3-app", "7-app")) else {}
            api.create(make_namespace(ns, labels={"team": ns.split("-")[1] if ns != "kube-system" else "platform"},
                                      annotations=annotations))
        for k, node in enumerate(self.nodes):
            api.create(make_node(node, node_ip(k), labels={"kubernetes.io/hostname": node,
                                                          "topology.kubernetes.io/zone": f"zone-{k % 3}"}))
        # kube-system: two hostNetwork DaemonSet pods per node (kube-proxy, the CNI agent), while they fit.
        n_system = min(2 * NODES, self.n_pods // 10)
        made = 0
        for k in range(n_system):
            node_k = k % NODES
            ds = ("kube-proxy", "cni-agent")[k // NODES % 2]
            pod = make_pod(f"{ds}-{rand_suffix(rng, 5)}", "kube-system", node=self.nodes[node_k],
                           ip=node_ip(node_k), labels={"k8s-app": ds, "controller-revision-hash": "6d4f8c7b9"},
                           annotations={}, owner=("DaemonSet", ds), host_network=True)
            self._create_pod(enrich_pod(pod, rng, ds, node_ip(node_k)))
            made += 1
        # The rest: Deployments of ~10 replicas each, one Service per Deployment, spread over
        # the app namespaces; node-a gets 1 pod in 50, the other nodes the rest.
        app_namespaces = self.namespaces[1:] or ["default"]
        remaining = self.n_pods - made
        deployments = max(1, remaining // 10)
        for d in range(deployments):
            ns = app_namespaces[d % len(app_namespaces)]
            app = f"svc-{d:05d}"
            rs_hash = "".join(rng.choices("bcdfghjklmnpqrstvwxz2456789", k=10))
            replicas = remaining // deployments + (1 if d < remaining % deployments else 0)
            self.api.create(make_service(app, ns, selector={"app": app}, port=8080))
            self.services += 1
            for _ in range(replicas):
                self.new_pod(ns, app, rs_hash)
                made += 1
                if made % 2000 == 0:
                    progress(f"  {made}/{self.n_pods} pods created")
        self.json_bytes = sum(len(json.dumps(self.api.get("pods", n, ns), separators=(",", ":")))
                              for ns, n in self.pods[:200]) // min(200, len(self.pods))

    def new_pod(self, ns: str, app: str, rs_hash: str, running: bool = False) -> tuple[str, str, str]:
        """A pod of a Deployment; 1% are Pending (no IP yet) unless `running`."""
        rng = self.rng
        idx = len(self.pods)
        node = LOCAL_NODE if idx % NODES == 0 else self.nodes[1 + idx % (NODES - 1)]
        phase = "Running" if running or rng.random() >= 0.01 else "Pending"
        ip = self.new_ip()
        name = f"{app}-{rs_hash}-{rand_suffix(rng, 5)}"
        labels = {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": ns,
                  "app.kubernetes.io/version": "1.4.2", "pod-template-hash": rs_hash,
                  "tier": rng.choice(("frontend", "backend", "worker"))}
        annotations = {"kubectl.kubernetes.io/restartedAt": "2025-06-01T10:00:00Z",
                       "prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                       "kubectl.kubernetes.io/default-container": "main"}
        if rng.random() < 0.05:
            annotations[OBSERVE] = "true"
        pod = make_pod(name, ns, node=node, ip=ip if phase == "Running" else "", labels=labels,
                       annotations=annotations, phase=phase, owner=("ReplicaSet", f"{app}-{rs_hash}"))
        node_k = self.nodes.index(node)
        self._create_pod(enrich_pod(pod, rng, app, node_ip(node_k)))
        if phase == "Running":
            self.ips.append(ip)
        return ns, name, ip

    def _create_pod(self, pod: dict) -> None:
        self.api.create(pod)
        self.pods.append((pod["metadata"]["namespace"], pod["metadata"]["name"]))


# -- 1. the Kubernetes cache ----------------------------------------------------------------


def wait_for(pred, timeout: float, poll: float = 0.0005) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def bench_cache(args, results: dict) -> None:
    api = K8sEmulator(history_limit=max(100_000, 4 * (args.pods + args.events))).start()
    progress(f"emulator on {api.url}")
    rss_empty = rss_mb()
    cluster = Cluster(api, args.pods, args.namespaces, args.seed)
    t = time.monotonic()
    cluster.build()
    progress(f"cluster built in {time.monotonic() - t:.1f}s: {len(cluster.pods)} pods, {cluster.services} "
             f"services, {NODES} nodes, {len(cluster.namespaces)} namespaces; ~{cluster.json_bytes} B JSON a pod")
    rss_objects = rss_mb()
    initial_ips = list(cluster.ips)  # the churn deletes only pods it created: these stay
    results.update(cluster=cluster, rss_empty=rss_empty, rss_objects=rss_objects)

    with tempfile.TemporaryDirectory(prefix="fovea-bench-") as tmp:
        kubeconfig = str(api.write_kubeconfig(Path(tmp, "kubeconfig")))
        rss_before = rss_mb()
        progress("KubeCache: start, wait for sync")
        t0 = time.perf_counter()
        cache = KubeCache(make_api_client(kubeconfig), LOCAL_NODE, cluster_wide=True).start()
        if not cache.wait_synced(timeout=600):
            raise SystemExit(f"the cache did not sync in 600s: {cache.status()}")
        sync_s = time.perf_counter() - t0
        sync_cpu = reflector_cpu_s(cache)
        stats = cache.stats()
        progress(f"synced in {sync_s:.2f}s: {stats}")
        rss_synced = rss_mb()
        stores = (cache._pods, cache._local, cache._namespaces, cache._services, cache._nodes,
                  cache._pod_ips._contested, cache._pod_ips.best, cache._service_ips._contested,
                  cache._service_ips.best, cache._node_ips._contested, cache._node_ips.best)
        retained = deep_size(stores)
        progress(f"RSS {rss_before:.1f} -> {rss_synced:.1f} MB; stores hold {retained / 1e6:.1f} MB of objects")
        results.update(sync_s=sync_s, sync_cpu=sync_cpu, stats=stats, rss_before=rss_before, rss_synced=rss_synced,
                       retained=retained, local=len(cache.local_pods()))
        if stats.get("pods") != len(cluster.pods):
            raise SystemExit(f"the cache holds {stats.get('pods')} pods, the emulator {len(cluster.pods)}")

        try:
            bench_events(args, api, cluster, cache, results)
            bench_lookups(initial_ips, cache, results)
        finally:
            cache.stop()
        # Cross-check: the same cache alone in a fresh process (nothing of the emulator's in its RSS).
        progress("KubeCache alone in a child process")
        try:
            out = subprocess.run([sys.executable, __file__, "--child-cache", kubeconfig], capture_output=True,
                                 text=True, timeout=900)
            results["child"] = json.loads(out.stdout.strip().splitlines()[-1])
            progress(f"  child: {results['child']}")
        except (subprocess.SubprocessError, ValueError, IndexError) as e:
            progress(f"  child failed: {e}")
            results["child"] = None
        api.stop()
    cluster.api = None  # let the emulator's objects go before the scrape measurements


def child_cache(kubeconfig: str) -> int:
    """--child-cache: sync a KubeCache in this fresh process, print its RSS growth as JSON."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    before = rss_mb()
    t = time.perf_counter()
    cache = KubeCache(make_api_client(kubeconfig), LOCAL_NODE, cluster_wide=True).start()
    if not cache.wait_synced(timeout=600):
        return 1
    sync_s = time.perf_counter() - t
    after = rss_mb()
    print(json.dumps({"rss_before": before, "rss_after": after, "sync_s": sync_s, "pods": cache.stats()["pods"],
                      "cpu_s": reflector_cpu_s(cache)}))
    cache.stop()
    return 0


def bench_events(args, api: K8sEmulator, cluster: Cluster, cache: KubeCache, results: dict) -> None:
    rng = random.Random(args.seed + 1)
    originals = [p for p in cluster.pods if p[0] != "kube-system"]
    churn: list[tuple[str, str]] = []  # pods created by the churn, deleted first-in first-out
    kinds = rng.choices(("labels", "observe", "create", "delete"), weights=(40, 10, 25, 25), k=args.events - 1)
    counts = dict.fromkeys(("labels", "observe", "create", "delete"), 0)
    progress(f"applying {args.events} watch events")
    cpu0 = reflector_cpu_s(cache, ("pods",))
    t0 = time.perf_counter()
    for i, kind in enumerate(kinds):
        if kind == "delete" and not churn:
            kind = "create"
        if kind == "labels":  # the pod's record does not change: the cache parses it and keeps the old one
            ns, name = rng.choice(originals)
            api.patch("pods", name, {"metadata": {"labels": {"bench-rev": str(i)},
                                                  "annotations": {"bench.example/rev": str(i)}}}, ns)
        elif kind == "observe":  # the record changes (observe)
            ns, name = rng.choice(originals)
            api.patch("pods", name, {"metadata": {"annotations": {OBSERVE: rng.choice(("true", None))}}}, ns)
        elif kind == "create":
            ns = rng.choice(cluster.namespaces[1:] or ["default"])
            pns, name, _ = cluster.new_pod(ns, f"churn-{i % 50:02d}", "5f6b7c8d9x")
            churn.append((pns, name))
        else:
            ns, name = churn.pop(0)
            api.delete("pods", name, ns)
        counts[kind] += 1
        if (i + 1) % 1000 == 0:
            progress(f"  {i + 1}/{args.events} applied")
    # The last event: a new pod whose IP the cache must show.
    _, _, last_ip = cluster.new_pod(cluster.namespaces[-1], "sentinel", "8c9d7f6b5z", running=True)
    counts["create"] += 1
    applied_s = time.perf_counter() - t0
    if not wait_for(lambda: cache.pod_by_ip(last_ip) is not None, timeout=300):
        raise SystemExit("the cache never showed the last event")
    visible_s = time.perf_counter() - t0
    events_cpu = reflector_cpu_s(cache, ("pods",)) - cpu0
    progress(f"applied in {applied_s:.2f}s, all visible after {visible_s:.2f}s ({counts})")

    # Did the cache end where the emulator is?
    want = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in api.list("pods")}
    have = {(p.namespace, p.name): p for p in list(cache._pods.values())}
    consistent = set(want) == set(have) and all(
        have[k].observe == ((o["metadata"].get("annotations") or {}).get(OBSERVE) == "true")
        for k, o in want.items())
    progress(f"cache consistent with the emulator: {consistent}")

    # One event on an idle watch: create a pod, wait for its IP.
    lat = []
    for _ in range(20):
        time.sleep(0.05)
        t = time.perf_counter()
        _, _, ip = cluster.new_pod(cluster.namespaces[-1], "latency", "7b8c9d2f4g", running=True)
        wait_for(lambda: cache.pod_by_ip(ip) is not None, timeout=30, poll=0.0001)
        lat.append((time.perf_counter() - t) * 1000)
    results.update(events=args.events, event_counts=counts, applied_s=applied_s, visible_s=visible_s,
                   events_cpu=events_cpu,
                   consistent=consistent, latency_ms=statistics.median(lat))


def bench_lookups(ips: list[str], cache: KubeCache, results: dict, n: int = 100_000) -> None:
    rng = random.Random(7)
    hits = [rng.choice(ips) for _ in range(n)]
    misses = [f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(n)]
    out = {}
    for label, ips in (("hit", hits), ("miss", misses)):
        f = cache.pod_by_ip
        t = time.perf_counter()
        found = 0
        for ip in ips:
            if f(ip) is not None:
                found += 1
        out[label] = (time.perf_counter() - t) / n * 1e6
        if (label == "hit") != (found == n) or (label == "miss" and found):
            raise SystemExit(f"pod_by_ip: {found}/{n} found among the {label}s")
    progress(f"pod_by_ip: {out['hit']:.2f} µs a hit, {out['miss']:.2f} µs a miss")
    results.update(lookup_hit_us=out["hit"], lookup_miss_us=out["miss"], lookups=n)


# -- 2. the scrape ---------------------------------------------------------------------------


class PluginCollector:
    """What FoveaCollector yields for the pods plugin: its metrics(), as they are."""

    def __init__(self, plugin):
        self.plugin = plugin

    def describe(self):
        return []

    def collect(self):
        yield from self.plugin.metrics()


def filled_plugin(pods: int, max_series: int, seed: int) -> tuple[PodsPlugin, set]:
    rng = random.Random(seed)
    plugin = PodsPlugin()  # not started: no BPF; only the series and metrics() are used
    ttl = PodLevelConfig().seriesTTL
    plugin.pod_series = SeriesStore(POD_LABELS + ("direction",), max_series, ttl, keep_on_overflow=("direction",))
    plugin.flow_series = SeriesStore(FLOW_LABELS, max_series, ttl, keep_on_overflow=("protocol",))
    present = set()
    for i in range(pods):
        ns = f"team-{i % 99:02d}-app"
        workload = f"svc-{i // 10:05d}"
        labels = (ns, f"{workload}-{rand_suffix(rng, 10)}-{rand_suffix(rng, 5)}", "Deployment", workload)
        present.add(labels)
        for direction in ("egress", "ingress"):
            plugin.pod_series.add(labels + (direction,), rng.randrange(1, 10**9), rng.randrange(1, 10**12))
    return plugin, present


def bench_scrape(args, results: dict) -> None:
    runs = args.runs
    progress(f"scrape: {args.series} pods x 2 directions in pod_series")
    plugin, present = filled_plugin(args.series, 2 * args.series + 10, args.seed)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PluginCollector(plugin))
    body = generate_latest(registry)
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    results.update(series_per_metric=len(plugin.pod_series), samples=samples, body_bytes=len(body),
                   body_gzip=len(gzip.compress(body, 6)))
    results["touch_ms"] = median_ms(lambda: plugin.pod_series.touch(lambda labels: labels[:4] in present), runs)
    results["metrics_ms"] = median_ms(lambda: list(plugin.metrics()), runs)
    load = MachineLoad()
    results["generate_ms"] = median_ms(lambda: generate_latest(registry), runs)
    results["scrape_others"] = load.others_cores()
    gc.disable()
    try:
        results["generate_nogc_ms"] = median_ms(lambda: generate_latest(registry), runs)
    finally:
        gc.enable()
    progress(f"  generate_latest {results['generate_ms'][0]:.1f} ms, {len(body)} bytes, {samples} samples")

    server = MetricsServer("127.0.0.1", 0, registry, lambda: (True, "ok"), lambda: (True, "ok"))
    server.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        session = requests.Session()
        r = session.get(url, timeout=30)
        r.raise_for_status()
        results["http_encoding"] = r.headers.get("Content-Encoding", "none")
        results["http_bytes"] = len(r.content)
        results["http_ms"] = median_ms(lambda: session.get(url, timeout=30).raise_for_status(), runs)
    finally:
        server.stop()
    progress(f"  HTTP GET /metrics {results['http_ms'][0]:.1f} ms")

    # The same pods, but with the default podLevel.maxSeries cap: what an agent with the
    # default config would export (the rest goes to one overflow series per direction).
    cap = PodLevelConfig().maxSeries
    capped, _ = filled_plugin(args.series, cap, args.seed)
    reg2 = CollectorRegistry(auto_describe=False)
    reg2.register(PluginCollector(capped))
    results["capped"] = (cap, len(capped.pod_series), median_ms(lambda: generate_latest(reg2), runs))
    progress(f"  at the default cap ({cap}): {results['capped'][2][0]:.1f} ms")


# -- 3. a cluster-scale cache against a generated API ---------------------------------------
#
# The emulator keeps every object (~15 KB of Python a pod: 2.3 GB at 150k pods), so at cluster
# scale the API is bench/k8s_synthetic.py: pods made from their index when a page asks, served
# from a process of its own. The same pod shape as the emulator's cluster above.

SYSTEM_PODS = 2 * NODES  # hostNetwork DaemonSet pods in kube-system, the first indexes


def synthetic_node(i: int) -> int:
    return 0 if i % NODES == 0 else 1 + i % (NODES - 1)


def synthetic_pod(i: int, app_namespaces: list[str], running: bool = False) -> dict:
    """Pod i of the generated cluster: the same i gives the same pod (1 in 100 Pending)."""
    rng = random.Random(i)
    node_k = synthetic_node(i)
    nodes = node_names()
    ts = "2025-06-%02dT%02d:%02d:%02dZ" % (1 + i % 28, i // 3600 % 24, i // 60 % 60, i % 60)
    if i < SYSTEM_PODS:
        ds = ("kube-proxy", "cni-agent")[i // NODES % 2]
        pod = make_pod(f"{ds}-{rand_suffix(rng, 5)}", "kube-system", node=nodes[node_k], ip=node_ip(node_k),
                       labels={"k8s-app": ds, "controller-revision-hash": "6d4f8c7b9"}, annotations={},
                       owner=("DaemonSet", ds), host_network=True)
        app = ds
    else:
        d = i // 10
        app, ns = f"svc-{d:05d}", app_namespaces[d % len(app_namespaces)]
        rs_hash = rand_suffix(random.Random(-d), 10)
        phase = "Running" if running or i % 100 != 37 else "Pending"
        labels = {"app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/part-of": ns,
                  "app.kubernetes.io/version": "1.4.2", "pod-template-hash": rs_hash,
                  "tier": ("frontend", "backend", "worker")[i % 3]}
        annotations = {"kubectl.kubernetes.io/restartedAt": "2025-06-01T10:00:00Z", "prometheus.io/scrape": "true",
                       "prometheus.io/port": "9090", "kubectl.kubernetes.io/default-container": "main"}
        if i % 20 == 3:
            annotations[OBSERVE] = "true"
        pod = make_pod(f"{app}-{rs_hash}-{rand_suffix(rng, 5)}", ns, node=nodes[node_k],
                       ip=pod_ip(i) if phase == "Running" else "", labels=labels, annotations=annotations,
                       phase=phase, owner=("ReplicaSet", f"{app}-{rs_hash}"))
    pod = enrich_pod(pod, rng, app, node_ip(node_k))
    pod["metadata"].update(uid="%08x-%04x-4%03x-8%03x-%012x" % (rng.getrandbits(32), rng.getrandbits(16),
                                                               rng.getrandbits(12), rng.getrandbits(12),
                                                               rng.getrandbits(48)),
                           creationTimestamp=ts, resourceVersion=str(1000 + i))
    return pod


def synthetic_kinds(pods: int, namespaces: int):
    names = ["kube-system"] + [f"team-{i:02d}-app" for i in range(max(1, namespaces - 1))]
    apps = names[1:]
    nodes = node_names()
    services = max(1, (pods - SYSTEM_PODS) // 10)
    return [
        Kind("pods", "PodList", pods, lambda i: synthetic_pod(i, apps), lambda i: nodes[synthetic_node(i)]),
        Kind("namespaces", "NamespaceList", len(names),
             lambda i: make_namespace(names[i], annotations={OBSERVE: "true"} if names[i].endswith("3-app") else {})),
        Kind("services", "ServiceList", services,
             lambda d: make_service(f"svc-{d:05d}", apps[d % len(apps)], selector={"app": f"svc-{d:05d}"},
                                    cluster_ip=f"10.96.{d >> 8 & 255}.{d & 255}", port=8080)),
        Kind("nodes", "NodeList", NODES, lambda k: make_node(nodes[k], node_ip(k))),
    ], apps


def synthetic_events(n: int, pods: int, apps: list[str], seed: int) -> tuple[list[dict], str]:
    """n watch events in the mix of bench_events (the last one a new Running pod), and its IP."""
    rng = random.Random(seed)
    events, added = [], []
    for k in range(n - 1):
        kind = rng.choices(("labels", "observe", "create", "delete"), weights=(40, 10, 25, 25))[0]
        if kind == "delete" and not added:
            kind = "create"
        if kind in ("labels", "observe"):
            pod = synthetic_pod(rng.randrange(SYSTEM_PODS, pods), apps)
            meta = pod["metadata"]
            if kind == "labels":
                meta["labels"]["bench-rev"] = meta["annotations"]["bench.example/rev"] = str(k)
            elif meta["annotations"].pop(OBSERVE, None) is None:
                meta["annotations"][OBSERVE] = "true"
            events.append({"type": "MODIFIED", "object": pod})
        elif kind == "create":
            added.append(pods + k)
            events.append({"type": "ADDED", "object": synthetic_pod(pods + k, apps)})
        else:
            events.append({"type": "DELETED", "object": synthetic_pod(added.pop(0), apps)})
    events.append({"type": "ADDED", "object": synthetic_pod(pods + n, apps, running=True)})
    return events, pod_ip(pods + n)


def bench_synthetic(args, results: dict) -> None:
    kinds, apps = synthetic_kinds(args.pods, args.namespaces)
    sample = [len(json.dumps(synthetic_pod(i, apps), separators=(",", ":"))) for i in range(200, 400)]
    results["json_bytes"] = sum(sample) // len(sample)
    api = SyntheticApi(kinds, lambda n, seed: synthetic_events(n, args.pods, apps, seed)).start()
    progress(f"synthetic API on {api.url}: {args.pods} pods, ~{results['json_bytes']} B JSON a pod")
    with tempfile.TemporaryDirectory(prefix="fovea-bench-") as tmp:
        kubeconfig = str(api.write_kubeconfig(Path(tmp, "kubeconfig")))
        client = make_api_client(kubeconfig)
        rss_before = rss_mb()
        t0 = time.perf_counter()
        cache = KubeCache(client, LOCAL_NODE, cluster_wide=True, page_size=args.page_size).start()
        try:
            if not cache.wait_synced(timeout=1800):
                raise SystemExit(f"the cache did not sync in 1800s: {cache.status()}")
            sync_s = time.perf_counter() - t0
            sync_cpu = reflector_cpu_s(cache)
            rss_synced = rss_mb()
            stats = cache.stats()
            progress(f"synced in {sync_s:.1f}s ({sync_cpu:.1f}s CPU): {stats}; RSS {rss_before:.1f} -> "
                     f"{rss_synced:.1f} MiB")
            if stats["pods"] != args.pods:
                raise SystemExit(f"the cache holds {stats['pods']} pods, the API {args.pods}")
            stores = (cache._pods, cache._local, cache._namespaces, cache._services, cache._nodes,
                      cache._pod_ips._contested, cache._pod_ips.best, cache._service_ips._contested,
                      cache._service_ips.best, cache._node_ips._contested, cache._node_ips.best)
            results.update(sync_s=sync_s, sync_cpu=sync_cpu, stats=stats, rss_before=rss_before,
                           rss_synced=rss_synced, page_size=cache.timing.page_size, retained=deep_size(stores), local=len(cache.local_pods()))

            progress(f"{args.events} watch events, made by the API server")
            cpu0 = reflector_cpu_s(cache, ("pods",))
            t = time.perf_counter()
            sent = api.post_events(args.events, args.seed)
            if not wait_for(lambda: cache.pod_by_ip(sent["last_ip"]) is not None, timeout=600):
                raise SystemExit("the cache never showed the last event")
            results.update(events=sent["events"], events_s=time.perf_counter() - t,
                           event_bytes=sent["bytes"] / sent["events"],
                           events_cpu=reflector_cpu_s(cache, ("pods",)) - cpu0, rss_events=rss_mb())
            progress(f"events: {results['events_cpu']:.2f}s CPU, {results['event_bytes']:.0f} B an event")
            bench_lookups([pod_ip(i) for i in range(SYSTEM_PODS, args.pods) if i % 100 != 37], cache, results)
        finally:
            cache.stop()
            api.stop()


MiB = 1024 * 1024


def fan_out_rows(pods: int, json_bytes: int, event_bytes: float, event_us: float) -> list[str]:
    """Per-agent and API-server load of a DaemonSet whose agents all watch all pods, against
    one whose agents watch their node's pods only, for a few cluster sizes and event rates."""
    rows = ["| nodes | pod events/s in the cluster | watch of all pods: per agent (CPU, bytes/s) | "
            "… API server sends | node-scoped watch: API server sends | relist of a DaemonSet rollout: "
            "all pods / node-scoped |", "|---:|---:|---|---:|---:|---|"]
    for nodes in (1_000, 2_000, 5_000):
        for rate in (50, 500):
            per_agent_cpu = rate * event_us / 1e6 * 100
            per_agent_bw = rate * event_bytes
            rows.append(
                f"| {nodes:,} | {rate} | {per_agent_cpu:.1f}% of a core, {per_agent_bw / 1e6:.2f} MB/s | "
                f"{nodes * per_agent_bw / 1e9:.1f} GB/s | {per_agent_bw / 1e6:.2f} MB/s | "
                f"{nodes * pods * json_bytes / 1e12:.2f} TB / {pods * json_bytes / 1e9:.2f} GB |")
    return rows


def report_synthetic(args, r: dict) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stats, pods = r["stats"], r["stats"]["pods"]
    added = r["rss_synced"] - r["rss_before"]
    event_us = r["events_cpu"] / r["events"] * 1e6
    lines = [
        f"Run {now} on {cpu_model()} ({os.cpu_count()} CPUs), Python {platform.python_version()}, "
        f"`bench/cache.py --synthetic --pods {args.pods} --events {args.events}`. Other processes on the "
        f"machine used {r['others']:.2f} CPUs on average during the run.",
        "",
        f"Cluster (bench/k8s_synthetic.py, in its own process): {pods:,} pods ({r['local']} on {LOCAL_NODE}), "
        f"{stats['services']:,} Services, {stats['nodes']} nodes, {stats['namespaces']} namespaces; a pod is "
        f"~{r['json_bytes']:,} bytes of JSON.",
        "",
        "| Measurement | Result | Goal | |",
        "|---|---|---|---|",
        f"| KubeCache start → synced (cluster_wide, pages of {r['page_size']}) "
        f"| {r['sync_s']:.1f} s (the cache's threads: {r['sync_cpu']:.1f} s CPU, "
        f"{r['sync_cpu'] / pods * 1e6:.0f} µs a pod) | | |",
        f"| Memory the cache added (VmRSS after sync − before) | {added:.1f} MiB ({added * MiB / pods:,.0f} B a "
        f"pod) | ≤ {CACHE_MEMORY_GOAL_MB:.0f} MiB at 150k pods | {verdict(added <= CACHE_MEMORY_GOAL_MB)} |",
        f"| … of which the stores' objects (records, keys, IP indexes; sizeof walk) | {r['retained'] / MiB:.1f} "
        f"MiB ({r['retained'] / pods:,.0f} B a pod) | | |",
        f"| {r['events']:,} watch events (40% label patches, 10% observe toggles, 25% creates, 25% deletes) | "
        f"pods reflector {r['events_cpu']:.2f} s CPU = {event_us:,.0f} µs an event; {r['event_bytes']:,.0f} "
        f"bytes an event on the wire; all made, sent and visible after {r['events_s']:.1f} s; VmRSS after: "
        f"{r['rss_events'] - r['rss_before']:.1f} MiB over the start | | |",
        f"| pod_by_ip, {r['lookups']:,} lookups: hit / miss | {r['lookup_hit_us']:.2f} µs / "
        f"{r['lookup_miss_us']:.2f} µs | | |",
        "",
        f"Watch fan-out computed from these numbers ({pods:,} pods, {r['json_bytes']:,} B a pod, "
        f"{r['event_bytes']:,.0f} B and {event_us:,.0f} µs an event):",
        "",
        *fan_out_rows(pods, r["json_bytes"], r["event_bytes"], event_us),
    ]
    return "\n".join(lines) + "\n"


# -- the report --------------------------------------------------------------------------------


def fmt_ms(m: tuple[float, float, float]) -> str:
    return f"{m[0]:.1f} ms (min {m[1]:.1f}, max {m[2]:.1f})"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def report(args, r: dict) -> str:
    c: Cluster = r["cluster"]
    stats = r["stats"]
    added = r["rss_synced"] - r["rss_before"]
    emu = r["rss_objects"] - r["rss_empty"]
    ev = r["event_counts"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    child = r.get("child")
    child_row = (f"{child['rss_after'] - child['rss_before']:.1f} MB for {child['pods']:,} pods, synced in "
                 f"{child['sync_s']:.2f} s ({child['cpu_s']:.2f} s CPU)" if child else "failed (see stderr)")
    lines = [
        f"Run {now} on {cpu_model()} ({os.cpu_count()} CPUs), Python {platform.python_version()}, "
        f"`bench/cache.py --pods {args.pods} --events {args.events} --series {args.series}`. "
        f"Other processes on the machine used {r['others']:.2f} CPUs on average during the run "
        f"({r['scrape_others']:.2f} during the generate_latest runs).",
        "",
        f"Cluster in the emulator: {stats.get('pods'):,} pods ({r['local']} on {LOCAL_NODE}), "
        f"{stats.get('services'):,} Services, {stats.get('nodes')} nodes, {stats.get('namespaces')} namespaces; "
        f"a pod is ~{c.json_bytes:,} bytes of JSON (managedFields included). The emulator runs in the "
        f"benchmark's process, so it shares the GIL and the CPU with the cache.",
        "",
        "| Measurement | Result | Goal | |",
        "|---|---|---|---|",
        f"| KubeCache start → synced (cluster_wide: pods, namespaces, Services, nodes) | {r['sync_s']:.2f} s "
        f"(the cache's threads: {r['sync_cpu']:.2f} s CPU; the rest is the emulator serving the list) | | |",
        f"| Memory the cache added (VmRSS after sync − before the cache) | {added:.1f} MB "
        f"({added * 1024 * 1024 / max(1, stats.get('pods')):,.0f} B a pod) | < {CACHE_MEMORY_GOAL_MB:.0f} MB "
        f"at 10k pods | {verdict(added < CACHE_MEMORY_GOAL_MB)} |",
        f"| … of which the stores' objects (records, keys, IP indexes; sizeof walk) | {r['retained'] / 1e6:.1f} MB "
        f"({r['retained'] / max(1, stats.get('pods')):,.0f} B a pod) | | |",
        f"| Same cache alone in a fresh child process (VmRSS growth; cluster after the churn) | {child_row} "
        f"| < {CACHE_MEMORY_GOAL_MB:.0f} MB | "
        f"{verdict(child['rss_after'] - child['rss_before'] < CACHE_MEMORY_GOAL_MB) if child else ''} |",
        f"| Emulator's own growth for the objects (not Fovea's, not counted above) | {emu:.1f} MB | | |",
        f"| {r['events']:,} watch events applied → last one visible in the cache "
        f"({ev['labels']} label/annotation patches, {ev['observe']} observe toggles, {ev['create']} creates, "
        f"{ev['delete']} deletes) | {r['visible_s']:.2f} s = {r['events'] / r['visible_s']:,.0f} events/s end "
        f"to end, bound by the emulator (applying alone: {r['applied_s']:.2f} s); the pods reflector spent "
        f"{r['events_cpu']:.2f} s CPU = {r['events_cpu'] / r['events'] * 1e6:,.0f} µs an event "
        f"(~{r['events'] / max(r['events_cpu'], 1e-9):,.0f} events/s of one core); cache consistent: "
        f"{'yes' if r['consistent'] else '**no**'} | | |",
        f"| One event on an idle watch: create → visible (median of 20) | {r['latency_ms']:.1f} ms | | |",
        f"| pod_by_ip, {r['lookups']:,} lookups: hit / miss | {r['lookup_hit_us']:.2f} µs / "
        f"{r['lookup_miss_us']:.2f} µs a lookup | | |",
        f"| Scrape set: {args.series:,} pods × 2 directions | {r['series_per_metric']:,} series per metric "
        f"(fovea_pod_packets_total, fovea_pod_bytes_total), {r['samples']:,} samples | | |",
        f"| SeriesStore.touch (every scrape's refresh) | {fmt_ms(r['touch_ms'])} | | |",
        f"| PodsPlugin.metrics() alone (families, sorted) | {fmt_ms(r['metrics_ms'])} | | |",
        f"| generate_latest(registry), median of {args.runs} | {fmt_ms(r['generate_ms'])} | "
        f"< {SCRAPE_GOAL_MS:.0f} ms at 10k series | {verdict(r['generate_ms'][0] < SCRAPE_GOAL_MS)} |",
        f"| … the same with the garbage collector off (its share) | {fmt_ms(r['generate_nogc_ms'])} | | |",
        f"| Exposition size | {r['body_bytes']:,} bytes ({r['body_gzip']:,} gzipped; served with "
        f"Content-Encoding: {r['http_encoding']}) | | |",
        f"| GET /metrics through MetricsServer (requests, loopback), median of {args.runs} | {fmt_ms(r['http_ms'])} "
        f"| < {SCRAPE_GOAL_MS:.0f} ms | {verdict(r['http_ms'][0] < SCRAPE_GOAL_MS)} |",
        f"| generate_latest with the default podLevel.maxSeries = {r['capped'][0]:,} "
        f"({r['capped'][1]:,} series per metric, overflow included) | {fmt_ms(r['capped'][2])} | "
        f"< {SCRAPE_GOAL_MS:.0f} ms | {verdict(r['capped'][2][0] < SCRAPE_GOAL_MS)} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description="Kubernetes cache (sync time, memory, watch events, lookups) and /metrics scrape cost, "
                    "against an in-process Kubernetes API emulator on loopback.")
    p.add_argument("--pods", type=int, default=10000, help="pods in the emulated cluster (default 10000)")
    p.add_argument("--namespaces", type=int, default=100, help="namespaces to spread them over (default 100)")
    p.add_argument("--events", type=int, default=5000, help="watch events to apply (default 5000)")
    p.add_argument("--series", type=int, default=10000,
                   help="pods in the scrape's pod series, x 2 directions (default 10000)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per scrape measurement (default 20)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--output", metavar="FILE", help="also append the markdown report to FILE")
    p.add_argument("--synthetic", action="store_true",
                   help="cache only, against a generated API that stores nothing (bench/k8s_synthetic.py): "
                        "for cluster-scale --pods (150000)")
    p.add_argument("--page-size", type=int, default=500, help="--synthetic: the cache's list page size (default 500)")
    p.add_argument("--child-cache", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_cache:
        return child_cache(args.child_cache)
    if args.pods < 10 or args.events < 1 or args.series < 1 or args.namespaces < 1:
        p.error("--pods must be at least 10, --events, --series and --namespaces at least 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    results: dict = {}
    load = MachineLoad()
    gc.collect()
    if args.synthetic:
        bench_synthetic(args, results)
        results["others"] = load.others_cores()
        text = report_synthetic(args, results)
    else:
        bench_cache(args, results)
        gc.collect()
        bench_scrape(args, results)
        results["others"] = load.others_cores()
        text = report(args, results)
    sys.stdout.write(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text)
        progress(f"report appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
