"""The agent: kernel preparation, plugins, the metrics server, the read loop."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from prometheus_client import CollectorRegistry, ProcessCollector
from pyroute2 import IPRoute

from agent import capabilities
from agent.config import Config
from agent.attribution import Attribution
from agent.datapath import Datapath
from agent.errors import FoveaError
from agent.events import EventHub
from agent.kernel.headers import find_headers
from agent.kernel.tracefs import Tracefs
from agent.metrics import FoveaCollector, build_snapshot
from agent.pins import NodePins
from agent.plugins import REGISTRY
from agent.plugins.base import Plugin, PluginContext
from agent.server import MetricsServer, TlsFiles
from agent.supervise import Supervisor

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
    """Only the read loop (run()) reads the kernel and touches the plugins; after
    each read it builds a snapshot of metric families, and /metrics renders the
    latest snapshot without waiting for anything."""

    def __init__(self, config: Config):
        self.config = config
        self.plugins: dict[str, Plugin] = {}
        self.failed: dict[str, str] = {}  # plugin -> why it could not start
        self.events = EventHub()
        self.supervisor = Supervisor()
        self.datapath: Datapath | None = None
        self.pod_source = None
        self.captures = None
        self.server: MetricsServer | None = None
        self.attribution: Attribution | None = None
        self.traces = None  # agent/traces.py TraceExporter, when OTLP is on
        self.observe = None  # agent/observe.py ObserveServer
        self.snapshot: list = []  # metric families of the last read (replaced whole, never mutated)
        self.down: dict[str, str] = {}  # enabled plugin -> why it is down, as of the last read
        self._read_errors: dict[str, str] = {}  # plugin -> why its last read failed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop_done = threading.Event()
        self._loop_done.set()  # until run() starts
        self._heartbeat = time.monotonic()
        self._ready = False

    def start(self) -> None:
        require_root()
        cfg = self.config
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FoveaCollector(lambda: self.snapshot))
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
        self._read()  # the first snapshot: /metrics has data as soon as it answers
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
        self.datapath = Datapath(cfg, headers, uplinks, self.wake, self.supervisor, pins=NodePins(cfg.node))
        log.info("tc programs attach with %s", self.datapath.tc.mode)
        self.datapath.start()
        self.pod_source = self._pod_source()
        # A static pods file never learns a pod: standalone, nothing waits for one.
        window = 0.0 if cfg.standalone else cfg.podLevel.pendingWindow
        attribution = self.attribution = Attribution(self.pod_source, cfg.node, all_pods=cfg.podLevel.allPods,
                                                     pending_window=window)
        ctx = PluginContext(cfg, headers, tracefs, self.datapath, uplinks, attribution, self.wake, self.events)
        held = capabilities.effective()
        candidates = {}
        # Every plugin that can run declares its tc features before any program compiles.
        for name in cfg.enabled_plugins:
            plugin = REGISTRY[name]()
            missing = capabilities.missing(plugin.capabilities, held)
            why = capabilities.describe_missing(missing) if missing else plugin.check(tracefs)
            if why is None:
                try:
                    plugin.declare(self.datapath)
                    candidates[name] = plugin
                    continue
                except FoveaError as e:
                    why = str(e)
            self._plugin_down(name, plugin, why)
        for name, plugin in candidates.items():
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
            self._plugin_down(name, plugin, why)
        self.datapath.prune_pins()
        if not self.plugins:  # keep serving: plugin_up and /readyz say why, and the alerts fire
            log.error("no plugin could start: see the errors above, and run 'fovea doctor'")

    def _plugin_down(self, name: str, plugin: Plugin, why: str) -> None:
        try:
            plugin.close()
        except Exception:
            log.exception("plugin %s did not close cleanly", name)
        self.failed[name] = why
        log.error("plugin %s is down: %s", name, why)

    def _start_consumers(self) -> None:
        """The record consumers: OTLP spans (when on) and the flow stream."""
        from agent.observe import ObserveServer
        from agent.traces import TraceExporter, otlp_enabled

        cfg = self.config
        if otlp_enabled(cfg):
            self.traces = TraceExporter(cfg, self.events, self.attribution, supervisor=self.supervisor)
        if cfg.observe.socket or cfg.observe.port:
            self.observe = ObserveServer(cfg, self.events, self.attribution, cfg.node, supervisor=self.supervisor)

    def _start_captures(self) -> None:
        """The Capture controller (with the Kubernetes API only)."""
        cfg = self.config
        if cfg.standalone or not cfg.captures.enabled:
            return
        from capture.service import start_captures

        # Captures find their pods' interfaces in the datapath's one inventory.
        self.captures = start_captures(cfg, self.datapath.uplinks, self.datapath.interfaces, self.events.publish)
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

    def run(self) -> None:
        """The read loop, the only reader of the kernel: map reads and a new
        snapshot every interval; housekeeping (interfaces that came or went)
        every interval and as soon as something asks for it. Nothing that fails
        in one plugin stops it (agent/supervise.py)."""
        self._loop_done.clear()
        try:
            next_read = time.monotonic() + self.config.interval
            while not self._stop.is_set():
                self._wake.wait(max(0.0, next_read - time.monotonic()))
                self._wake.clear()
                if self._stop.is_set():
                    break
                self._housekeeping()
                if time.monotonic() >= next_read:
                    self._read()
                    next_read = time.monotonic() + self.config.interval
                self._heartbeat = time.monotonic()
        finally:
            self._loop_done.set()

    def _housekeeping(self) -> None:
        for name, plugin in self.plugins.items():
            self.supervisor.call(f"{name}.reconcile", plugin.reconcile)

    def _read(self) -> None:
        """Read every plugin's maps, then publish a new snapshot and the health it shows."""
        for name, plugin in self.plugins.items():
            ok = self.supervisor.call(f"{name}.refresh", plugin.refresh)
            if ok:
                self._read_errors.pop(name, None)
            elif ok is False:
                self._read_errors[name] = "reading its maps failed (see the log)"
        down = dict(self.failed)
        for name, plugin in self.plugins.items():
            try:
                why = self._read_errors.get(name) or plugin.problem()
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            if why:
                if self.down.get(name) != why:
                    log.error("plugin %s is down: %s", name, why)
                down[name] = why
            elif name in self.down:
                log.info("plugin %s is up again", name)
        self.down = {n: w for n, w in down.items() if n in self.config.enabled_plugins}
        self.snapshot = build_snapshot(self)

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
        """Ready while every enabled plugin is up (as of the last read)."""
        if not self._ready:
            return False, "starting"
        down = self.down
        notes = [f"plugin {n} is down: {w}" for n, w in down.items()]
        if "captures" in self.failed:
            notes.append(f"captures are down: {self.failed['captures']}")
        if self.observe is not None and self.observe.errors:
            notes.append(f"flow stream not served on {'; '.join(self.observe.errors)}")
        return not down, "; ".join(["not ready" if down else "ready", *notes])

    def _save(self) -> dict:
        """What each plugin needs to continue exactly in the next agent (lifecycle.keepAttached)."""
        state = {}
        for name, plugin in self.plugins.items():
            try:
                state[name] = plugin.save()
            except Exception:  # its counters restart; the others continue
                log.exception("plugin %s could not save its state", name)
        return {n: s for n, s in state.items() if s}

    def close(self) -> bool:
        """Detach everything from the kernel, or with lifecycle.keepAttached leave the tc
        programs attached for the next agent (then True); safe to call twice."""
        self.stop()
        if not self._loop_done.wait(timeout=60):
            log.warning("the read loop did not stop within 60s; closing anyway")
        kept = self.datapath is not None and self.datapath.keep and self.datapath.leave_attached(self._save)
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
        if self.datapath is not None:
            self.datapath.close()
            self.datapath = None
        if self.pod_source is not None:
            self.pod_source.stop()
            self.pod_source = None
        if self.captures is not None:
            self.captures.stop()
            self.captures = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        return kept
