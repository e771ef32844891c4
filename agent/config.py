"""Agent settings: one YAML file (camelCase keys), overridden by CLI flags.

Every key is a field of a frozen dataclass below; its docstring-comment says
what it does. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import typing
from dataclasses import dataclass, field

import yaml

from agent.errors import FoveaError


@dataclass(frozen=True)
class TcConfig:
    priority: int = 1  # tc filter priority of Fovea's filters (lower runs first); clsact mode
    mode: str = "auto"  # auto (tcx when the kernel has it), tcx, or clsact (agent/tc.py)


@dataclass(frozen=True)
class LifecycleConfig:
    keepAttached: bool = False  # on stop, leave the tc programs attached and their maps pinned for the next agent


@dataclass(frozen=True)
class DropsConfig:
    mapSize: int = 16384  # drop keys (reason, protocol, addresses) kept in the kernel
    eventsPerSecond: int = 200  # drop events (with ports) for spans and `fovea observe`, per CPU; 0: none


@dataclass(frozen=True)
class FlowsConfig:
    enabled: bool = True  # flow records (spans, `fovea observe`); the pods program keeps its table regardless
    mapSize: int = 65536  # flows kept in the kernel table; past it, flows go through the ring buffer
    ringBufferSize: int = 1 << 20  # bytes; a power of two, at least 4096
    idleTimeout: float = 30.0  # seconds without a packet that end a flow
    reportInterval: float = 60.0  # a longer flow is reported once per this many seconds
    connectTimeout: float = 10.0  # seconds a TCP SYN may wait for its answer before the attempt is a timeout


@dataclass(frozen=True)
class OtlpConfig:
    enabled: bool = False  # export spans over OTLP (also on with OTEL_TRACES_EXPORTER=otlp)
    protocol: str = ""  # grpc | http/protobuf; default: $OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else grpc
    endpoint: str = ""  # default: $OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else the SDK default
    sampleRatio: float = 1.0  # fraction of flows and DNS transactions that become spans
    maxSpansPerSecond: int = 1000  # spans past this rate are dropped (counted)
    queueSize: int = 4096  # spans waiting for the collector; past it, spans are dropped (counted)
    batchSize: int = 512  # spans per export request


@dataclass(frozen=True)
class ObserveConfig:
    socket: str = "/run/fovea/observe.sock"  # Unix socket of the flow stream; empty: none
    port: int = 9811  # TCP port on 127.0.0.1 only; 0: none
    buffer: int = 4096  # recent records kept for --last (a few MiB of memory)
    maxFollowers: int = 64  # clients following the stream at once; more are refused with an error


@dataclass(frozen=True)
class PodsConfig:
    mapSize: int = 8192  # pod interfaces the DNS code knows (the counters live in the flow table: flows.mapSize)
    interfaces: tuple[str, ...] = ("*",)  # globs of host-side pod interface names (cali*, lxc*, veth*...)


@dataclass(frozen=True)
class TcpConfig:
    mapSize: int = 16384  # keys of each TCP map (events by namespace and address, histograms, states)
    socketMapSize: int = 65536  # sockets tracked at once for handshake latency and RTT sampling
    reconcileInterval: float = 30.0  # seconds between sock_diag counts of connection states
    includeHost: bool = True  # the host's own namespace (node, hostNetwork pods) counts as the node's


@dataclass(frozen=True)
class DnsConfig:
    timeout: float = 5.0  # seconds without a response before a query counts as unanswered
    sampleRatio: float = 0.01  # share of transactions decoded in full (names, answers) for traces and observe
    sampleBytes: int = 512  # bytes of each sampled message copied out of the kernel
    mapSize: int = 4096  # counter keys in the kernel (local address, qtype, rcode)
    inflightMapSize: int = 16384  # queries awaiting their response, tracked in the kernel


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True  # HTTP/1.x requests between workloads, parsed in the pods tc programs (needs pods)
    ports: tuple[int, ...] = (80, 8080, 8000, 3000, 5000, 9090)  # TCP ports whose packets are parsed; []: every port
    timeout: float = 60.0  # seconds a request waits for its response, then counts with status_class none
    mapSize: int = 4096  # counter keys in the kernel (pair, method, status class; pair, duration bucket)
    inflightMapSize: int = 16384  # requests awaiting their response, tracked in the kernel
    sampleRatio: float = 0.01  # share of requests recorded one by one (spans, `fovea observe --http`)
    urlPath: bool = False  # url.path of the sampled requests (their request line's first bytes leave the kernel)
    urlPathMaxLength: int = 128  # characters of url.path kept; longer paths are cut


MAX_HTTP_PORTS = 16  # compiled into a compare chain: every TCP packet runs it
MAX_URL_PATH = 240  # the kernel sends up at most 256 bytes of a request line (bpf/http.h HTTP_LINE_MAX)


@dataclass(frozen=True)
class PodLevelConfig:
    allPods: bool = False  # pod-level series for every pod, not only annotated ones
    seriesTTL: float = 300.0  # seconds a deleted pod's series stay
    maxSeries: int = 10000  # per metric; past it, new label sets go to an overflow series
    pendingWindow: float = 30.0  # seconds traffic of a pod address the API does not know yet waits for its pod


@dataclass(frozen=True)
class KernelConfig:
    headers: str = ""  # kernel headers tree; empty: find them (see agent/kernel/headers.py)
    btf: str = "/sys/kernel/btf/vmlinux"
    cacheDir: str = "/var/cache/fovea"  # where prepared headers and compiled programs are kept


@dataclass(frozen=True)
class TlsConfig:
    certFile: str = ""  # PEM certificate (with its chain) for HTTPS on the metrics port; empty: plain HTTP
    keyFile: str = ""  # its PEM private key


@dataclass(frozen=True)
class MetricsAuthConfig:
    enabled: bool = False  # /metrics needs a Kubernetes bearer token allowed to `get` the URL /metrics
    cacheTTL: float = 60.0  # seconds a token's review is reused


@dataclass(frozen=True)
class CapturesConfig:
    enabled: bool = True  # run Capture/ClusterCapture resources (needs the Kubernetes API)
    baseDir: str = "/var/lib/fovea/captures"  # hostPath output: every capture file lives under it
    uploadAllowlist: tuple[str, ...] = ()  # s3/azureBlob endpoints allowed (host, *.suffix, CIDR...); empty: none
    gracePeriod: float = 60.0  # seconds after a capture's duration before missing nodes count as failed
    namespace: str = ""  # where a ClusterCapture's Secrets are read; default: $POD_NAMESPACE, else fovea-system
    nodeQuota: int = 0  # bytes running captures (twice maxBytes) and finished files may take; 0: min(5Gi, 10% of fs)
    maxConcurrent: int = 2  # captures running at once on a node; more wait, Pending
    retention: float = 86400.0  # seconds finished node-local files are kept (then deleted; the status says so)
    ringMemory: int = 64 << 20  # bytes of locked ring memory per capture, all its interfaces together


@dataclass(frozen=True)
class Config:
    standalone: bool = False  # no Kubernetes API: a plain Linux host
    nodeName: str = ""  # default: $NODE_NAME, else the host name
    kubeconfig: str = ""  # default: in-cluster config or $KUBECONFIG
    uplinks: tuple[str, ...] = ()  # default: the interfaces of the default routes
    port: int = 9810  # /metrics, /healthz, /readyz
    bindAddress: str = "0.0.0.0"
    tls: TlsConfig = field(default_factory=TlsConfig)
    metricsAuth: MetricsAuthConfig = field(default_factory=MetricsAuthConfig)
    interval: float = 5.0  # seconds between reads of the kernel maps
    idleReads: int = 12  # a map key unchanged for this many reads is folded and deleted
    plugins: tuple[str, ...] = ("forward", "drops", "pods", "tcp", "dns")
    staticPods: str = ""  # standalone: YAML file naming pods by IP (agent/k8s/static.py)
    logLevel: str = "info"
    tc: TcConfig = field(default_factory=TcConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    drops: DropsConfig = field(default_factory=DropsConfig)
    flows: FlowsConfig = field(default_factory=FlowsConfig)
    otlp: OtlpConfig = field(default_factory=OtlpConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    pods: PodsConfig = field(default_factory=PodsConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    podLevel: PodLevelConfig = field(default_factory=PodLevelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    captures: CapturesConfig = field(default_factory=CapturesConfig)

    def validate(self, known_plugins: typing.Iterable[str]) -> "Config":
        known = sorted(known_plugins)
        for p in self.plugins:
            if p not in known:
                raise FoveaError(f"config key 'plugins': unknown plugin {p!r}", f"known plugins: {', '.join(known)}")
        checks = [
            ("port", 1 <= self.port <= 65535, "a TCP port, 1-65535"),
            ("interval", self.interval > 0, "a positive number of seconds"),
            ("idleReads", self.idleReads >= 1, "at least 1"),
            ("drops.mapSize", 1 <= self.drops.mapSize <= 1 << 20, "1 to 1048576"),
            ("tc.priority", 1 <= self.tc.priority <= 0xFFFF, "1-65535"),
            ("tc.mode", self.tc.mode in ("auto", "tcx", "clsact"), "auto, tcx or clsact"),
            ("pods.mapSize", 2 <= self.pods.mapSize <= 1 << 20, "2 to 1048576"),
            ("drops.eventsPerSecond", 0 <= self.drops.eventsPerSecond <= 1 << 20, "0 to 1048576"),
            ("flows.mapSize", 1 <= self.flows.mapSize <= 1 << 22, "1 to 4194304"),
            ("flows.ringBufferSize", self.flows.ringBufferSize >= 4096
             and self.flows.ringBufferSize & (self.flows.ringBufferSize - 1) == 0, "a power of two, at least 4096"),
            ("flows.idleTimeout", self.flows.idleTimeout > 0, "a positive number of seconds"),
            ("flows.reportInterval", self.flows.reportInterval > 0, "a positive number of seconds"),
            ("flows.connectTimeout", 0 < self.flows.connectTimeout <= 3600, "more than 0 and at most 3600 seconds"),
            ("otlp.protocol", self.otlp.protocol in ("", "grpc", "http/protobuf"), "grpc or http/protobuf"),
            ("otlp.sampleRatio", 0 <= self.otlp.sampleRatio <= 1, "between 0 and 1"),
            ("otlp.maxSpansPerSecond", self.otlp.maxSpansPerSecond >= 1, "at least 1"),
            ("otlp.queueSize", self.otlp.queueSize >= 1, "at least 1"),
            ("otlp.batchSize", 1 <= self.otlp.batchSize <= self.otlp.queueSize, "1 to otlp.queueSize"),
            ("observe.port", 0 <= self.observe.port <= 65535, "a TCP port, or 0 for none"),
            ("observe.buffer", self.observe.buffer >= 1, "at least 1"),
            ("observe.maxFollowers", self.observe.maxFollowers >= 1, "at least 1"),
            ("tcp.mapSize", 1 <= self.tcp.mapSize <= 1 << 20, "1 to 1048576"),
            ("tcp.socketMapSize", 1 <= self.tcp.socketMapSize <= 1 << 22, "1 to 4194304"),
            ("tcp.reconcileInterval", self.tcp.reconcileInterval > 0, "a positive number of seconds"),
            ("dns.timeout", 0 < self.dns.timeout <= 3600, "more than 0 and at most 3600 seconds"),
            ("dns.sampleRatio", 0 <= self.dns.sampleRatio <= 1, "a share from 0 to 1"),
            ("dns.sampleBytes", 12 <= self.dns.sampleBytes <= 4096, "12 to 4096"),
            ("dns.mapSize", 1 <= self.dns.mapSize <= 1 << 20, "1 to 1048576"),
            ("dns.inflightMapSize", 1 <= self.dns.inflightMapSize <= 1 << 22, "1 to 4194304"),
            ("http.ports", len(self.http.ports) <= MAX_HTTP_PORTS and len(set(self.http.ports)) == len(self.http.ports)
             and all(1 <= p <= 65535 for p in self.http.ports),
             f"at most {MAX_HTTP_PORTS} distinct TCP ports, 1-65535 (or [] for every port)"),
            ("http.timeout", 0 < self.http.timeout <= 3600, "more than 0 and at most 3600 seconds"),
            ("http.mapSize", 1 <= self.http.mapSize <= 1 << 20, "1 to 1048576"),
            ("http.inflightMapSize", 1 <= self.http.inflightMapSize <= 1 << 22, "1 to 4194304"),
            ("http.sampleRatio", 0 <= self.http.sampleRatio <= 1, "a share from 0 to 1"),
            ("http.urlPathMaxLength", 1 <= self.http.urlPathMaxLength <= MAX_URL_PATH, f"1 to {MAX_URL_PATH}"),
            ("podLevel.seriesTTL", self.podLevel.seriesTTL >= 0, "zero or more seconds"),
            ("podLevel.maxSeries", self.podLevel.maxSeries >= 1, "at least 1"),
            ("podLevel.pendingWindow", 0 <= self.podLevel.pendingWindow <= 3600, "0 to 3600 seconds"),
            ("tls", bool(self.tls.certFile) == bool(self.tls.keyFile), "both certFile and keyFile, or neither"),
            ("metricsAuth.cacheTTL", self.metricsAuth.cacheTTL >= 0, "zero or more seconds"),
            ("metricsAuth.enabled", not (self.metricsAuth.enabled and self.standalone),
             "off when standalone (tokens are checked with the Kubernetes API)"),
            ("captures.gracePeriod", self.captures.gracePeriod >= 0, "zero or more seconds"),
            ("captures.nodeQuota", self.captures.nodeQuota >= 0, "zero (the default rule) or more bytes"),
            ("captures.maxConcurrent", self.captures.maxConcurrent >= 1, "at least 1"),
            ("captures.retention", self.captures.retention > 0, "a positive number of seconds"),
            ("captures.ringMemory", self.captures.ringMemory >= 1 << 20, "at least 1048576 bytes (1Mi)"),
            ("captures.baseDir", os.path.isabs(self.captures.baseDir) and self.captures.baseDir != "/",
             "an absolute directory other than /"),
            ("logLevel", self.logLevel.lower() in ("debug", "info", "warning", "error"),
             "debug, info, warning or error"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise FoveaError(f"config key {key!r} is invalid", f"it must be {want}")
        for name in self.uplinks:
            if not re.fullmatch(r"[^\s/]{1,15}", name):
                raise FoveaError(f"config key 'uplinks': {name!r} is not an interface name", "use names like eth0")
        return self

    @property
    def enabled_plugins(self) -> tuple[str, ...]:
        """`plugins`, and http when http.enabled and the pods plugin that carries it runs."""
        others = tuple(p for p in self.plugins if p != "http")
        return others + (("http",) if self.http.enabled and "pods" in others else ())

    @property
    def agent_namespace(self) -> str:
        return self.captures.namespace or os.environ.get("POD_NAMESPACE") or "fovea-system"

    @property
    def node(self) -> str:
        return self.nodeName or os.environ.get("NODE_NAME") or socket.gethostname()


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise FoveaError(f"config key {path or '(top)'!r} must be a mapping", "check the YAML indentation")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise FoveaError(f"config key {full!r} is unknown", f"known keys here: {', '.join(sorted(names))}")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def _convert(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is tuple and typing.get_args(hint)[0] is int:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FoveaError(f"config key {key!r} must be a list of integers", "e.g. [80, 8080]")
        return tuple(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FoveaError(f"config key {key!r} must be a list of strings", "e.g. [eth0, eth1]")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise FoveaError(f"config key {key!r} must be of type {hint.__name__}", f"got {value!r}")
    return value


def load(path: str | None, overrides: dict | None = None) -> Config:
    """The file's settings (if any), then CLI overrides (camelCase keys, dotted for nested)."""
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise FoveaError(f"cannot read config file {path}: {e.strerror}", "check --config") from None
        except yaml.YAMLError as e:
            raise FoveaError(f"config file {path} is not valid YAML: {e}".replace("\n", " "), "fix the file") from None
    if not isinstance(data, dict):
        raise FoveaError(f"config file {path} must be a mapping of keys", "see docs/configuration.md")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FoveaError(f"config key {p!r} must be a mapping", "check the YAML indentation")
        node[leaf] = value
    return _build(Config, data, "")
