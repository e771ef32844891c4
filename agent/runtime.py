"""The agent: kernel preparation, plugins, the metrics server, the read loop."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from prometheus_client import CollectorRegistry, ProcessCollector
from pyroute2 import IPRoute

from agent.config import Config
from agent.enrich import Resolver
from agent.errors import FoveaError
from agent.events import EventHub
from agent.kernel.headers import find_headers
from agent.kernel.tracefs import Tracefs
from agent.metrics import FoveaCollector
from agent.plugins import REGISTRY
from agent.plugins.base import Plugin, PluginContext
from agent.server import MetricsServer, TlsFiles
from agent.tc import TcAttacher

log = logging.getLogger(__name__)


def require_root() -> None:
    if os.geteuid() != 0:
        raise FoveaError(
            "fovea agent must run as root (loading eBPF programs and tc filters needs "
            "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)",
            "run it with sudo, or through the DaemonSet",
        )


def default_route_interfaces() -> list[str]:
    """Interfaces that carry the host's default routes, IPv4 and IPv6."""
    names: list[str] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oifs = [route.get_attr("RTA_OIF")]
                oifs += [hop["oif"] for hop in route.get_attr("RTA_MULTIPATH") or []]
                for oif in filter(None, oifs):
                    link = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
                    if link not in names:
                        names.append(link)
    return names


def check_uplinks(names: list[str]) -> None:
    with IPRoute() as ipr:
        existing = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    for name in names:
        if name not in existing:
            raise FoveaError(
                f"uplink {name!r} does not exist",
                f"pass --uplink with one of: {', '.join(existing)}",
            )


class Agent:
    def __init__(self, config: Config):
        self.config = config
        self.lock = threading.Lock()  # plugins are read by the loop and by scrapes
        self.plugins: dict[str, Plugin] = {}
        self.failed: dict[str, str] = {}
        self.events = EventHub()
        self.tc: TcAttacher | None = None
        self.pod_source = None
        self.captures = None
        self.server: MetricsServer | None = None
        self.resolver: Resolver | None = None
        self.traces = None  # agent/traces.py TraceExporter, when OTLP is on
        self.observe = None  # agent/observe.py ObserveServer
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._heartbeat = time.monotonic()
        self._ready = False
        self._refresh_errors: dict[str, float] = {}

    def start(self) -> None:
        require_root()
        cfg = self.config
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FoveaCollector(self))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes etc.: the agent's own footprint
        # Bind first: a busy port fails before anything touches the kernel.
        self.server = MetricsServer(cfg.bindAddress, cfg.port, registry, self.health, self.readiness,
                                    tls=TlsFiles(cfg.tls.certFile, cfg.tls.keyFile) if cfg.tls.certFile else None,
                                    authorize=self._metrics_auth())
        try:
            self._start_plugins()
            self._start_consumers()
        except BaseException:
            self.close()
            raise
        try:
            self._start_captures()
        except Exception as e:  # captures down never takes the metrics down
            log.exception("captures are down")
            self.failed["captures"] = str(e) or type(e).__name__
        self.server.start()
        self._ready = True
        log.info("serving /metrics on %s://%s:%d%s (node %s)", "https" if cfg.tls.certFile else "http",
                 cfg.bindAddress, cfg.port, " with token checks" if cfg.metricsAuth.enabled else "", cfg.node)

    def _metrics_auth(self):
        """With metricsAuth on: a token check for /metrics through the Kubernetes API."""
        if not self.config.metricsAuth.enabled:
            return None
        from agent.auth import TokenAccess
        from agent.k8s.cache import make_api_client

        access = TokenAccess(make_api_client(self.config.kubeconfig or None), ttl=self.config.metricsAuth.cacheTTL)
        return access.check

    def _start_plugins(self) -> None:
        cfg = self.config
        tracefs = Tracefs()
        headers = find_headers(cfg.kernel.headers or None, cache=cfg.kernel.cacheDir)
        log.info("kernel headers: %s", headers.description)
        uplinks = list(cfg.uplinks) or default_route_interfaces()
        check_uplinks(uplinks)
        log.info("uplinks: %s", ", ".join(uplinks) or "none")
        self.tc = TcAttacher(cfg.tc.priority, instance=cfg.node, mode=cfg.tc.mode)
        log.info("tc programs attach with %s", self.tc.mode)
        self.pod_source = self._pod_source()
        resolver = self.resolver = Resolver(self.pod_source, cfg.node, all_pods=cfg.podLevel.allPods)
        ctx = PluginContext(cfg, headers, tracefs, self.tc, uplinks, resolver, self.wake, self.events)
        # Plugins that extend other plugins' tc programs register before those compile.
        for name in sorted(cfg.plugins, key=lambda n: not REGISTRY[n].extends_tc):
            plugin = REGISTRY[name]()
            why = plugin.check(tracefs)
            if why is None:
                try:
                    started = time.monotonic()
                    plugin.start(ctx)
                    self.plugins[name] = plugin
                    log.info("plugin %s started in %.1fs", name, time.monotonic() - started)
                    continue
                except FoveaError as e:
                    why = str(e)
                except Exception as e:  # one plugin failing never takes the agent down
                    log.exception("plugin %s failed to start", name)
                    why = f"{type(e).__name__}: {e}"
            plugin.close()
            self.failed[name] = why
            log.error("plugin %s is down: %s", name, why)
        if not self.plugins:
            raise FoveaError("no plugin could start", "see the errors above, and run 'fovea doctor'")

    def _start_consumers(self) -> None:
        """The record consumers: OTLP spans (when on) and the flow stream."""
        from agent.observe import ObserveServer
        from agent.traces import TraceExporter, otlp_enabled

        cfg = self.config
        if otlp_enabled(cfg):
            self.traces = TraceExporter(cfg, self.events, self.resolver)
        if cfg.observe.socket or cfg.observe.port:
            self.observe = ObserveServer(cfg, self.events, self.resolver, cfg.node)

    def extra_metrics(self) -> list:
        """Self-metrics of the record consumers (fovea_agent_*)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        out = []
        if self.traces is not None:
            c = self.traces.counts()
            exported = CounterMetricFamily("fovea_agent_spans_exported", "Spans the OTLP collector accepted")
            exported.add_metric([], c["exported"])
            failed = CounterMetricFamily("fovea_agent_spans_failed",
                                         "Spans whose export failed (collector down, slow or refusing)")
            failed.add_metric([], c["failed"])
            dropped = CounterMetricFamily("fovea_agent_spans_dropped", "Spans never sent, by why",
                                          labels=["reason"])
            for reason in ("queue_full", "rate_limit"):
                dropped.add_metric([reason], c[reason])
            sampled = CounterMetricFamily("fovea_agent_spans_sampled_out", "Records left out by otlp.sampleRatio")
            sampled.add_metric([], c["sampled_out"])
            queued = GaugeMetricFamily("fovea_agent_spans_queued", "Spans waiting for the collector")
            queued.add_metric([], c["queued"])
            out += [exported, failed, dropped, sampled, queued]
        if self.observe is not None:
            s = self.observe.stats()
            followers = GaugeMetricFamily("fovea_agent_observe_clients", "Clients following the flow stream")
            followers.add_metric([], s["followers"])
            lost = CounterMetricFamily("fovea_agent_observe_lost_records",
                                       "Records flow-stream clients could not keep up with")
            lost.add_metric([], s["lost"] + s["hub_full"])
            out += [followers, lost]
        return out

    def _start_captures(self) -> None:
        """The Capture controller (with the Kubernetes API only)."""
        cfg = self.config
        if cfg.standalone or not cfg.captures.enabled:
            return
        from agent.endpoints import Endpoints
        from capture.service import start_captures

        uplinks = list(cfg.uplinks) or default_route_interfaces()
        self.captures = start_captures(cfg, uplinks, Endpoints(exclude=set(uplinks)).scan, self.events.publish)
        self.server.captures = self.captures.artifact

    def _pod_source(self):
        """Who the pods are: the Kubernetes API, or a static file when standalone."""
        cfg = self.config
        if cfg.standalone:
            from agent.k8s.static import StaticPods

            return StaticPods.load(cfg.staticPods) if cfg.staticPods else StaticPods.empty()
        from agent.k8s.cache import KubeCache, make_api_client

        cache = KubeCache(make_api_client(cfg.kubeconfig or None), cfg.node, cluster_wide=True)
        cache.start()
        log.info("watching the Kubernetes API for pods of node %s", cfg.node)
        return cache

    def refresh_all(self) -> list[Plugin]:
        """Read every plugin's maps; a failing plugin is logged, not fatal."""
        running = []
        for name, plugin in self.plugins.items():
            try:
                plugin.refresh()
                running.append(plugin)
            except Exception:
                now = time.monotonic()
                if now - self._refresh_errors.get(name, 0) > 60:  # rate-limited
                    log.exception("plugin %s failed to read its maps", name)
                    self._refresh_errors[name] = now
        return running

    def run(self) -> None:
        """The read loop: map reads every interval; housekeeping (interfaces that
        came or went) every interval and as soon as a plugin asks for it. All
        netlink and tc work happens on this thread."""
        next_read = time.monotonic() + self.config.interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_read - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            with self.lock:
                for plugin in self.plugins.values():
                    plugin.reconcile()
                if time.monotonic() >= next_read:
                    self.refresh_all()
                    next_read = time.monotonic() + self.config.interval
            self._heartbeat = time.monotonic()

    def wake(self) -> None:
        """Ask the read loop for housekeeping now (from any thread)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def health(self) -> tuple[bool, str]:
        # Liveness depends only on the agent's own loop, never on the API server.
        age = time.monotonic() - self._heartbeat
        if age > 3 * self.config.interval + 30:
            return False, f"read loop stalled for {age:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting"
        down = ", ".join(f"{n} ({w})" for n, w in self.failed.items())
        stream = "; ".join(self.observe.errors) if self.observe is not None else ""
        return True, "ready" + (f"; plugins down: {down}" if down else "") + (
            f"; flow stream not served on {stream}" if stream else "")

    def close(self) -> None:
        """Detach everything from the kernel; safe to call twice."""
        with self.lock:
            for plugin in self.plugins.values():
                try:
                    plugin.close()
                except Exception:
                    log.exception("plugin %s did not close cleanly", plugin.name)
            self.plugins.clear()
            # Plugins published their last flows on close: hand them on, then stop.
            for consumer in (self.traces, self.observe):
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        log.exception("%s did not close cleanly", type(consumer).__name__)
            self.traces = self.observe = None
            if self.tc is not None:
                self.tc.close()
                self.tc = None
            if self.pod_source is not None:
                self.pod_source.stop()
                self.pod_source = None
        if self.captures is not None:
            self.captures.stop()
            self.captures = None
        if self.server is not None:
            self.server.stop()
            self.server = None
